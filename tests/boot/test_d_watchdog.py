"""A wedged kmodd is restarted by the watchdog, keeps its state, and strands no request."""

from __future__ import annotations

import json
import time

from testbed.boot import BootVM

from .conftest import Snapshot

DROPIN = "/run/systemd/system/kmodd.service.d/50-test-watchdog.conf"
WATCHDOG_SEC = 5
# A kernel request made while kmodd is frozen must return within this bound
# (answered by the next instance, or loaded directly).
REQUEST_BOUND = 60.0


def _main_pid(vm: BootVM) -> tuple[int, int, str]:
    r = vm.run("systemctl show kmodd.service -p MainPID -p NRestarts -p ActiveState",
               check=True)
    props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return int(props["MainPID"]), int(props["NRestarts"]), props["ActiveState"]


def _attributed(vm: BootVM) -> dict[str, str]:
    mods = json.loads(vm.run("kmodctl list --json", check=True).stdout)
    return {m["name"]: (m.get("why") or {}).get("devpath", "")
            for m in mods if m.get("loaded_by_kmodd")}


def test_watchdog_restart_keeps_state_and_answers_requests(kmodd_vm: BootVM,
                                                           kmodd_boot: Snapshot) -> None:
    vm = kmodd_vm
    # A shorter watchdog (the unit says 30 s) keeps the test short.
    vm.run(f"mkdir -p {DROPIN.rsplit('/', 1)[0]} && "
           f"printf '[Service]\\nWatchdogSec={WATCHDOG_SEC}s\\n' >{DROPIN} && "
           "systemctl daemon-reload && systemctl restart kmodd.service && "
           "kmodctl settle --timeout 120", timeout=300, check=True)
    try:
        before = _attributed(vm)
        # Devices kmodd loaded drivers for (e1000 among them since test_b).
        assert any(d and d.startswith("/devices/pci") for d in before.values()), before
        pid, restarts, _ = _main_pid(vm)
        # Freeze kmodd, then make the kernel ask for a module nobody has loaded.
        r = vm.run(f"kill -STOP {pid}; start=$(cut -d' ' -f1 /proc/uptime); "
                   "ip link add kdv0 type veth peer name kdv1; rc=$?; "
                   "echo \"$rc $start $(cut -d' ' -f1 /proc/uptime)\"",
                   timeout=REQUEST_BOUND + 60)
        rc, start, end = r.stdout.split()[-3:]
        assert rc == "0", r
        took = float(end) - float(start)
        print(f"\nkernel request while kmodd was frozen returned after {took:.1f} s")
        assert took < REQUEST_BOUND, took
        deadline = time.monotonic() + 120
        while True:
            new_pid, new_restarts, state = _main_pid(vm)
            if new_pid not in (0, pid) and state == "active":
                break
            assert time.monotonic() < deadline, (new_pid, new_restarts, state)
            time.sleep(2)
        assert new_restarts == restarts + 1
        log = vm.run("journalctl -b -u kmodd.service --no-pager -o cat", check=True).stdout
        assert "Watchdog timeout" in log, log[-3000:]
        vm.run("kmodctl settle --timeout 120", timeout=180, check=True)
        after = _attributed(vm)
        # The new instance still knows what the old one loaded and for which device.
        for name, devpath in before.items():
            assert after.get(name) == devpath, (name, devpath, after.get(name))
        vm.run("ip link del kdv0", check=True)
    finally:
        vm.run(f"rm -f {DROPIN}; systemctl daemon-reload; systemctl restart kmodd.service; "
               "kmodctl settle --timeout 120", timeout=300)
