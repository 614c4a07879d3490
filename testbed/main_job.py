"""The README's main job, run by ``scripts/run-main.sh`` (``python -m testbed main``).

By default (``KMODD_MAIN_JOB`` unset or ``boot``) the job runs on the boot
test bed: a Debian 12 machine with kmodd installed from its package as the
loader, narrated by ``testbed/boot_job.py``.  The jobs below run on the
busybox test bed instead.

``daemon_demo`` (``KMODD_MAIN_JOB=daemon``): boots Debian's real kernel
under QEMU with the dozen default devices, starts ``kmodd`` in the guest with ``kmodd-request`` as
the kernel's ``request_module()`` helper, and narrates what the daemon does as
it happens, one line per event, timed from the start of the job:

1. coldplug  -- ``kmodctl settle``; the modules kmodd loaded and for which
   devices (``kmodctl list --json``), checked against ``modprobe -b -R``;
2. hotplug   -- QMP ``device_add`` of an e1000e NIC; kmodd loads e1000e and
   the device is bound to it (``kmodctl why e1000e``);
3. kernel request -- ``ip link add x type dummy`` goes through kmodd-request
   and loads dummy (``kmodctl why dummy``);
4. autoclean -- ``ip link del x``, a short idle timeout (kmodd.conf + SIGHUP),
   dummy is unloaded while every driver bound to a device stays;
5. ``kmodctl status``: the daemon is alive.

Exit 0 when every milestone was met, 1 otherwise (the failed milestones are
named; the daemon's log and the guest console tail go to stderr).  The guest
console goes to stderr only with ``--console``.  The daemon's log of the last
run is kept in ``build/testbed/last-main-kmodd.log``.

``resolve_modaliases`` (``KMODD_MAIN_JOB=resolve``): the offline check --
``kmodctl resolve -b`` over every modalias in the guest against
``modprobe -b -R``.  ``KMODD_MAIN_JOB=module:function`` selects any other job.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from testbed.initramfs import BUILD_DIR
from testbed.vm import VM, Completed, GuestTimeout, QMPError

MODALIASES = "find /sys/devices -name modalias -exec cat {} + | sort -u"


def resolve_modaliases(vm: VM) -> int:
    """kmodctl resolve over the guest's modalias files, compared with modprobe -R."""
    out = sys.stdout
    out.write(f"\n== Debian kernel {vm.kernel.version if vm.kernel else '?'} booted in "
              f"{vm.boot_seconds:.1f} s; devices: {', '.join(vm.devices)}\n")
    aliases = vm.run(MODALIASES, timeout=120).check().stdout.split()
    out.write(f"== {len(aliases)} distinct modaliases under /sys/devices\n")
    out.write("== kmodctl resolve -b - (modules each device needs)\n")
    ours = vm.run("kmodctl resolve -b -", input="\n".join(aliases) + "\n", timeout=600)
    if ours.stderr:
        sys.stderr.write(ours.stderr)
    if ours.rc not in (0, 1):  # 1 means some alias resolved to nothing, like modprobe -R
        out.write(ours.stdout)
        out.write(f"== kmodctl resolve failed (exit {ours.rc})\n")
        return ours.rc
    resolved = {}
    for line in ours.stdout.splitlines():
        alias, _, mods = line.partition("\t")
        resolved[alias] = mods.split()
        if mods:
            out.write(f"{mods:<32} {alias[:90]}\n")
    reference = vm.run(
        "for a in $(" + MODALIASES + "); do printf '%s\\t' \"$a\"; "
        "modprobe -b -R \"$a\" 2>/dev/null | tr '\\n' ' '; echo; done", timeout=600).check()
    differ = 0
    for line in reference.stdout.splitlines():
        alias, _, mods = line.partition("\t")
        if sorted(mods.split()) != sorted(resolved.get(alias, [])):
            differ += 1
            out.write(f"   differs from modprobe -b -R: {alias}: kmodd {resolved.get(alias)}"
                      f" modprobe {mods.split()}\n")
    wanted = sorted({m for mods in resolved.values() for m in mods})
    out.write(f"== {len(wanted)} modules wanted: {' '.join(wanted)}\n")
    out.write(f"== agreement with modprobe -b -R: {len(resolved) - differ}/{len(resolved)}\n")
    return 0 if differ == 0 else 1


