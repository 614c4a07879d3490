"""kmodd end to end on Debian's real kernel, in ONE boot of the QEMU test bed.

The daemon starts in the guest (no udevd there) with the kernel's
request_module() helper pointed at contrib/kmodd-request, then:

1. coldplug loads what ``modprobe -b -R`` resolves for every device's
   modalias (a module it could not load, modprobe cannot load either), and
   nothing a modalias did not ask for;
2. a device hot-added through QMP gets its driver, through two uevents
   (the PCI function, then the virtio device its bus driver creates);
3. ``ip link add x type dummy`` succeeds through the helper and loads dummy;
4. after ``ip link del x`` autoclean removes dummy, while every driver bound
   to a device stays;
5. ``kmodctl settle``, ``status --json`` and ``why`` answer correctly, and
   the daemon is still alive at the end.

Python is slow in the guest (seconds per interpreter), so every step is one
shell script per ``vm.run`` and kmodctl calls are batched.  The tests share
the boot and run in file order; each asserts one part of the story.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testbed.vm import VM, Completed

LOG = "/tmp/kmodd.log"
CONF = "/tmp/kmodd.toml"
AUTOCLEAN_INTERVAL = 3
# While coldplug is compared with modprobe, autoclean must not unload what
# coldplug loaded (coldplug takes minutes under emulation on a busy host):
# the daemon starts with a long idle timeout, and the autoclean step
# shortens it through kmodd.conf and `kmodctl reload`.
IDLE_TIMEOUT_START = 3600
IDLE_TIMEOUT = 10
HOTPLUG = {"driver": "virtio-balloon-pci", "id": "kmodd_e2e_balloon"}
MODALIASES = "find /sys/devices -name modalias -exec cat {} + | sort -u"


def norm(name: str) -> str:
    return name.replace("-", "_")


class Guest:
    """The booted guest plus what the scenario learned so far."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.facts: dict[str, Any] = {}
        # Everything the guest runs comes from the clone under test.
        self.checkout = str(vm.share)
        self.helper = f"{self.checkout}/contrib/kmodd-request"

    def sh(self, script: str, timeout: float = 300, *, ok: bool = True) -> Completed:
        result = self.vm.run(script, timeout=timeout)
        if ok and result.rc != 0:
            raise AssertionError(
                f"guest command failed (rc={result.rc}):\n{script}\n--- stdout\n"
                f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}\n"
                f"--- kmodd log\n{self.log_tail()}")
        return result

    def log_tail(self, lines: int = 60) -> str:
        r = self.vm.run(f"tail -n {lines} {LOG} 2>&1", timeout=60)
        return r.stdout

    def kmodctl_json(self, *commands: str, timeout: float = 300) -> list[Any]:
        """Run several ``kmodctl ... --json`` in one guest round trip."""
        parts = []
        for i, command in enumerate(commands):
            parts.append(f"echo '@@{i}'; kmodctl {command} --json; echo \"@@rc $?\"")
        out = self.sh("; ".join(parts), timeout=timeout).stdout
        results: list[Any] = []
        for i, command in enumerate(commands):
            m = re.search(rf"@@{i}\n(.*?)@@rc (\d+)\n", out, re.S)
            assert m, f"no output for kmodctl {command}:\n{out[-2000:]}"
            assert m.group(2) == "0", f"kmodctl {command} exited {m.group(2)}:\n{m.group(1)}"
            results.append(json.loads(m.group(1)))
        return results

    def loaded(self) -> set[str]:
        out = self.sh("cut -d' ' -f1 /proc/modules").stdout
        return set(out.split())


