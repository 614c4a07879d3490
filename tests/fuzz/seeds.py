"""Seed corpora for the fuzz targets, made at test time (nothing big is committed).

From the fixture builders of tests/fixtures.py (a small module tree made with
gcc and the real ``depmod -b``) and from the host's Debian files: the module
tree under test (small indexes, the smallest modules and their signatures),
``/lib/modprobe.d``, ``/proc/cmdline``.  Files over 64 KiB are cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

MAX_LEN = 64 * 1024

INDEX_TEXT = ("modules.dep", "modules.alias", "modules.symbols", "modules.builtin",
              "modules.softdep", "modules.builtin.alias")


def _fixture_tree(work: Path) -> Path | None:
    from tests.fixtures import FakeModule, build_tree
    try:
        return build_tree(work, [
            FakeModule("e1000e", aliases=("pci:v00008086d000010D3sv*sd*bc*sc*i*",
                                          "pci:v00008086d00001[0-9]*sv*sd*bc02sc*i*"),
                       exports=("e1000_shared",), subdir="drivers/net"),
            FakeModule("snd-pcm", exports=("snd_pcm_new",), uses=("snd_card_new",),
                       softdep="pre: snd-timer", modinfo=["parm=debug:int",
                                                          "parmtype=debug:int"]),
            FakeModule("snd", exports=("snd_card_new",)),
            FakeModule("snd-timer"),
            FakeModule("usb-storage", aliases=("usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
                                               "usb:v0BC2p3332d*dc*dsc*dp*ic*isc*ip*in*")),
        ], builtin=[("ext4", ("fs-ext4",))])
    except Exception:
        return None


def _real_moddir() -> Path | None:
    try:
        from tests.fixtures import real_moddir
        moddir = real_moddir()
    except Exception:
        return None
    return moddir if moddir.is_dir() else None


def _head(path: Path, limit: int = MAX_LEN) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def _smallest_modules(moddir: Path, count: int) -> list[Path]:
    found: list[tuple[int, Path]] = []
    for path in (moddir / "kernel").rglob("*.ko*"):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_size, path))
    return [p for _, p in sorted(found)[:count]]


def make_seeds(dest: Path) -> dict[str, Path]:
    """A directory of seed inputs per target under ``dest``; {target: directory}."""
    seeds: dict[str, list[bytes]] = {name: [] for name in (
        "index_bin", "index_text", "modprobe_d", "cmdline", "kmodd_conf", "control", "fifo",
        "uevent", "state", "learned", "elf", "signature")}
    with tempfile.TemporaryDirectory(prefix="kmodd-seeds-") as tmp:
        tree = _fixture_tree(Path(tmp))
        real = _real_moddir()
        for moddir in (tree, real):
            if moddir is None:
                continue
            for binfile in sorted(moddir.glob("modules.*.bin")):
                if binfile.stat().st_size <= MAX_LEN:
                    seeds["index_bin"].append(binfile.read_bytes())
            for i, name in enumerate(INDEX_TEXT):
                data = _head(moddir / name, 8192)
                if data is not None:
                    # A cut file ends mid-line; keep whole lines only.
                    seeds["index_text"].append(bytes([i]) + data[:data.rfind(b"\n") + 1])
        if tree is not None:
            from kmodd.modfile import read_module_image
            for ko in sorted(tree.rglob("*.ko")):
                seeds["elf"].append(read_module_image(ko))
        if real is not None:
            from kmodd.modfile import read_module_image
            for ko in _smallest_modules(real, 4):
                with contextlib.suppress(Exception):
                    image = read_module_image(ko)
                    if len(image) <= MAX_LEN:
                        seeds["elf"].append(image)
                    seeds["signature"].append(image[-2048:])
    for conf_dir in (Path("/lib/modprobe.d"), Path("/etc/modprobe.d")):
        if conf_dir.is_dir():
            for conf in sorted(conf_dir.glob("*.conf")):
                data = _head(conf)
                if data:
                    seeds["modprobe_d"].append(data)
    seeds["modprobe_d"] += [
        b"alias pci:v00008086d* e1000e\noptions e1000e InterruptThrottleRate=3,3 \\\n debug=1\n"
        b"blacklist pcspkr\ninstall foo /bin/true $CMDLINE_OPTS\nremove foo /bin/false\n"
        b"softdep snd-pcm pre: snd-timer post: snd-seq\nweakdep a b\n# comment\n",
        b"options snd_hda_intel model=\"a b\" 'c'\ninstall bar* { echo \"$x\"; }\n",
    ]
    cmd = _head(Path("/proc/cmdline"), 4095)
    if cmd:
        seeds["cmdline"].append(cmd)
    seeds["cmdline"] += [
        b"modprobe.blacklist=pcspkr,nouveau e1000e.debug=1 snd-hda-intel.model=\"a b\" quiet",
        b"BOOT_IMAGE=/vmlinuz root=UUID=x ro \"foo.bar=a b\" module_blacklist=x",
    ]
    seeds["kmodd_conf"] += [
        b"idle_timeout = 600\nautoclean_interval = 60\nnever_unload = [\"e1000e\"]\n"
        b"max_workers = 8\nqueue_limit = 1000\nlog_level = \"info\"\n",
        b"[kmodd]\nbackoff_initial = 1.5\nbackoff_max = 60\nrunaway_limit = 20\n"
        b"runaway_window = 10.0\ncoldplug = true\n",
    ]
    seeds["control"] += [
        b"\x00" + b'{"op":"status","id":1}\n{"op":"list"}\n{"op":"why","module":"snd"}\n'
        b'{"op":"settle","timeout":0}\n{"op":"ping","id":"x"}\n{"op":"monitor"}\n',
        b"\x01" + b'{"op":"load","name":"e1000","options":"debug=1","kind":"kernel"}\n'
        b'{"op":"unload","name":"snd","force":false}\n{"op":"reload"}\n'
        b'{"op":"load","name":"snd_pcm","requested_by":"x pid=1"}\n',
        b"\x00" + b"[" * 200 + b"\n" + b'{"op":' * 50 + b"\n",
    ]
    seeds["fifo"] += [
        b"fs-ext4 /proc/123/fd/6\nrtnl-link-dummy /proc/99/fd/5\n",
        b"crypto-cbc(aes)-all RUN/reply.4242\nnet-pf-10-proto-6 /x/reply.1\n",
        b"-bad /proc/1/fd/1\n" + b"a" * 5000 + b"\nok /proc/2/fd/6\n",
    ]
    seeds["uevent"] += [
        b"add@/devices/pci0000:00/0000:00:03.0\0ACTION=add\0"
        b"DEVPATH=/devices/pci0000:00/0000:00:03.0\0SUBSYSTEM=pci\0"
        b"MODALIAS=pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00\0SEQNUM=1234\0",
        b"add@/devices/platform/serial8250\0ACTION=add\0DEVPATH=/devices/platform/serial8250\0"
        b"SUBSYSTEM=platform\0MODALIAS=platform:serial8250\0SEQNUM=7\0",
        b"remove@/devices/virtual/net/x\0ACTION=remove\0DEVPATH=/devices/virtual/net/x\0",
    ]
    record = {"name": "e1000e", "loaded_at": 1700000000.0, "kind": "modalias",
              "key": "pci:v00008086d000010D3sv*", "devpath": "/devices/pci0000:00/0000:00:03.0",
              "requested_by": "uevent", "role": "target", "via": ["e1000e"],
              "idle_since": None}
    seeds["state"] += [
        json.dumps({"version": 1, "modules": [record, {**record, "name": "snd",
                                                         "kind": "kernel"}]}).encode(),
        b'{"modules": []}',
    ]
    seeds["learned"] += [
        json.dumps({"format": 1, "kernel": "6.1.0-fuzz",
                    "modules": {"scsi_mod": {"init": 0.3, "deps": ["scsi_common"], "path": None,
                                             "size": None, "mtime_ns": None},
                                "scsi_common": {"init": 0.1, "deps": []},
                                "sym53c8xx": {"init": 5.0, "deps": ["scsi_mod"],
                                              "path": "/nonexistent/sym53c8xx.ko",
                                              "size": 1, "mtime_ns": 2}},
                    "devices": {"pci:v00001000d00000012sv*": {
                        "devpath": "/devices/pci0000:00/0000:00:05.0",
                        "targets": ["sym53c8xx", "scsi_mod"]}}}).encode(),
        b'{"format": 1, "kernel": "6.1.0-other", "modules": {}, "devices": {}}',
    ]
    out: dict[str, Path] = {}
    for name, inputs in seeds.items():
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(inputs):
            (d / f"seed-{i:03d}").write_bytes(data[:MAX_LEN])
        if not inputs:
            (d / "seed-empty").write_bytes(b"")
        out[name] = d
    return out


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    made = make_seeds(Path(sys.argv[1] if len(sys.argv) > 1 else "build/fuzz/seeds"))
    for name, d in made.items():
        print(f"{name}: {len(os.listdir(d))} seeds in {d}")
