"""Guest side of tests/vm/test_kernel.py: runs inside the QEMU guest, on the real kernel.

Python is slow under TCG, so one process does every check in order and prints
one JSON document; the host-side tests assert on its sections.  Each check
records what happened (and a traceback if it crashed) instead of asserting, so
one surprise does not hide the others.  Also runs ``modprobe``/``insmod`` where
comparing with kmod is useful.  No test functions here: pytest on the host
collects nothing from this file.

    .venv/bin/python tests/vm/test_kernel_guest.py [CHECK...]
"""

from __future__ import annotations

import contextlib
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))

from kmodd.kernel.loader import Loader  # noqa: E402
from kmodd.kernel.protocol import InitState, KernelError  # noqa: E402
from kmodd.kernel.real import RealKernel  # noqa: E402
from kmodd.resolution.plan import ModuleStep, Plan  # noqa: E402
from kmodd.resolution.resolve import Resolver, open_resolver  # noqa: E402
from kmodd.root import Root  # noqa: E402

VERSION = os.uname().release
MODDIR = Path("/lib/modules") / VERSION
E1000_MODALIAS = "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"
TMP = Path("/tmp/kmodd-kernel-checks")

Check = Callable[[], dict[str, Any]]
CHECKS: dict[str, Check] = {}
# Checks that leave the guest unusable for anything else (modules_disabled is
# one-way): run only when named, on a guest of their own.
DESTRUCTIVE: dict[str, Check] = {}


def check(fn: Check) -> Check:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def destructive(fn: Check) -> Check:
    DESTRUCTIVE[fn.__name__.removeprefix("check_")] = fn
    return fn


class RecordingKernel(RealKernel):
    """RealKernel that notes which raw syscall each operation used."""

    def __init__(self) -> None:
        super().__init__(Root())
        self.calls: list[tuple[str, str, int]] = []   # (syscall, module, flags)

    def _finit_module(self, name: str, fd: int, params: bytes, flags: int) -> None:
        self.calls.append(("finit_module", name, flags))
        super()._finit_module(name, fd, params, flags)

    def _init_module(self, name: str, image: bytes, params: bytes) -> None:
        self.calls.append(("init_module", name, 0))
        super()._init_module(name, image, params)

    def _delete_module(self, name: str, flags: int) -> None:
        self.calls.append(("delete_module", name, flags))
        super()._delete_module(name, flags)