@pytest.fixture(scope="module")
def guest(fresh_vm: Callable[..., VM]) -> Iterator[Guest]:
    vm = fresh_vm()   # Debian's kernel, the dozen default devices, no udevd
    g = Guest(vm)
    g.facts["initial_modules"] = g.loaded()
    g.facts["builtin"] = {
        norm(line.rsplit("/", 1)[-1].removesuffix(".ko"))
        for line in g.sh("cat /lib/modules/$(uname -r)/modules.builtin").stdout.split()}
    # The kernel's helper first, as a booted system would have it (sysctl.d),
    # so requests made by drivers during coldplug go through the daemon too.
    g.sh(f"echo {g.helper} > /proc/sys/kernel/modprobe && cat /proc/sys/kernel/modprobe")
    start = g.sh(
        f"printf 'autoclean_interval = {AUTOCLEAN_INTERVAL}\\nidle_timeout = "
        f"{IDLE_TIMEOUT_START}\\n' >{CONF}; date +%s.%N; "
        f"setsid {g.checkout}/.venv/bin/kmodd --config {CONF} --no-journal --log-level debug "
        f"</dev/null >{LOG} 2>&1 & echo $!").stdout.split()
    g.facts["started_at"], g.facts["pid"] = float(start[0]), int(start[1])
    # settle blocks until coldplug is done and nothing is pending; the module
    # list is taken in the same breath, before autoclean could touch anything.
    r = g.sh("for i in $(seq 600); do [ -S /run/kmodd/control ] && break; sleep 0.1; done; "
             "kmodctl settle --timeout 900; rc=$?; date +%s.%N; echo \"settle=$rc\"; "
             "echo @@modules; cut -d' ' -f1 /proc/modules", timeout=1200, ok=False)
    g.facts["settle_output"] = r.stdout + r.stderr
    m = re.search(r"([0-9.]+)\nsettle=(\d+)\n@@modules\n(.*)", r.stdout, re.S)
    assert m, f"settle step printed nothing useful:\n{r.stdout}\n{r.stderr}\n{g.log_tail()}"
    g.facts["settled_at"] = float(m.group(1))
    g.facts["settle_rc"] = int(m.group(2))
    g.facts["after_coldplug"] = set(m.group(3).split())
    try:
        yield g
    finally:
        print(f"\n--- kmodd log (tail)\n{g.log_tail(80)}")


def test_daemon_settles_after_coldplug(guest: Guest) -> None:
    f = guest.facts
    assert f["settle_rc"] == 0, f"kmodctl settle failed:\n{f['settle_output']}\n{guest.log_tail()}"
    print(f"\ncoldplug: kmodd start to settled {f['settled_at'] - f['started_at']:.1f} s, "
          f"{len(f['after_coldplug'] - f['initial_modules'])} modules loaded")
    (status,) = guest.kmodctl_json("status")
    assert status["ok"] and status["ready"] and status["settled"]
    assert status["coldplug"] == "done"
    assert status["pid"] == f["pid"]
    assert not status["stopping"]
    assert status["pending"] == 0
    assert set(status["sources"]) >= {"UeventSource", "KernelRequestSource"}
    assert status["autoclean"]["interval"] == AUTOCLEAN_INTERVAL
    assert status["autoclean"]["idle_timeout"] == IDLE_TIMEOUT_START
    assert status["runaway"] in ([], {}, None, 0)


