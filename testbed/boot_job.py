"""The main job on the boot test bed: a Debian 12 machine with kmodd as its loader.

    KMODD_MAIN_JOB=boot bash scripts/run-main.sh [--console]

Builds what it needs on first use, with progress on stderr: the image
(``testbed.image``), kmodd's package from this checkout (``contrib/build-deb.sh``)
and the takeover image (``testbed.takeover``: ``dpkg -i`` and ``kmodd-takeover
enable`` in a chroot of the image).  Then it boots that image under QEMU —
systemd as PID 1, udev handing the driver job over to ``kmodd.service`` — and
narrates, one line per event, timed from the start of the boot:

1. boot      -- ``systemctl is-system-running``, kmodd's ``STATUS=`` line;
2. coldplug  -- the modules kmodd loaded at boot and for which devices
   (``kmodctl list``), and those the initramfs or udev loaded before kmodd was
   up (Debian's initramfs loads the disk and network drivers);
3. hotplug   -- QMP ``device_add`` of an e1000e NIC: kmodd loads e1000e and the
   device is bound (``kmodctl why e1000e``);
4. kernel request -- ``ip link add ... type bridge``: the kernel runs the
   installed ``kmodd-request``, kmodd loads bridge (``kmodctl why bridge``);
5. autoclean -- the link deleted and a short ``idle_timeout`` in
   ``/etc/kmodd.conf`` (``systemctl reload kmodd``): bridge is unloaded, the
   NIC's driver stays;
6. journal   -- ``journalctl -u kmodd MODULE=e1000e``: the load line with
   the device's ``MODALIAS=`` and ``DEVPATH=``.

Exit 0 when every milestone was met, 1 otherwise (the failed ones named).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from testbed.boot import RUN_DIR, BootVM
from testbed.image import build_image
from testbed.main_job import Narrator, short
from testbed.takeover import build_deb, derived_images
from testbed.vm import GuestTimeout

MILESTONES = ("boot", "coldplug", "hotplug", "kernel request", "autoclean", "journal")
HOTPLUG = ("e1000e", "0x1a", "e1000e")  # QEMU device, PCI slot, driver
BRIDGE = "kmb0"
IDLE_TIMEOUT = 6


class Failed(Exception):
    pass


class BootDemo:
    def __init__(self, vm: BootVM, say: Narrator) -> None:
        self.vm = vm
        self.say = say
        self.results: dict[str, str | None] = {}

    def sh(self, cmd: str, timeout: float = 300) -> str:
        return self.vm.run(cmd, timeout=timeout, check=True).stdout

    def attempt(self, name: str, step: Callable[[], str]) -> None:
        try:
            self.say.say(f"{name}: {step()}")
            self.results[name] = None
        except (Failed, GuestTimeout, AssertionError, KeyError, ValueError) as exc:
            self.say.say(f"FAILED {name}: {exc}")
            self.results[name] = str(exc) or type(exc).__name__

    def boot(self) -> str:
        self.say.heading("1. boot: systemd brings the machine up, kmodd.service among its units")
        state = self.vm.run("systemctl is-system-running --wait", timeout=900).stdout.strip()
        status = self.sh("systemctl show -p StatusText --value kmodd.service").strip()
        helper = self.sh("cat /proc/sys/kernel/modprobe").strip()
        self.say.block(f"system: {state}\nkmodd.service: {status}\nkernel.modprobe = {helper}")
        if state not in ("running", "degraded") or not status:
            raise Failed(f"system {state}, kmodd status {status!r}")
        return f"system {state}, kmodd says \"{short(status)}\""

    def coldplug(self) -> str:
        self.say.heading("2. coldplug: the drivers kmodd loaded for the devices present at boot")
        self.sh("kmodctl settle --timeout 300", timeout=400)
        mods = json.loads(self.sh("kmodctl list --json"))
        ours = [m for m in mods if m.get("loaded_by_kmodd")]
        lines = []
        for m in sorted(ours, key=lambda m: m["name"]):
            why = m.get("why") or {}
            what = why.get("devpath") or f"{why.get('kind', '?')} {why.get('key', '')}"
            lines.append(f"{m['name']:<22} {short(str(what), 60)}")
        self.say.block("\n".join(lines) or "(none)")
        before = len(mods) - len(ours)
        self.say.say(f"{len(ours)} modules loaded by kmodd; {before} were loaded before it was "
                     "up (the initramfs: disk and NIC drivers; udev until kmodd's hand-over)")
        if not ours:
            raise Failed("kmodd loaded nothing at boot")
        return f"{len(ours)} modules loaded by kmodd"

    def hotplug(self) -> str:
        dev, slot, driver = HOTPLUG
        self.say.heading(f"3. hotplug: an {dev} NIC added through QMP")
        self.vm.qmp("device_add", driver=dev, id="mainhot", addr=slot)
        path = f"/sys/bus/pci/devices/0000:00:{int(slot, 16):02x}.0/driver"
        deadline = time.monotonic() + 180
        bound = ""
        while time.monotonic() < deadline and not bound:
            bound = self.vm.run(f"basename $(readlink {path}) 2>/dev/null").stdout.strip()
            time.sleep(0 if bound else 2)
        self.say.block(self.sh(f"kmodctl why {driver}"))
        if bound != driver:
            raise Failed(f"the device's driver is {bound or 'none'}, not {driver}")
        return f"{dev} bound to {driver}"

    def kernel_request(self) -> str:
        self.say.heading("4. kernel request: ip link add type bridge runs the installed helper")
        self.sh(f"ip link add {BRIDGE} type bridge")
        # The kernel hears back before kmodd records the load: settle first.
        self.sh("kmodctl settle --timeout 120", timeout=200)
        why = json.loads(self.sh("kmodctl why bridge --json"))
        self.say.block(self.sh("kmodctl why bridge"))
        if why.get("kind") != "kernel" or not why.get("loaded_by_kmodd"):
            raise Failed(f"bridge was not a kernel request served by kmodd: {why}")
        return f"bridge loaded by kmodd for the kernel's {why.get('key')}"

    def autoclean(self) -> str:
        self.say.heading(f"5. autoclean: the link deleted, idle_timeout = {IDLE_TIMEOUT} s")
        self.sh(f"ip link del {BRIDGE} && printf 'autoclean_interval = 2\\nidle_timeout = "
                f"{IDLE_TIMEOUT}\\n' >>/etc/kmodd.conf && systemctl reload kmodd.service")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            loaded = set(self.sh("cut -d' ' -f1 /proc/modules").split())
            if "bridge" not in loaded:
                break
            time.sleep(3)
        else:
            raise Failed("bridge is still loaded")
        if HOTPLUG[2] not in loaded:
            raise Failed("autoclean unloaded the hot-added NIC's driver")
        self.say.block(self.sh("journalctl -b -u kmodd.service -o cat --no-pager "
                               "| grep -i autoclean | tail -n 5"))
        return f"bridge unloaded, {HOTPLUG[2]} (bound to a device) kept"

    def journal(self) -> str:
        self.say.heading(f"6. journal: journalctl -u kmodd MODULE={HOTPLUG[2]}")
        out = self.sh(f"journalctl -b -u kmodd MODULE={HOTPLUG[2]} -o json --no-pager")
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        loads = [e for e in entries if e.get("MODALIAS") and e.get("DEVPATH")]
        for e in loads:
            self.say.block(f"MESSAGE={e.get('MESSAGE')}\nMODALIAS={short(e['MODALIAS'], 60)}\n"
                           f"DEVPATH={e['DEVPATH']}")
        if not loads:
            raise Failed(f"no load line with MODALIAS= and DEVPATH= ({len(entries)} entries)")
        return f"{len(loads)} load line(s) with MODALIAS= and DEVPATH="


def main(console: bool = False) -> int:
    print("preparing: the image, kmodd's package and the takeover image "
          "(first use builds them; progress on stderr)", flush=True)
    with tempfile.TemporaryDirectory(prefix="kmodd-main-") as tmp:
        images = derived_images(build_deb(Path(tmp)), build_image())
    vm = BootVM(image=images.takeover, console=sys.stderr if console else None)
    rc = 1
    try:
        seconds = vm.boot()
        say = Narrator(sys.stdout, time.monotonic() - seconds)
        say.heading(f"kmodd as the loader of a Debian 12 machine under QEMU "
                    f"({len(vm.devices)} emulated devices, kernel "
                    f"{images.takeover.kernel_version})")
        say.say(f"the agent answered {seconds:.1f} s after QEMU started")
        demo = BootDemo(vm, say)
        for name, step in zip(MILESTONES, (demo.boot, demo.coldplug, demo.hotplug,
                                           demo.kernel_request, demo.autoclean, demo.journal),
                              strict=True):
            demo.attempt(name, step)
        say.heading("summary")
        for name in MILESTONES:
            say.say(f"{name:<15} {'met' if demo.results.get(name, '') is None else 'FAILED'}")
        failed = [n for n in MILESTONES if demo.results.get(n, "") is not None]
        verdict = f"FAILED: {', '.join(failed)}" if failed else "every milestone met"
        print(f"\nkmodd boot job: {verdict}", flush=True)
        rc = 1 if failed else 0
        return rc
    finally:
        vm.shutdown()  # keeps the console in build/boot/last-console.log
        if rc != 0 and not console:
            last = RUN_DIR.parent / "last-console.log"
            tail = last.read_text(errors="replace").splitlines()[-40:] if last.exists() else []
            sys.stderr.write(f"--- guest console (tail; whole console in {last})\n"
                             + "\n".join(tail) + "\n")
