"""Shared helpers for the side-by-side benchmarks (bench_coldplug, bench_request,
bench_startup, bench_burst).

Host side: machine description, medians, RSS from /proc, a NOTIFY_SOCKET
listener, the emulated device catalogue (each device's driver checked against
Debian's module tree) and booting the QEMU test bed.

Guest side: the benchmarks run a driver inside the guest (``--guest``) so that
time is measured by the guest's own clock, around exactly the commands being
compared, never including the host/guest mailbox round trip.  kmodd runs in
the guest from a copy of the package in tmpfs with its byte code compiled on
the host, as an installed package would (the checkout is shared over an
uncached 9p mount, where every ``stat`` of an import is a round trip through
the emulator).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV_PY = ROOT / ".venv" / "bin" / "python"
# The helper the guest runs; KMODD_BENCH_HELPER names another copy, e.g. the
# Debian package's (dpkg-deb -x into a directory under the checkout, which the
# guest shares).
REQUEST_HELPER = Path(os.environ.get("KMODD_BENCH_HELPER") or ROOT / "contrib" / "kmodd-request")
# The kmodd package copied into the guest; KMODD_BENCH_SOURCE names another
# (e.g. "git archive" of an older commit under build/, for a before/after).
SOURCE = Path(os.environ.get("KMODD_BENCH_SOURCE") or ROOT / "kmodd")
# Where the guest driver installs kmodd (tmpfs), see guest_install_kmodd().
GUEST_PREFIX = "/tmp/kmodd-install"
# How kmodd is installed in the guest (the guest's / is the host's under a
# tmpfs overlay, so /usr can be written there):
#   installed  as the Debian package lays it out: the package in
#              /usr/lib/python3/dist-packages with its byte code, run by
#              /usr/bin/python3 through contrib/debian/console-script as
#              /usr/sbin/kmodd and /usr/bin/kmodctl (the README's install);
#   generated  the same with the wrappers pybuild generates (import re), to
#              measure what the lean entry points save;
#   venv       the development virtual environment (-P -m, PYTHONPATH to a
#              tmpfs copy): the layout of the figures before 2026-11-30.
# The host picks it (set_layout); the guest driver reads KMODD_BENCH_LAYOUT.
LAYOUTS = ("installed", "generated", "venv")
LAYOUT = "installed"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
GENERATED_WRAPPER = """#!/usr/bin/python3
# -*- coding: utf-8 -*-
import re
import sys
from @MODULE@ import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""


def set_layout(name: str) -> None:
    global LAYOUT
    if name not in LAYOUTS:
        raise SystemExit(f"unknown layout {name!r} (one of {', '.join(LAYOUTS)})")
    LAYOUT = name


def guest_layout() -> str:
    """The layout inside the guest driver; "venv" on the host."""
    return os.environ.get("KMODD_BENCH_LAYOUT", "venv")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------- reporting