def test_coldplug_loads_what_modprobe_resolves(guest: Guest) -> None:
    f = guest.facts
    ref = guest.sh(
        f"for a in $({MODALIASES}); do printf '%s\\t' \"$a\"; "
        "modprobe -b -R \"$a\" 2>/dev/null | tr '\\n' ' '; echo; done", timeout=900).stdout
    resolved: dict[str, set[str]] = {}
    for line in ref.splitlines():
        alias, _, mods = line.partition("\t")
        resolved[alias] = {norm(m) for m in mods.split()}
    f["resolved"] = resolved
    wanted = set().union(*resolved.values())
    assert {"e1000", "virtio_rng", "i6300esb", "snd_hda_intel", "ehci_pci", "usbhid",
            "uhci_hcd", "snd_ens1370", "pcnet32", "virtio_net", "sym53c8xx",
            "sdhci_pci", "ahci"} <= wanted, "the test bed's devices changed"
    problems: list[str] = []
    # Nothing a modalias did not ask for: every module kmodd loaded as the
    # target of a device request is what modprobe resolves for that modalias.
    (modules,) = guest.kmodctl_json("list")
    by_device = [m for m in modules if m["loaded_by_kmodd"] and m["why"]
                 and m["why"]["kind"] in ("coldplug", "modalias")
                 and m["why"]["role"] == "target"]
    assert len(by_device) >= 10, modules
    for m in by_device:
        key = m["why"]["key"]
        if key not in resolved:
            problems.append(f"{m['name']} loaded for a modalias no device has: {key}")
        elif m["name"] not in resolved[key]:
            problems.append(f"{m['name']} loaded for {key}, modprobe -b -R gives "
                            f"{sorted(resolved[key])}")
    # Everything a modalias asks for is loaded, or the kernel refused it
    # (no such hardware feature, ENODEV...) and kmod's modprobe fails too.
    missing = sorted(wanted - f["after_coldplug"] - f["builtin"])
    if missing:
        r = guest.sh("for m in " + " ".join(missing) + "; do modprobe -b \"$m\" >/dev/null "
                     "2>&1; echo \"$m $?\"; done", timeout=900)
        loads = dict(line.split() for line in r.stdout.splitlines())
        modprobe_loaded = [m for m, rc in loads.items() if rc == "0"]
        if modprobe_loaded:
            # What kmodd said about them (a failure, a backoff...).
            said = guest.sh(f"grep -a -E ': (backoff|runaway) \\(' {LOG} | sed -E "
                            "'s/feature:[0-9A-F,]*/feature:.../g' | cut -c1-400 | sort -u "
                            "| head -8", ok=False).stdout
            problems.append(f"kmodd did not load {modprobe_loaded}, which modprobe -b then "
                            f"loaded; kmodd's log says:\n{said}")
    print(f"\ncoldplug vs modprobe -b -R: {len(resolved)} modaliases, {len(wanted)} modules "
          f"wanted, {len(by_device)} loaded by kmodd as device targets; not loaded (the "
          f"kernel refused them, modprobe -b fails too): {' '.join(missing) or 'none'}")
    assert not problems, "\n".join(problems)


def test_why_names_the_device(guest: Guest) -> None:
    (why,) = guest.kmodctl_json("why e1000")
    assert why["loaded_by_kmodd"] and why["state"] == "live"
    assert why["kind"] == "coldplug" and why["requested_by"] == "coldplug"
    assert why["key"].startswith("pci:v00008086d0000100E")
    assert why["devpath"].startswith("/devices/pci0000:00/")
    dev = guest.sh(f"cat /sys{why['devpath']}/modalias; "
                   f"basename $(readlink /sys{why['devpath']}/driver)").stdout.split()
    assert dev == [why["key"], "e1000"]


def test_hotplugged_device_gets_its_driver(guest: Guest) -> None:
    assert "virtio_balloon" not in guest.loaded()
    guest.facts["bound_before_hotplug"] = bound_modules(guest)
    t0 = time.monotonic()
    guest.vm.qmp("device_add", **HOTPLUG)
    guest.sh("for i in $(seq 1200); do grep -q '^virtio_balloon ' /proc/modules && exit 0; "
             "sleep 0.1; done; echo 'virtio_balloon never loaded' >&2; exit 1", timeout=200)
    print(f"\nhotplug: virtio-balloon-pci added to driver loaded in {time.monotonic() - t0:.1f} s")
    settle, why = guest.kmodctl_json("settle --timeout 120", "why virtio_balloon")
    assert settle["settled"]
    assert why["loaded_by_kmodd"]
    assert why["kind"] == "modalias" and why["requested_by"] == "uevent"
    assert why["key"].startswith("virtio:d00000005v")
    assert why["devpath"] and "/virtio" in why["devpath"]
    # The balloon device is bound to the driver kmodd loaded.
    guest.sh(f"readlink /sys{why['devpath']}/driver | grep -q virtio_balloon")