# --------------------------------------------------------------------------- daemon demo

# The hot-added device: a PCIe NIC whose driver (e1000e) is in Debian's tree
# and is not loaded by the default devices' coldplug.
HOTPLUG_DEVICE = {"driver": "e1000e", "id": "kmodd_demo_nic"}
HOTPLUG_MODULE = "e1000e"
HOTPLUG_MODALIAS = "pci:v00008086d000010D3"
DUMMY_LINK = "x"
AUTOCLEAN_INTERVAL = 2
# Long while coldplug is compared with modprobe (nothing may be unloaded
# before the module list is taken), short for the autoclean milestone.
IDLE_TIMEOUT_START = 3600
IDLE_TIMEOUT = 6
CONF = "/etc/kmodd.conf"          # in the guest's tmpfs overlay: the host's is untouched
HELPER = "/usr/local/libexec/kmodd/kmodd-request"
# Modules with a device bound to one of their drivers; shell builtins only
# (a readlink per device costs seconds under emulation).
BOUND_MODULES = ("for d in /sys/module/*/drivers/*; do for x in \"$d\"/*; do "
                 "[ -L \"$x\" ] && [ \"${x##*/}\" != module ] && "
                 "{ m=${d#/sys/module/}; echo \"${m%%/*}\"; break; }; done; done | sort -u")
MILESTONES = ("coldplug", "hotplug", "kernel request", "autoclean", "daemon alive")


def norm(name: str) -> str:
    return name.replace("-", "_")


def short(text: str, width: int = 58) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


class Narrator:
    """One line per event on *out*, stamped with the seconds since *t0*."""

    def __init__(self, out: IO[str], t0: float) -> None:
        self.out = out
        self.t0 = t0
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        stamp = f"[+{time.monotonic() - self.t0:6.1f}s] "
        with self.lock:
            for i, line in enumerate(text.splitlines() or [""]):
                self.out.write((stamp if i == 0 else " " * len(stamp)) + line + "\n")
            self.out.flush()

    def block(self, text: str, indent: str = "    | ") -> None:
        with self.lock:
            for line in text.rstrip("\n").splitlines():
                self.out.write(" " * 11 + indent + line + "\n")
            self.out.flush()

    def heading(self, text: str) -> None:
        with self.lock:
            self.out.write(f"\n== {text}\n")
            self.out.flush()


_LOG_LINE = re.compile(r"^(?:\d\d:\d\d:\d\d\.\d+ )?kmodd(?:\.\w+)*: (\w+): (.*?)(?: \[(.*)\])?$")