def sh(*argv: str, timeout: float = 120) -> dict[str, Any]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       check=False)
    return {"argv": list(argv), "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def kmodctl(*args: str, timeout: float = 240) -> dict[str, Any]:
    res = sh(sys.executable, "-m", "kmodd.cli.kmodctl", *args, timeout=timeout)
    if "--json" in args:
        try:
            res["json"] = json.loads(res["stdout"])
        except ValueError:
            res["json"] = None
    return res


def loaded() -> set[str]:
    return set(RealKernel().modules())


def dmesg_since(mark: int) -> list[str]:
    lines = sh("dmesg")["stdout"].splitlines()
    return lines[mark:]


def dmesg_mark() -> int:
    return len(sh("dmesg")["stdout"].splitlines())


def results_json(results: list[Any]) -> list[dict[str, Any]]:
    return [{"name": r.name, "status": r.status, "error": r.error, "errno": r.errno}
            for r in results]


def resolver(root: Root | None = None) -> Resolver:
    return open_resolver(root or Root(), VERSION)


def unload_all(names: list[str]) -> None:
    """Best-effort cleanup between checks (dependents first)."""
    k = RealKernel()
    for _ in range(3):
        for name in names:
            if k.initstate(name) is InitState.LIVE:
                with contextlib.suppress(KernelError):
                    k.unload_module(name)


def state_of(names: list[str] | tuple[str, ...]) -> dict[str, str]:
    k = RealKernel()
    return {n: k.initstate(n).value for n in names}


# ------------------------------------------------------------------------------------
@check
def check_env() -> dict[str, Any]:
    k = RealKernel()
    comp = k.kernel_compression()
    return {"version": VERSION, "supports_modules": k.supports_modules(),
            "modules_disabled": k.modules_disabled(), "kernel_compression": comp,
            "loaded_at_start": sorted(k.modules()), "euid": os.geteuid()}


@check
def check_e1000() -> dict[str, Any]:
    unload_all(["e1000"])    # the session's guest is shared: start from a known state
    k = RecordingKernel()
    plan = resolver().plan("e1000")
    before = state_of(["e1000"])
    results = Loader(k).load_plan(plan)
    mods = k.modules()
    out: dict[str, Any] = {
        "before": before,
        "plan": [s.name for s in plan.steps],
        "load": results_json(results),
        "state_after_load": state_of(["e1000"]),
        "proc_modules": mods["e1000"].__dict__ if "e1000" in mods else None,
        "bound_devices": k.bound_devices("e1000"),
        "refcount": k.refcount("e1000"),
        "syscalls": list(k.calls),
    }
    time.sleep(0.5)    # let the NIC's probe settle before removing it again
    out["unload"] = results_json(Loader(k).unload_recursive(plan))
    out["state_after_unload"] = state_of(["e1000"])
    return out


@check
def check_snd_hda() -> dict[str, Any]:
    k = RecordingKernel()
    plan = resolver().plan("snd-hda-intel")
    names = [s.name for s in plan.steps]
    unload_all(list(reversed(names)))
    start = loaded()
    out: dict[str, Any] = {"plan": names, "loaded_before": sorted(start & set(names))}
    # kmod first, as the reference for what "loading snd_hda_intel" means.
    out["modprobe"] = sh("modprobe", "snd_hda_intel")
    out["modprobe_loaded"] = sorted(loaded() - start)
    out["modprobe_r"] = sh("modprobe", "-r", "snd_hda_intel")
    out["after_modprobe_r"] = sorted(loaded() - start)
    unload_all(list(reversed(names)))
    # Ours.
    loader = Loader(k)
    results = loader.load_plan(plan)
    mods = k.modules()
    out["load"] = results_json(results)
    out["ours_loaded"] = sorted(loaded() - start)
    out["order_loaded"] = [c[1] for c in k.calls if c[0] in ("finit_module", "init_module")]
    out["snd_holders_proc"] = list(mods["snd"].holders) if "snd" in mods else None
    out["snd_holders_sysfs"] = list(k.holders("snd"))
    out["snd_refcount"] = k.refcount("snd")
    # EBUSY: the loader refuses with the holders named, before any syscall.
    n = len(k.calls)
    busy = loader.unload("snd")
    out["unload_snd"] = results_json([busy])[0]
    out["unload_snd_syscalls"] = k.calls[n:]
    # And the kernel's own answer (EWOULDBLOCK), mapped to EBUSY by the kernel layer.
    try:
        k.unload_module("snd")
        out["raw_unload_snd"] = {"errno": 0}
    except KernelError as e:
        out["raw_unload_snd"] = {"errno": e.errno, "message": e.message}
    out["rmmod_snd"] = sh("rmmod", "snd")
    out["state_snd_after_refusals"] = state_of(["snd"])
    time.sleep(0.5)
    out["unload_r"] = results_json(loader.unload_recursive(plan))
    out["left_after_unload_r"] = sorted(loaded() - start)
    return out


@check
def check_loop_params() -> dict[str, Any]:
    unload_all(["loop"])
    k = RecordingKernel()
    out: dict[str, Any] = {"before": state_of(["loop"])}
    plan = resolver().plan("loop", extra_options="max_loop=13")
    out["plan"] = [(s.name, s.path, s.options) for s in plan.steps]
    out["load"] = results_json(Loader(k).load_plan(plan))
    out["parameters"] = k.parameters("loop")
    out["unload"] = results_json([Loader(k).unload("loop")])
    path = plan.steps[-1].path
    assert path is not None
    # An invalid value: the kernel refuses (EINVAL).
    mark = dmesg_mark()
    try:
        k.load_module("loop", path, "max_loop=notanumber")
        out["bad_value"] = {"errno": 0}
    except KernelError as e:
        out["bad_value"] = {"errno": e.errno, "message": e.message}
    out["bad_value_dmesg"] = dmesg_since(mark)
    out["state_after_bad_value"] = state_of(["loop"])
    # An unknown parameter: the kernel itself only logs and loads anyway.
    mark = dmesg_mark()
    try:
        inserted = k.load_module("loop", path, "bogus_param=1")
        out["unknown_param_raw"] = {"errno": 0, "inserted": inserted}
    except KernelError as e:
        out["unknown_param_raw"] = {"errno": e.errno, "message": e.message}
    out["unknown_param_dmesg"] = dmesg_since(mark)
    unload_all(["loop"])
    out["modprobe_unknown_param"] = sh("modprobe", "loop", "bogus_param=1")
    out["modprobe_unknown_state"] = state_of(["loop"])
    unload_all(["loop"])
    return out


def _compressed_tree() -> Path:
    """A module tree holding loop.ko.xz, e1000.ko.zst, soundcore.ko.zst and snd.ko.xz, plus
    its depmod indexes, built with the real depmod."""
    import zstandard

    base = TMP / "ctree"
    shutil.rmtree(base, ignore_errors=True)
    kdir = base / "lib/modules" / VERSION / "kernel"
    kdir.mkdir(parents=True)
    comp = {
        "drivers/block/loop.ko": ("xz", lambda d: lzma.compress(
            d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
        "drivers/net/ethernet/intel/e1000/e1000.ko": (
            "zst", lambda d: zstandard.ZstdCompressor(level=3).compress(d)),
        # Debian's kmod is built without zlib: depmod would not see a .ko.gz, so
        # gzip is exercised below by loading a file directly.
        "sound/soundcore.ko": ("zst", lambda d: zstandard.ZstdCompressor().compress(d)),
        "sound/core/snd.ko": ("xz", lambda d: lzma.compress(d, check=lzma.CHECK_CRC32)),
    }
    for rel, (suffix, fn) in comp.items():
        dst = kdir / f"{rel}.{suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(fn((MODDIR / "kernel" / rel).read_bytes()))
    for f in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (MODDIR / f).exists():
            shutil.copy(MODDIR / f, base / "lib/modules" / VERSION / f)
    dep = sh("depmod", "-b", str(base), VERSION)
    if dep["rc"] != 0:
        raise RuntimeError(f"depmod failed: {dep}")
    return base


@check
def check_compressed() -> dict[str, Any]:
    base = _compressed_tree()
    root = Root(modules_base=base)
    res = resolver(root)
    k = RecordingKernel()
    out: dict[str, Any] = {"kernel_compression": k.kernel_compression(), "modules": {}}
    unload_all(["loop", "e1000", "snd", "soundcore"])
    for request in ("loop", "e1000", "snd"):
        plan = res.plan(request)
        n = len(k.calls)
        results = Loader(k).load_plan(plan)
        entry: dict[str, Any] = {
            "paths": [s.path for s in plan.steps],
            "load": results_json(results),
            "state": state_of([s.name for s in plan.steps]),
            "syscalls": k.calls[n:],
        }
        time.sleep(0.3)
        entry["unload"] = results_json(Loader(k).unload_recursive(plan))
        entry["state_after_unload"] = state_of([s.name for s in plan.steps])
        out["modules"][request] = entry
    # gzip, straight through the kernel layer.
    gz = TMP / "loop.ko.gz"
    gz.write_bytes(gzip.compress((MODDIR / "kernel/drivers/block/loop.ko").read_bytes()))
    n = len(k.calls)
    try:
        out["gzip_inserted"] = k.load_module("loop", str(gz))
    except KernelError as e:
        out["gzip_inserted"] = f"errno {e.errno}: {e.message}"
    out["gzip_syscalls"] = k.calls[n:]
    out["gzip_state"] = state_of(["loop"])
    unload_all(["loop"])
    # End to end: kmodctl with -d on the compressed tree.
    out["kmodctl_load"] = kmodctl("load", "-d", str(base), "--json", "snd")
    out["kmodctl_state"] = state_of(["snd", "soundcore"])
    out["kmodctl_unload"] = kmodctl("unload", "-d", str(base), "-r", "--json", "snd")
    out["kmodctl_state_after"] = state_of(["snd", "soundcore"])
    return out


@check
def check_concurrent() -> dict[str, Any]:
    path = resolver().plan("loop").steps[-1].path
    assert path is not None
    out: dict[str, Any] = {"rounds": []}
    unload_all(["loop"])
    for threads in (2, 2, 3, 4, 2):
        k = RealKernel()
        barrier = threading.Barrier(threads)
        got: list[Any] = []

        def load(k: RealKernel = k, barrier: threading.Barrier = barrier,
                 got: list[Any] = got) -> None:
            barrier.wait()
            try:
                got.append(k.load_module("loop", path))
            except KernelError as e:
                got.append(f"errno {e.errno}: {e.message}")

        ts = [threading.Thread(target=load) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out["rounds"].append({"threads": threads, "results": got,
                              "state": state_of(["loop"])})
        unload_all(["loop"])
    # The loader's view: one "loaded", the others "already".
    step = resolver().plan("loop").steps[-1]
    loader = Loader(RealKernel())
    statuses: list[str] = []
    barrier = threading.Barrier(3)

    def via_loader() -> None:
        barrier.wait()
        statuses.append(loader.load_step(step).status)

    ts = [threading.Thread(target=via_loader) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out["loader_statuses"] = statuses
    unload_all(["loop"])
    return out


def strip_signature(image: bytes) -> bytes:
    """Drop an appended module signature (struct module_signature + marker), as
    ``strip --strip-unneeded`` would not: the kernel then sees an unsigned module."""
    marker = b"~Module signature appended~\n"
    if not image.endswith(marker):
        return image
    info = image[-len(marker) - 12:-len(marker)]
    sig_len = int.from_bytes(info[8:12], "big")
    return image[:-len(marker) - 12 - sig_len]


@check
def check_corrupt() -> dict[str, Any]:
    TMP.mkdir(parents=True, exist_ok=True)
    garbage = TMP / "garbage.ko"
    garbage.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8)
    truncated = TMP / "truncated.ko"
    e1000 = (MODDIR / "kernel/drivers/net/ethernet/intel/e1000/e1000.ko").read_bytes()
    truncated.write_bytes(e1000[: len(e1000) // 2])
    badxz = TMP / "bad.ko.xz"
    badxz.write_bytes(b"\xfd7zXZ\x00" + b"not really xz" * 20)
    # A module "built for another kernel": same file, vermagic patched (same
    # length, so the ELF stays valid).  With modversions the kernel ignores the
    # release part, so a flag word changes too.
    other_release = ("8" if VERSION[0] == "9" else "9") + VERSION[1:]
    loop = (MODDIR / "kernel/drivers/block/loop.ko").read_bytes()
    patched = loop.replace(f"vermagic={VERSION} SMP preempt mod_unload ".encode(),
                           f"vermagic={other_release} SMP preempt mod_UNLOAD ".encode())
    # Still carrying the original signature, the patched file no longer matches
    # it: the kernel rejects a bad signature even when signatures are optional.
    badsig = TMP / "bad-signature.ko"
    badsig.write_bytes(patched)
    other = TMP / "other-kernel.ko"
    other.write_bytes(strip_signature(patched))
    k = RealKernel()
    unload_all(["loop", "e1000"])
    out: dict[str, Any] = {"other_release": other_release, "patched": patched != loop}
    for label, path, name in (("garbage", garbage, "garbage"),
                              ("truncated", truncated, "e1000"),
                              ("bad_xz", badxz, "badxz"),
                              ("bad_signature", badsig, "loop"),
                              ("other_kernel", other, "loop")):
        try:
            k.load_module(name, str(path))
            out[label] = {"errno": 0}
        except KernelError as e:
            out[label] = {"errno": e.errno, "message": e.message}
        out[label + "_insmod"] = sh("insmod", str(path))
        unload_all(["loop"])
    out["state_e1000"] = state_of(["e1000"])
    out["state_loop"] = state_of(["loop"])
    # A module built for another kernel would be ENOEXEC too; a bad plan path is ENOENT.
    plan = Plan("ghost", ("ghost",), (ModuleStep(name="ghost", path=str(TMP / "missing.ko")),))
    out["missing_file"] = results_json(Loader(k).load_plan(plan))
    return out


@check
def check_kmodctl() -> dict[str, Any]:
    unload_all(["e1000", "loop"])
    unload_all(["snd_hda_intel", "snd_intel_dspcfg", "snd_intel_sdw_acpi", "snd_hda_codec",
                "snd_hda_core", "snd_hwdep", "snd_pcm", "snd_timer", "snd", "soundcore"])
    out: dict[str, Any] = {}
    out["load_alias"] = kmodctl("load", "--json", E1000_MODALIAS)
    out["state_e1000"] = state_of(["e1000"])
    out["load_again"] = kmodctl("load", "e1000")
    out["unload"] = kmodctl("unload", "e1000")
    out["unload_again"] = kmodctl("unload", "e1000")
    out["load_param"] = kmodctl("load", "loop", "max_loop=7")
    out["loop_params"] = RealKernel().parameters("loop")
    unload_all(["loop"])
    out["load_unknown_param"] = kmodctl("load", "loop", "bogus_param=1")
    out["state_loop_after_unknown"] = state_of(["loop"])
    out["load_hda"] = kmodctl("load", "snd-hda-intel")
    out["unload_busy"] = kmodctl("unload", "snd")
    out["unload_hda_r"] = kmodctl("unload", "-r", "--json", "snd_hda_intel")
    out["hda_state_after"] = state_of(["snd_hda_intel", "snd_hda_codec", "snd", "soundcore"])
    out["load_missing"] = kmodctl("load", "no_such_module_xyz")
    return out


@destructive
def check_eperm() -> dict[str, Any]:
    """Expects a guest booted with ``module_blacklist=loop``; ends with modules_disabled=1."""
    loop = resolver().plan("loop").steps[-1]
    e1000 = resolver().plan("e1000").steps[-1]
    k = RealKernel()
    out: dict[str, Any] = {"cmdline": Path("/proc/cmdline").read_text()}

    def attempt(name: str, path: str | None) -> dict[str, Any]:
        assert path is not None
        try:
            return {"errno": 0, "inserted": k.load_module(name, path)}
        except KernelError as e:
            return {"errno": e.errno, "message": e.message}

    out["blacklisted"] = attempt("loop", loop.path)
    out["blacklisted_loader"] = results_json([Loader(k).load_step(loop)])[0]
    out["modprobe_blacklisted"] = sh("modprobe", "loop")
    out["e1000_before"] = attempt("e1000", e1000.path)
    Path("/proc/sys/kernel/modules_disabled").write_text("1\n")
    out["modules_disabled"] = k.modules_disabled()
    unload_all(["e1000"])   # unloading is refused too
    out["e1000_state"] = state_of(["e1000"])
    try:
        k.unload_module("e1000")
        out["unload_disabled"] = {"errno": 0}
    except KernelError as e:
        out["unload_disabled"] = {"errno": e.errno, "message": e.message}
    out["dummy_disabled"] = attempt("loop", loop.path)
    out["kmodctl_disabled"] = kmodctl("load", "virtio_rng")
    return out


def main(argv: list[str]) -> int:
    wanted = argv or list(CHECKS)
    report: dict[str, Any] = {}
    for name in wanted:
        t0 = time.monotonic()
        try:
            data = {**CHECKS, **DESTRUCTIVE}[name]()
            data["ok"] = True
        except Exception:
            data = {"ok": False, "traceback": traceback.format_exc()}
        data["seconds"] = round(time.monotonic() - t0, 2)
        report[name] = data
        print(f"check {name}: {'done' if data['ok'] else 'CRASHED'} in {data['seconds']}s",
              file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
