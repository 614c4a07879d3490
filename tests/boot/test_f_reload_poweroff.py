"""systemctl reload applies /etc/kmodd.conf; a poweroff does not wait for kmodd."""

from __future__ import annotations

import json
import re

from testbed.boot import BootVM

from .conftest import Snapshot

# systemd's catalog ids (sd-messages.h): a unit stopping ("Stopping ...") and stopped.
_UNIT_STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"
_UNIT_STOPPED = "9d1aaa27d60140bd96365438aad20286"


def _status(vm: BootVM) -> dict[str, object]:
    st: dict[str, object] = json.loads(vm.run("kmodctl status --json", check=True).stdout)
    return st


def test_reload_applies_changed_config(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> None:
    vm = kmodd_vm
    before = _status(vm)
    assert before["autoclean"]["idle_timeout"] != 1234  # type: ignore[index]
    pid = vm.run("systemctl show -p MainPID --value kmodd.service", check=True).stdout.strip()
    had = vm.run("test -e /etc/kmodd.conf && cp /etc/kmodd.conf /etc/kmodd.conf.orig").rc == 0
    try:
        vm.run("printf 'idle_timeout = 1234\\n' >>/etc/kmodd.conf && "
               "systemctl reload kmodd.service", check=True)
        after = _status(vm)
        assert after["autoclean"]["idle_timeout"] == 1234, after  # type: ignore[index]
        assert after["reloads"] == int(before["reloads"]) + 1  # type: ignore[call-overload]
        assert not after.get("last_reload_error"), after
        assert vm.run("systemctl show -p MainPID --value kmodd.service",
                      check=True).stdout.strip() == pid, "reload must not restart kmodd"
    finally:
        restore = "mv /etc/kmodd.conf.orig /etc/kmodd.conf" if had else "rm -f /etc/kmodd.conf"
        vm.run(f"{restore}; systemctl reload kmodd.service", check=True)


def test_poweroff_stops_kmodd_quickly(kmodd_vm: BootVM, power_cycle: str) -> None:
    """The power cycle stopped a running kmodd: read the ended boot's journal."""
    vm = kmodd_vm
    # Filtered here (-u missed PID 1's "Stopped" line of a late shutdown):
    # PID 1's lines about the unit carry UNIT=, kmodd's own _SYSTEMD_UNIT=.
    r = vm.run(f"journalctl -b {power_cycle.replace('-', '')} -o json --no-pager "
               "_PID=1 + _SYSTEMD_UNIT=kmodd.service", timeout=300, check=True)
    entries = [e for e in map(json.loads, filter(str.strip, r.stdout.splitlines()))
               if "kmodd.service" in (e.get("UNIT"), e.get("_SYSTEMD_UNIT"))]
    started = [e for e in entries if e.get("MESSAGE_ID") == _UNIT_STOPPING]
    stopped = [e for e in entries if e.get("MESSAGE_ID") == _UNIT_STOPPED]
    assert started and stopped, [e.get("MESSAGE") for e in entries][-20:]
    took = (int(stopped[-1]["__MONOTONIC_TIMESTAMP"])
            - int(started[-1]["__MONOTONIC_TIMESTAMP"])) / 1e6
    print(f"\nkmodd stopped in {took:.2f} s during systemctl poweroff")
    assert 0 <= took < 2.0, took
    console = vm.console_log(boot=1)
    assert "A stop job is running" not in console, console[-3000:]
    assert "Power down" in console or "reboot: Power down" in console, console[-2000:]


def test_the_next_boot_gets_a_head_start(kmodd_vm: BootVM, kmodd_boot: Snapshot,
                                         power_cycle: str) -> None:
    """The first kmodd boot left /var/lib/kmodd/learned.json with every device's
    plan, including the drivers udevd loaded before kmodd was ready.  At the
    next boot kmodd inserts those not yet in before it reads an index (racing
    udevd, which still loads drivers until kmodd is ready), and coldplug ends
    with the same modules, every module kmodd loaded attributed to its device."""
    vm = kmodd_vm
    vm.run("kmodctl settle --timeout 300", timeout=400, check=True)
    first = vm.run(f"journalctl -b {power_cycle.replace('-', '')} -u kmodd.service -o cat "
                   "--no-pager", timeout=300, check=True).stdout
    inserted_first = set(re.findall(r"^loaded (\S+) for ", first, re.M))
    learned = json.loads(vm.run("cat /var/lib/kmodd/learned.json", check=True).stdout)
    targets = {t for d in learned["devices"].values() for t in d["targets"]}
    # Learned whoever loaded them: more than kmodd's own loads of that boot.
    assert targets - inserted_first, (sorted(targets), sorted(inserted_first))
    log = vm.run("journalctl -b -u kmodd.service -o cat --no-pager", check=True).stdout
    began = re.search(r"head start: inserting (\d+) module", log)
    if began:
        done = re.search(r"head start: (\d+) inserted, (\d+) already there, (\d+) failed", log)
        assert int(began.group(1)) > 0 and done, log[-3000:]
        assert int(done.group(1)) + int(done.group(2)) > 0, log[-3000:]
        assert "which no device asked for" not in log, log[-3000:]
    else:
        # udevd had loaded every learned driver before kmodd's start: the
        # journal must say so, naming what it knew.
        none = re.search(r"no head start: nothing to insert: (\d+) device", log)
        assert none and int(none.group(1)) > 0, log[-3000:]
    print(f"\n{began.group(0) if began else 'no head start (all in)'}; "
          f"{len(learned['devices'])} devices learned")
    loaded = set(vm.run("cut -d' ' -f1 /proc/modules", check=True).stdout.split())
    assert kmodd_boot.modules <= loaded, sorted(kmodd_boot.modules - loaded)
    mods = json.loads(vm.run("kmodctl list --json", check=True).stdout)
    ours = [m for m in mods if m.get("loaded_by_kmodd")]
    assert ours and all((m.get("why") or {}).get("kind") for m in ours), ours