def test_kernel_request_through_the_helper(guest: Guest) -> None:
    assert guest.sh("cat /proc/sys/kernel/modprobe").stdout.strip() == guest.helper
    assert "dummy" not in guest.loaded()
    r = guest.sh("t0=$(date +%s%N); ip link add x type dummy; rc=$?; t1=$(date +%s%N); "
                 "echo \"rc=$rc ms=$(( (t1 - t0) / 1000000 ))\"; ip -o link show x",
                 ok=False)
    assert "rc=0" in r.stdout, f"ip link add failed:\n{r.stdout}\n{r.stderr}\n{guest.log_tail()}"
    assert "dummy" in guest.loaded()
    # The kernel hears back before kmodd records the load: settle first.
    _, why = guest.kmodctl_json("settle --timeout 120", "why dummy")
    assert why["loaded_by_kmodd"]
    assert why["kind"] == "kernel" and why["requested_by"] == "kernel"
    assert why["key"] == "rtnl-link-dummy"
    # The helper's own cost with the daemon answering (module present),
    # next to modprobe's, on the same guest: informational figures.
    timing = guest.sh(
        f"t0=$(date +%s%N); for i in $(seq 50); do {guest.helper} -q -- dummy || exit 1; done; "
        "t1=$(date +%s%N); for i in $(seq 50); do modprobe -q dummy || exit 1; done; "
        "t2=$(date +%s%N); echo $(( (t1 - t0) / 50000 )) $(( (t2 - t1) / 50000 ))").stdout
    helper_us, modprobe_us = (int(x) for x in timing.split())
    print(f"\nkernel request: {r.stdout.split()[1]}; helper round trip {helper_us} us, "
          f"modprobe {modprobe_us} us (module present, mean of 50)")
    guest.facts["dummy_loaded"] = True


def test_autoclean_removes_dummy_but_keeps_bound_drivers(guest: Guest) -> None:
    assert guest.facts.get("dummy_loaded"), "the kernel request step did not load dummy"
    bound = guest.facts["bound_before_hotplug"] | bound_modules(guest)
    assert {"e1000", "virtio_balloon"} <= bound
    # Shorten the idle timeout: edit kmodd.conf and reload, as an admin would.
    guest.sh(f"printf 'autoclean_interval = {AUTOCLEAN_INTERVAL}\\n"
             f"idle_timeout = {IDLE_TIMEOUT}\\n' >{CONF}")
    reload, status = guest.kmodctl_json("reload", "status")
    assert reload["ok"] and status["autoclean"]["idle_timeout"] == IDLE_TIMEOUT
    # While link x exists dummy stays, although its refcount is 0: rmmod would
    # destroy the interface.
    time.sleep(IDLE_TIMEOUT + 3 * AUTOCLEAN_INTERVAL)
    (why,) = guest.kmodctl_json("why dummy")
    assert why["state"] == "live", "autoclean unloaded dummy while link x existed"
    assert "type dummy" in why.get("autoclean", ""), why
    # A dummy link in another network namespace (a container's) keeps it too:
    # rmmod dummy would delete that link as well.
    guest.sh("ip netns add kmodd_c1 && ip -n kmodd_c1 link add y type dummy && ip link del x")
    time.sleep(IDLE_TIMEOUT + 3 * AUTOCLEAN_INTERVAL)
    (why,) = guest.kmodctl_json("why dummy")
    assert why["state"] == "live", "autoclean unloaded dummy while a namespace had a dummy link"
    assert "type dummy" in why.get("autoclean", ""), why
    guest.sh("ip netns del kmodd_c1")
    wait = IDLE_TIMEOUT + 4 * AUTOCLEAN_INTERVAL + 60
    t0 = time.monotonic()
    guest.sh(f"for i in $(seq {wait * 2}); do grep -q '^dummy ' /proc/modules || exit 0; "
             "sleep 0.5; done; echo 'dummy still loaded' >&2; exit 1", timeout=wait + 60)
    print(f"\nautoclean: dummy unloaded {time.monotonic() - t0:.0f} s after its link went")
    still = guest.loaded()
    gone = sorted(m for m in bound if m not in still and m not in guest.facts["builtin"])
    assert not gone, f"autoclean unloaded drivers bound to devices: {gone}"
    (status,) = guest.kmodctl_json("status")
    assert status["autoclean"]["unloaded"] >= 1
    # Modules the daemon did not load are never touched by autoclean.
    assert guest.facts["initial_modules"] <= still


def test_autoclean_leaves_a_module_someone_else_loaded_again(guest: Guest) -> None:
    """kmodd loads dummy for a kernel request; the administrator reloads it with
    another option: that load is theirs, and autoclean must not touch it."""
    first = guest.sh("ip link add z type dummy && ip link del z && "
                     "stat -c %i /sys/module/dummy").stdout.split()[-1]
    _, why = guest.kmodctl_json("settle --timeout 120", "why dummy")
    assert why["loaded_by_kmodd"], why
    second = guest.sh("modprobe -r dummy && modprobe dummy numdummies=0 && "
                      "stat -c %i /sys/module/dummy").stdout.split()[-1]
    assert first != second, "the kernel reused the sysfs inode: not a load identity"
    time.sleep(IDLE_TIMEOUT + 4 * AUTOCLEAN_INTERVAL)
    assert "dummy" in guest.loaded(), "autoclean unloaded a module the admin loaded again"
    (why,) = guest.kmodctl_json("why dummy")
    assert not why["loaded_by_kmodd"], why
    guest.sh("modprobe -r dummy")