def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> str:
    """CPU, cores, load, kernel and Python of the host."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} CPUs, load {load:.2f}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def emit_json(obj: dict[str, Any]) -> None:
    """The guest driver's answer: one marked JSON line on stdout."""
    sys.stdout.write("BENCH-JSON " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH-JSON "):
            obj: dict[str, Any] = json.loads(line[len("BENCH-JSON "):])
            return obj
    raise RuntimeError(f"no BENCH-JSON line in the guest's output:\n{stdout[-3000:]}")


# ----------------------------------------------------------------- processes

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize of ``pid`` in kB (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


class NotifyListener:
    """A NOTIFY_SOCKET of our own: records when each ``KEY=value`` first arrives."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.first: dict[str, float] = {}
        self.messages: list[tuple[float, str]] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def wait_for(self, key: str, timeout: float) -> float | None:
        """Monotonic time at which ``KEY=`` first arrived, or None on timeout."""
        deadline = time.monotonic() + timeout
        while key not in self.first:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            now = time.monotonic()
            text = data.decode(errors="replace")
            self.messages.append((now, text))
            for line in text.splitlines():
                k = line.partition("=")[0]
                self.first.setdefault(k, now)
        return self.first[key]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def modules_loaded(text: str | None = None) -> set[str]:
    """Names in /proc/modules (or the given text of it)."""
    if text is None:
        text = Path("/proc/modules").read_text()
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def wait_quiet_modules(limit: float = 5.0, quiet: float = 1.5) -> set[str]:
    """/proc/modules once it has not changed for ``quiet`` seconds (asynchronous
    probes such as HD-audio codecs ask for modules after the loader is done)."""
    deadline = time.monotonic() + limit
    last = modules_loaded()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = modules_loaded()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


# ----------------------------------------------------------------- devices

@dataclass(frozen=True)
class Device:
    """One emulated device and the module Debian's kernel drives it with."""

    qemu: str          # the -device value
    driver: str        # module expected to end up loaded for it
    kind: str          # net, sound, usb, storage, watchdog, virtio, misc


# Ordered so that every prefix (5, 10, 20) mixes the kinds; a device on a bus
# (codec, USB function) comes after its controller.
CATALOGUE: tuple[Device, ...] = (
    Device("e1000", "e1000", "net"),
    Device("intel-hda,id=hda", "snd_hda_intel", "sound"),
    Device("hda-duplex,bus=hda.0,audiodev=snd0", "snd_hda_codec_generic", "sound"),
    Device("usb-ehci,id=ehci", "ehci_pci", "usb"),
    Device("ahci", "ahci", "storage"),
    Device("i6300esb", "i6300esb", "watchdog"),
    Device("virtio-rng-pci", "virtio_rng", "virtio"),
    Device("usb-tablet,bus=ehci.0", "usbhid", "usb"),
    Device("rtl8139,netdev=net2", "8139cp", "net"),
    Device("lsi53c895a", "sym53c8xx", "storage"),
    Device("ES1370,audiodev=snd0", "snd_ens1370", "sound"),
    Device("ich9-usb-uhci1,id=uhci", "uhci_hcd", "usb"),
    Device("pcnet,netdev=net1", "pcnet32", "net"),
    Device("virtio-net-pci,netdev=net0", "virtio_net", "virtio"),
    Device("pvpanic", "pvpanic", "misc"),
    Device("sdhci-pci", "sdhci_pci", "storage"),
    Device("virtio-balloon-pci", "virtio_balloon", "virtio"),
    Device("AC97,audiodev=snd0", "snd_intel8x0", "sound"),
    Device("megasas", "megaraid_sas", "storage"),
    Device("qemu-xhci", "xhci_pci", "usb"),
)


def device_kernel() -> Any:
    """The testbed's kernel (version, moddir) the guest boots."""
    from testbed.initramfs import find_kernel
    return find_kernel()


def check_catalogue(devices: Sequence[Device] = CATALOGUE) -> list[str]:
    """Problems: devices whose driver module is not in Debian's tree, or
    device types this QEMU does not have.  Empty when all is well."""
    from kmodd.resolution.index import ModuleTree
    kernel = device_kernel()
    tree = ModuleTree(Path(kernel.moddir))
    problems = [f"{d.qemu}: driver {d.driver} not in {kernel.moddir}"
                for d in devices if tree.dep(d.driver) is None and not tree.is_builtin(d.driver)]
    try:
        have = subprocess.run(["qemu-system-x86_64", "-device", "help"], capture_output=True,
                              text=True, check=False).stdout
    except OSError as exc:
        return [*problems, f"qemu-system-x86_64: {exc}"]
    for d in devices:
        name = d.qemu.split(",", 1)[0]
        if f'name "{name}"' not in have and f'alias "{name}"' not in have:
            problems.append(f"{d.qemu}: QEMU has no device {name!r}")
    return problems


def devices(count: int) -> list[Device]:
    if not 1 <= count <= len(CATALOGUE):
        raise SystemExit(f"device count must be 1..{len(CATALOGUE)}, not {count}")
    return list(CATALOGUE[:count])


# ----------------------------------------------------------------- test bed

@contextlib.contextmanager
def booted(device_list: Sequence[Device], *, kernel_modprobe: str | None = None,
           boot_timeout: float = 300.0) -> Iterator[Any]:
    """A freshly booted guest with these devices; always shut down after.

    ``kernel_modprobe`` None keeps the kernel's own /sbin/modprobe as the
    request_module() helper (the test bed's default is /bin/true)."""
    from testbed.vm import VM
    vm = VM([d.qemu for d in device_list], kernel_modprobe=kernel_modprobe)
    vm.boot(timeout=boot_timeout)
    try:
        yield vm
    finally:
        vm.shutdown()


def precompile() -> None:
    """Byte-compile kmodd on the host so no run pays for compilation."""
    subprocess.run([str(VENV_PY), "-m", "compileall", "-q", str(SOURCE)],
                   check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})


def _wrapper(module: str) -> str:
    if LAYOUT == "generated":
        return GENERATED_WRAPPER.replace("@MODULE@", module)
    return (ROOT / "contrib/debian/console-script").read_text().replace("@MODULE@", module)


def guest_prepare_script() -> str:
    """Shell run in a fresh guest before any timing: install kmodd (LAYOUT, with
    its byte code) and warm the page cache for every program compared, so each
    method starts with its files in memory, as after a disk read."""
    imports = ("kmodd, kmodd.daemon.service, kmodd.daemon.uevents, kmodd.daemon.kernelreq, "
               "kmodd.daemon.watch, kmodd.resolution.resolve, kmodd.kernel.loader, "
               "kmodd.kernel.real, kmodd.cli.daemon, kmodd.cli.kmodctl, kmodd.cli.ctl_daemon, "
               "pyudev, json")
    if LAYOUT == "venv":
        install = f"""rm -rf {GUEST_PREFIX}; mkdir -p {GUEST_PREFIX}
cp -a {SOURCE} {GUEST_PREFIX}/kmodd
cp -a {REQUEST_HELPER} {GUEST_PREFIX}/kmodd-request
PYTHONPATH={GUEST_PREFIX} {VENV_PY} -P -c 'import {imports}; \
assert kmodd.__file__.startswith("{GUEST_PREFIX}"), kmodd.__file__'
"""
    else:
        install = f"""rm -rf {GUEST_PREFIX} {DIST_PACKAGES}/kmodd; mkdir -p {GUEST_PREFIX}
cp -a {SOURCE} {DIST_PACKAGES}/kmodd
cp -a {REQUEST_HELPER} {GUEST_PREFIX}/kmodd-request
cat >/usr/sbin/kmodd <<'EOF_KMODD'
{_wrapper("kmodd.cli.daemon")}EOF_KMODD
cat >/usr/bin/kmodctl <<'EOF_KMODCTL'
{_wrapper("kmodd.cli.kmodctl")}EOF_KMODCTL
chmod 0755 /usr/sbin/kmodd /usr/bin/kmodctl
/usr/bin/python3 -P -c 'import {imports}; \
assert kmodd.__file__.startswith("{DIST_PACKAGES}/"), kmodd.__file__'
/usr/bin/kmodctl --version >/dev/null
"""
    return f"""
set -e
{install}/lib/systemd/systemd-udevd --version >/dev/null
udevadm --version >/dev/null
modprobe --version >/dev/null
cat /lib/udev/rules.d/* >/dev/null
cat /lib/modules/$(uname -r)/modules.*.bin /lib/modules/$(uname -r)/modules.dep \
    /lib/modules/$(uname -r)/modules.alias >/dev/null
"""


def guest_env() -> dict[str, str]:
    env = dict(os.environ)
    if guest_layout() == "venv":
        env["PYTHONPATH"] = GUEST_PREFIX
    else:
        env.pop("PYTHONPATH", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def kmodd_argv(*extra: str) -> list[str]:
    if guest_layout() != "venv":
        return ["/usr/sbin/kmodd", "--no-journal", *extra]
    return [str(VENV_PY), "-P", "-m", "kmodd.cli.daemon", "--no-journal", *extra]


def kmodctl_argv(*extra: str) -> list[str]:
    if guest_layout() != "venv":
        return ["/usr/bin/kmodctl", *extra]
    return [str(VENV_PY), "-P", "-m", "kmodd.cli.kmodctl", *extra]


def run_guest(vm: Any, argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a guest driver; its BENCH-JSON answer (raises with its output on failure)."""
    res = vm.run(list(argv), timeout=timeout, env={"KMODD_BENCH_LAYOUT": LAYOUT})
    if res.rc != 0:
        raise RuntimeError(f"guest driver {argv} failed with {res.rc}:\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return parse_json(res.stdout)


def prepare_guest(vm: Any) -> float:
    start = time.monotonic()
    vm.run(guest_prepare_script(), timeout=600, check=True)
    return time.monotonic() - start


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