class LogTail(threading.Thread):
    """Follows the daemon's log file (written by the guest into the shared checkout).

    Every complete line is kept in ``lines``; INFO and above are narrated as
    they arrive, with the device they concern.
    """

    def __init__(self, path: Path, narrator: Narrator) -> None:
        super().__init__(daemon=True, name="kmodd-log-tail")
        self.path = path
        self.narrator = narrator
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self._pos = 0
        self._partial = b""

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(0.2)
        self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except OSError:
            return
        if not data:
            return
        self._pos += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        new = [line.decode(errors="replace") for line in complete]
        with self.cond:
            self.lines.extend(new)
            self.cond.notify_all()
        for line in new:
            self.narrate(line)

    def narrate(self, line: str) -> None:
        m = _LOG_LINE.match(line)
        if not m:
            if line.strip():
                self.narrator.say(f"kmodd  {line}")
            return
        level, message, fields = m.groups()
        if level == "DEBUG":
            return
        extra = dict(f.split("=", 1) for f in (fields or "").split() if "=" in f)
        message = re.sub(r" for (\S{40,})$", lambda x: f" for {short(x.group(1), 40)}", message)
        where = extra.get("DEVPATH") or ""
        tag = "kmodd" if level == "INFO" else f"kmodd {level}"
        self.narrator.say(f"{tag:<6} {message}" + (f"  [{where}]" if where else ""))

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> str | None:
        """The first line from index *start* on matching *pattern*, waiting up to *timeout*."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)


def sections(stdout: str) -> dict[str, tuple[int, str]]:
    """Parse ``echo '@@ NAME'; CMD; echo "@@ rc $?"`` blocks into {NAME: (rc, output)}."""
    out: dict[str, tuple[int, str]] = {}
    for m in re.finditer(r"^@@ (\S+)\n(.*?)^@@ rc (\d+)$", stdout, re.S | re.M):
        out[m.group(1)] = (int(m.group(3)), m.group(2))
    return out


def section(name: str, command: str) -> str:
    return f"echo '@@ {name}'; {command}; echo \"@@ rc $?\"\n"


class MilestoneFailed(Exception):
    pass


@dataclass
class Demo:
    vm: VM
    say: Narrator
    log: LogTail
    share: Path
    pid: int = 0
    facts: dict[str, Any] = field(default_factory=dict)
    results: dict[str, str | None] = field(default_factory=dict)  # milestone -> None or failure

    def sh(self, script: str, timeout: float = 300) -> Completed:
        return self.vm.run(script, timeout=timeout)

    def passed(self, milestone: str, detail: str) -> None:
        self.results[milestone] = None
        self.say.say(f"OK     {milestone}: {detail}")

    def failed(self, milestone: str, detail: str) -> None:
        self.results[milestone] = detail
        self.say.say(f"FAILED {milestone}: {detail}")

    def attempt(self, milestone: str, step: Callable[[], str]) -> bool:
        try:
            detail = step()
        except MilestoneFailed as exc:
            self.failed(milestone, str(exc))
            return False
        except (GuestTimeout, QMPError, OSError, ValueError, KeyError) as exc:
            self.failed(milestone, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            return False
        self.passed(milestone, detail)
        return True

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        venv_bin = self.share / ".venv" / "bin"
        script = (
            "set -e\n"
            f"printf 'autoclean_interval = {AUTOCLEAN_INTERVAL}\\nidle_timeout = "
            f"{IDLE_TIMEOUT_START}\\n' >{CONF}\n"
            f"sh {self.share}/contrib/install-request-helper.sh install "
            f"--kmodctl {venv_bin}/kmodctl\n"
            f"setsid {venv_bin}/kmodd --no-journal </dev/null >{self.log.path} 2>&1 &\n"
            "echo \"pid $!\"\n"
            "cut -d' ' -f1 /proc/modules | tr '\\n' ' '\n")
        r = self.sh(script, timeout=120)
        if r.rc != 0:
            raise MilestoneFailed(f"cannot start kmodd (exit {r.rc}): {r.stderr.strip()}")
        lines = r.stdout.splitlines()
        helper = next((x for x in lines if x.startswith("kernel.modprobe")), "")
        self.pid = int(next(x for x in lines if x.startswith("pid "))[4:])
        self.facts["initial"] = set(lines[-1].split()) if lines else set()
        self.say.say(f"{helper.replace('kernel.modprobe =', 'kernel.modprobe ->')}  "
                     "(contrib/install-request-helper.sh install)")
        self.say.say(f"started kmodd --no-journal, pid {self.pid}: autoclean every "
                     f"{AUTOCLEAN_INTERVAL}s, idle timeout {IDLE_TIMEOUT_START}s for now "
                     f"({CONF}); {len(self.facts['initial'])} modules were loaded at boot "
                     "by the test bed's initramfs")

    # ------------------------------------------------------------- coldplug

    def coldplug(self) -> str:
        self.say.heading("1. coldplug: the devices present at boot get their drivers")
        script = (
            "for i in $(seq 600); do [ -S /run/kmodd/control ] && break; sleep 0.1; done\n"
            + section("settle", "kmodctl settle --timeout 600")
            + section("list", "kmodctl list --json")
            + section("modules", "cut -d' ' -f1 /proc/modules")
            + section("modaliases", MODALIASES))
        r = self.sh(script, timeout=900)
        parts = sections(r.stdout)
        if "settle" not in parts:
            raise MilestoneFailed(f"kmodctl settle gave no answer (exit {r.rc}): "
                                  f"{r.stderr.strip()[-300:]}")
        rc, _ = parts["settle"]
        if rc != 0:
            raise MilestoneFailed(f"kmodctl settle --timeout 600 exited {rc}: "
                                  f"{r.stderr.strip()[-300:]}")
        self.say.say("kmodctl settle: coldplug done, nothing pending")
        rc, listing = parts.get("list", (1, ""))
        if rc != 0:
            raise MilestoneFailed(f"kmodctl list --json exited {rc}: {r.stderr.strip()[-300:]}")
        modules: list[dict[str, Any]] = json.loads(listing)
        loaded = set(parts.get("modules", (1, ""))[1].split())
        self.facts["after_coldplug"] = loaded
        resolved = self.reference(parts.get("modaliases", (1, ""))[1].split())
        builtin = self.facts["builtin"]
        by_device = [m for m in modules if m.get("loaded_by_kmodd") and m.get("why")
                     and m["why"].get("kind") in ("coldplug", "modalias")
                     and m["why"].get("role") == "target"]
        others = sorted(m["name"] for m in modules if m.get("loaded_by_kmodd")
                        and m not in by_device)
        self.say.say(f"kmodctl list: kmodd loaded {len(by_device)} drivers for devices "
                     f"(+{len(others)} dependencies and kernel requests):")
        rows = []
        problems: list[str] = []
        for m in sorted(by_device, key=lambda m: m["name"]):
            why = m["why"]
            key = why.get("key", "")
            agree = key in resolved and m["name"] in resolved[key]
            if key not in resolved:
                problems.append(f"{m['name']} loaded for a modalias no device has: {key}")
            elif not agree:
                problems.append(f"{m['name']} loaded for {key}; modprobe -b -R gives "
                                f"{sorted(resolved[key])}")
            rows.append(f"{m['name']:<20} {short(key, 36):<36} {why.get('devpath') or '-'}"
                        + ("" if agree else "   <- not what modprobe -b -R says"))
        self.say.block("\n".join([f"{'module':<20} {'modalias':<36} device", *rows]))
        if others:
            self.say.block(textwrap.fill("and: " + " ".join(others), 100,
                                         subsequent_indent="     "))
        wanted = set().union(*resolved.values()) if resolved else set()
        missing = sorted(wanted - loaded - builtin)
        log = self.log.text()
        refused = []
        failures = re.findall(r"cannot load ([^:]+): (.*)$", log, re.M)
        for name in missing:
            if any(name in mods.split() for mods, _ in failures):
                refused.append(name)
            else:
                problems.append(f"{name} is wanted by a device (modprobe -b -R) but kmodd "
                                "neither loaded it nor reported a failure")
        self.say.say(f"modprobe -b -R over the guest's {len(resolved)} modaliases wants "
                     f"{len(wanted)} modules; kmodd loaded "
                     f"{len(wanted & loaded)}, {len(wanted & builtin)} are built in"
                     + (f"; not loaded, with the failure in kmodd's log: {' '.join(refused)}"
                        if refused else ""))
        if len(by_device) < 10:
            problems.append(f"only {len(by_device)} drivers loaded for devices")
        if HOTPLUG_MODULE in loaded:
            problems.append(f"{HOTPLUG_MODULE} is already loaded: the hotplug would show "
                            "nothing")
        if problems:
            raise MilestoneFailed("; ".join(problems))
        return (f"{len(by_device)} drivers for the devices present, each what "
                "modprobe -b -R resolves for its modalias")

    def reference(self, modaliases: list[str]) -> dict[str, set[str]]:
        """What kmod's ``modprobe -b -R`` resolves each modalias to.

        Run on the host: the guest's root is the host's (same module tree, same
        modprobe.d), and modprobe takes milliseconds here, seconds in the guest.
        """
        version = self.vm.kernel.version if self.vm.kernel else os.uname().release
        resolved: dict[str, set[str]] = {}
        for alias in modaliases:
            r = subprocess.run(["modprobe", "-S", version, "-b", "-R", alias],
                               capture_output=True, text=True, check=False)
            resolved[alias] = {norm(m) for m in r.stdout.split()}
        return resolved

    # -------------------------------------------------------------- hotplug

    def hotplug(self) -> str:
        self.say.heading(f"2. hotplug: an {HOTPLUG_DEVICE['driver']} NIC is plugged in "
                         "(its driver is not loaded yet)")
        mark = self.log.mark()
        t0 = time.monotonic()
        self.vm.qmp("device_add", **HOTPLUG_DEVICE)
        self.say.say(f"QMP device_add driver={HOTPLUG_DEVICE['driver']} "
                     f"id={HOTPLUG_DEVICE['id']}  (ACPI PCI hotplug)")
        line = self.log.wait_for(rf"(loaded|cannot load) .*\b{HOTPLUG_MODULE}\b", 180, mark)
        if line is None:
            raise MilestoneFailed(f"no load of {HOTPLUG_MODULE} in kmodd's log within 180 s "
                                  "of the device_add")
        if "cannot load" in line:
            raise MilestoneFailed(f"kmodd failed: {line}")
        took = time.monotonic() - t0
        r = self.sh(section("why", f"kmodctl why {HOTPLUG_MODULE}")
                    + section("bound", f"ls /sys/bus/pci/drivers/{HOTPLUG_MODULE} | "
                                       "grep ':' || true"), timeout=120)
        parts = sections(r.stdout)
        rc, why = parts.get("why", (1, r.stderr))
        self.say.say(f"$ kmodctl why {HOTPLUG_MODULE}")
        self.say.block(why)
        if rc != 0 or "loaded by kmodd" not in why:
            raise MilestoneFailed(f"kmodctl why {HOTPLUG_MODULE} (exit {rc}) does not say "
                                  f"kmodd loaded it: {why.strip() or r.stderr.strip()}")
        if not re.search(rf"request:\s+modalias {HOTPLUG_MODALIAS}", why, re.I):
            raise MilestoneFailed(f"kmodctl why {HOTPLUG_MODULE} names another request "
                                  f"than the device's modalias {HOTPLUG_MODALIAS}...")
        devices = parts.get("bound", (1, ""))[1].split()
        m = re.search(r"device:\s+(\S+)", why)
        if not devices or not m or m.group(1).rsplit("/", 1)[-1] not in devices:
            raise MilestoneFailed(f"the new device is not bound to {HOTPLUG_MODULE} "
                                  f"(bound: {devices or 'none'})")
        return (f"{HOTPLUG_MODULE} loaded by kmodd {took:.1f} s after the device_add, "
                f"the NIC {devices[0]} is bound to it")

    # ------------------------------------------------------- kernel request

    def kernel_request(self) -> str:
        self.say.heading("3. kernel request: the kernel asks for a module "
                         "(request_module -> kmodd-request -> kmodd)")
        self.say.say(f"$ ip link add {DUMMY_LINK} type dummy    "
                     "(dummy is not loaded: the kernel asks for rtnl-link-dummy)")
        r = self.sh("grep -q '^dummy ' /proc/modules && echo 'dummy already loaded'\n"
                    + section("ip", f"t0=$(date +%s%N); ip link add {DUMMY_LINK} type dummy; "
                                    "rc=$?; t1=$(date +%s%N); "
                                    "echo \"took $(( (t1 - t0) / 1000000 )) ms\"; "
                                    f"ip -o link show {DUMMY_LINK} | cut -c1-90; "
                                    "(exit $rc)")
                    # The kernel hears back before kmodd records the load.
                    + section("why", "kmodctl settle --timeout 60 >/dev/null; kmodctl why dummy"),
                    timeout=180)
        if "dummy already loaded" in r.stdout:
            raise MilestoneFailed("dummy was loaded before the request")
        parts = sections(r.stdout)
        rc, ip_out = parts.get("ip", (1, r.stderr))
        took = re.search(r"took (\d+) ms", ip_out)
        self.say.block(ip_out)
        if rc != 0:
            raise MilestoneFailed(f"ip link add {DUMMY_LINK} type dummy exited {rc}: "
                                  f"{r.stderr.strip()}")
        rc, why = parts.get("why", (1, ""))
        self.say.say("$ kmodctl why dummy")
        self.say.block(why)
        if rc != 0 or "loaded by kmodd" not in why or \
                not re.search(r"request:\s+kernel rtnl-link-dummy", why):
            raise MilestoneFailed(f"kmodctl why dummy (exit {rc}) does not name the kernel's "
                                  f"rtnl-link-dummy request: {why.strip() or r.stderr.strip()}")
        self.facts["dummy"] = True
        return ("ip link add succeeded through kmodd-request"
                + (f" in {took.group(1)} ms" if took else "")
                + "; kmodd loaded dummy for rtnl-link-dummy")

    # ------------------------------------------------------------ autoclean

    def autoclean(self) -> str:
        self.say.heading("4. autoclean: unused modules kmodd loaded go away, "
                         "bound drivers stay")
        if not self.facts.get("dummy"):
            raise MilestoneFailed("skipped: the kernel request did not load dummy")
        r = self.sh(BOUND_MODULES, timeout=120)
        bound = set(r.stdout.split())
        if not {"e1000", HOTPLUG_MODULE} <= bound:
            raise MilestoneFailed(f"cannot tell which drivers are bound (e1000 and "
                                  f"{HOTPLUG_MODULE} should be): {r.stdout.strip()!r} "
                                  f"{r.stderr.strip()}")
        self.say.say(f"modules whose drivers have a device bound: {' '.join(sorted(bound))}")
        shorten = f"sed -i 's/^idle_timeout = .*/idle_timeout = {IDLE_TIMEOUT}/' {CONF}"
        self.say.say(f"$ ip link del {DUMMY_LINK}; {shorten}; kill -HUP {self.pid}   "
                     "(SIGHUP reloads, as systemctl reload kmodd)")
        mark = self.log.mark()
        t0 = time.monotonic()
        r = self.sh(f"ip link del {DUMMY_LINK} || exit 1\n{shorten} || exit 2\n"
                    f"kill -HUP {self.pid} || exit 3\n", timeout=120)
        if r.rc != 0:
            raise MilestoneFailed(f"ip link del / reload failed (exit {r.rc}): {r.stderr}")
        limit = IDLE_TIMEOUT + 4 * AUTOCLEAN_INTERVAL + 90
        line = self.log.wait_for(r"autoclean: (unloaded|could not unload) dummy\b", limit, mark)
        if line is None:
            raise MilestoneFailed(f"dummy still not unloaded {limit} s after its link went")
        if "could not" in line:
            raise MilestoneFailed(line)
        took = time.monotonic() - t0
        r = self.sh("cut -d' ' -f1 /proc/modules", timeout=120)
        still = set(r.stdout.split())
        if "dummy" in still:
            raise MilestoneFailed("kmodd logged the unload, yet dummy is in /proc/modules")
        gone = sorted(m for m in bound if m not in still and m not in self.facts["builtin"])
        if gone:
            raise MilestoneFailed(f"autoclean unloaded drivers bound to devices: {gone}")
        initial_gone = sorted(self.facts["initial"] - still)
        if initial_gone:
            raise MilestoneFailed(f"autoclean unloaded modules kmodd did not load: "
                                  f"{initial_gone}")
        cleaned = sorted(self.facts.get("after_coldplug", set()) - still - {"dummy"})
        return (f"dummy unloaded {took:.0f} s after its link went; "
                + (f"also unused and unloaded: {' '.join(cleaned)}; " if cleaned else "")
                + f"all {len(bound)} bound drivers and the boot's own modules stay")

    # --------------------------------------------------------------- finale

    def alive(self) -> str:
        self.say.heading("5. the daemon at the end")
        r = self.sh(section("status", "kmodctl status")
                    + section("alive", f"kill -0 {self.pid}"), timeout=120)
        parts = sections(r.stdout)
        rc, status = parts.get("status", (1, r.stderr))
        self.say.say("$ kmodctl status")
        self.say.block(status)
        if parts.get("alive", (1, ""))[0] != 0:
            raise MilestoneFailed(f"kmodd (pid {self.pid}) is no longer running")
        if rc != 0:
            raise MilestoneFailed(f"kmodctl status exited {rc}: {r.stderr.strip()}")
        if "Traceback" in self.log.text():
            raise MilestoneFailed("kmodd's log has a Python traceback")
        return f"kmodd pid {self.pid} still running and answering, no traceback in its log"


def daemon_demo(vm: VM) -> int:
    """kmodd in the guest: coldplug, a hotplug, a kernel request, an autoclean."""
    out = sys.stdout
    t0 = time.monotonic() - (vm.boot_seconds or 0.0)
    narrator = Narrator(out, t0)
    version = vm.kernel.version if vm.kernel else os.uname().release
    narrator.heading(f"kmodd on Debian's kernel {version} under QEMU "
                     f"({len(vm.devices)} emulated devices, no udevd)")
    narrator.say(f"guest booted in {vm.boot_seconds or 0:.1f} s")
    log_path = vm.rundir / "kmodd.log"
    tail = LogTail(log_path, narrator)
    demo = Demo(vm, narrator, tail, vm.share)
    builtin_file = Path(f"/lib/modules/{version}/modules.builtin")
    demo.facts["builtin"] = {norm(x.rsplit("/", 1)[-1].removesuffix(".ko"))
                             for x in builtin_file.read_text().split()} \
        if builtin_file.exists() else set()
    tail.start()
    try:
        try:
            demo.start()
        except (MilestoneFailed, GuestTimeout, StopIteration, ValueError) as exc:
            narrator.say(f"FAILED start: {exc}")
            demo.results = dict.fromkeys(MILESTONES, "kmodd did not start")
        else:
            demo.attempt("coldplug", demo.coldplug)
            demo.attempt("hotplug", demo.hotplug)
            demo.attempt("kernel request", demo.kernel_request)
            demo.attempt("autoclean", demo.autoclean)
            demo.attempt("daemon alive", demo.alive)
    finally:
        tail.stop.set()
        tail.join(5)
        with contextlib.suppress(OSError):
            (BUILD_DIR / "last-main-kmodd.log").write_text(tail.text() + "\n")
    failed = {k: v for k, v in demo.results.items() if v is not None}
    narrator.heading("summary")
    for name in MILESTONES:
        state = "not reached" if name not in demo.results else \
            "FAILED" if demo.results[name] else "met"
        narrator.say(f"{name:<15} {state}")
    if failed or len(demo.results) < len(MILESTONES):
        names = ", ".join(failed) or "not all reached"
        out.write(f"\nkmodd main job FAILED: {names}\n")
        out.flush()
        sys.stderr.write(f"--- kmodd log (tail; whole log in {BUILD_DIR}/last-main-kmodd.log)\n"
                         + "\n".join(tail.lines[-60:]) + "\n")
        return 1
    out.write(f"\nkmodd main job: every milestone met in {time.monotonic() - t0:.0f} s "
              "(boot included)\n")
    out.flush()
    return 0


JOBS: dict[str, Callable[[VM], int]] = {"daemon": daemon_demo, "resolve": resolve_modaliases}
JOB: Callable[[VM], int] = daemon_demo


def selected_job() -> Callable[[VM], int]:
    """``KMODD_MAIN_JOB``: unset -> JOB; ``daemon`` / ``resolve``; or ``module:function``."""
    spec = os.environ.get("KMODD_MAIN_JOB")
    if not spec:
        return JOB
    if spec in JOBS:
        return JOBS[spec]
    module, _, name = spec.partition(":")
    job: Callable[[VM], int] = getattr(importlib.import_module(module), name)
    return job


def main(devices: list[str] | None = None, console: bool = False) -> int:
    """The README's main job.  By default (or ``KMODD_MAIN_JOB=boot``) kmodd as
    the loader of a booted Debian machine (``testbed/boot_job.py``); otherwise
    boot the busybox test bed, run the selected job (``daemon``: the daemon
    started from a shell; ``resolve``; ``module:function``), shut down.  The
    guest console goes to stderr with *console*, and its tail on failure
    otherwise."""
    if os.environ.get("KMODD_MAIN_JOB", "boot") in ("", "boot"):
        from testbed.boot_job import main as boot_job

        return boot_job(console)
    job = selected_job()
    vm = VM(devices, console=sys.stderr if console else None)
    rc = 1
    try:
        vm.boot()
        vm.verify_share()
        rc = job(vm)
        return rc
    finally:
        vm.shutdown()
        if rc != 0 and not console:
            sys.stderr.write("--- guest console (tail; whole console in "
                             f"{BUILD_DIR}/last-console.log)\n{vm.console_tail(40)}\n")