def test_install_command_writing_sys(guest: Guest) -> None:
    """An install command that writes to /sys, as modprobe would run it.  The
    test bed has no systemd, so kmodd runs it with /bin/sh directly (under
    systemd it goes through a transient unit, tests/unit/test_commands.py)."""
    param = "/sys/module/printk/parameters/time"
    guest.sh(f"echo N > {param} && mkdir -p /etc/modprobe.d && "
             "echo 'install kmodd_sys_test echo Y > /sys/module/printk/parameters/time' "
             "> /etc/modprobe.d/kmodd-e2e.conf")
    try:
        reload, load = guest.kmodctl_json("reload", "load kmodd_sys_test")
        assert reload["ok"] and load["ok"], load
        assert guest.sh(f"cat {param}").stdout.strip() == "Y"
    finally:
        guest.sh(f"rm -f /etc/modprobe.d/kmodd-e2e.conf; echo Y > {param}")


def test_daemon_is_still_alive(guest: Guest) -> None:
    pid = guest.facts["pid"]
    guest.sh(f"kill -0 {pid}")
    (status,) = guest.kmodctl_json("status")
    assert status["pid"] == pid and status["ready"] and not status["stopping"]
    log = guest.sh(f"cat {LOG}").stdout
    assert "Traceback" not in log, log[-4000:]


def test_module_init_asking_for_a_module_with_one_worker(guest: Guest) -> None:
    """tcrypt's init asks the kernel for "crypto-sha3-256" (request_module()
    from inside finit_module) and waits for the answer.  With one worker,
    that worker is inside tcrypt's init: the requested sha3_generic must
    load on a thread of its own, or init and helper wait on each other for
    ever (seen here before the scheduler gave such loads their own thread).
    tcrypt fails its init with EAGAIN by design once the algorithm (type 14:
    a shash) was found, ENOENT when it was not."""
    pid = guest.facts["pid"]
    guest.sh(f"kill {pid}; for i in $(seq 300); do kill -0 {pid} 2>/dev/null || break; "
             "sleep 0.1; done; ! kill -0 " + str(pid))
    assert "sha3_generic" not in guest.loaded() and "tcrypt" not in guest.loaded()
    r = guest.sh(
        f"setsid {guest.checkout}/.venv/bin/kmodd --max-workers 1 --no-coldplug --no-journal "
        f"--log-level debug </dev/null >>{LOG} 2>&1 & "
        "for i in $(seq 600); do kmodctl status >/dev/null 2>&1 && break; sleep 0.1; done; "
        "timeout 120 kmodctl load --json tcrypt alg=sha3-256 type=14; echo \"rc=$?\"",
        timeout=300,
        ok=False)
    assert "rc=124" not in r.stdout, f"kmodctl load hung:\n{r.stdout}\n{guest.log_tail()}"
    reply = json.loads(r.stdout[:r.stdout.rindex("rc=")])
    assert not reply["ok"] and "tcrypt" not in guest.loaded()
    assert reply["errno"] == 11, reply          # EAGAIN: found, tcrypt's own verdict
    assert "sha3_generic" in guest.loaded()
    (why,) = guest.kmodctl_json("why sha3_generic")
    assert why["kind"] == "kernel" and why["key"] == "crypto-sha3-256", why
    (status,) = guest.kmodctl_json("status")
    assert status["workers"] == 1, status


def bound_modules(guest: Guest) -> set[str]:
    """Modules whose drivers have a device bound right now."""
    out = guest.sh("for l in /sys/bus/*/devices/*/driver; do "
                   "[ -e \"$l/module\" ] && basename $(readlink -f \"$l/module\"); "
                   "done | sort -u").stdout
    return set(out.split())
