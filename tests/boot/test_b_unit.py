"""kmodd.service as PID 1 runs it on kmodd's boot."""

from __future__ import annotations

import json
import re

from testbed.boot import BootVM

from .conftest import Snapshot


def _show(vm: BootVM, *props: str) -> dict[str, str]:
    r = vm.run("systemctl show kmodd.service " + " ".join(f"-p {p}" for p in props), check=True)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def test_active_with_status_line(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> None:
    props = _show(kmodd_vm, "ActiveState", "SubState", "StatusText", "Type", "NRestarts")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify"
    assert props["StatusText"].strip(), "kmodd sent no STATUS="
    assert props["NRestarts"] == "0", "kmodd was restarted during the boot"
    status = kmodd_vm.run("systemctl status kmodd.service --no-pager -l").stdout
    assert re.search(r"^\s*Status: \".+\"", status, re.M), status


def test_journal_has_e1000_load_with_modalias_and_devpath(kmodd_vm: BootVM,
                                                          kmodd_boot: Snapshot) -> None:
    # Debian's initramfs (MODULES=most) loads the NIC drivers before the root
    # is mounted, so e1000 is never kmodd's to load at boot (kmodctl why says
    # so).  Unbound and announced again, the device is kmodd's: the load line
    # then carries the device's fields, under the system's journald.
    why = kmodd_vm.run("kmodctl why e1000", check=True).stdout
    assert "not loaded by kmodd" in why, why
    kmodd_vm.run("dev=$(readlink -f /sys/bus/pci/drivers/e1000/0000:*) && rmmod e1000 && "
                 "udevadm trigger --action=add --settle \"$dev\" && kmodctl settle --timeout 120",
                 timeout=300, check=True)
    r = kmodd_vm.run("journalctl -b -u kmodd MODULE=e1000 -o json --no-pager", check=True)
    entries = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert entries, "no journal entry with MODULE=e1000 from kmodd.service"
    loads = [e for e in entries if e.get("MODALIAS", "").startswith("pci:")
             and e.get("DEVPATH", "").startswith("/devices/pci")]
    assert loads, entries
    # Written by kmodd.service under the system's journald (PID 1 started it).
    assert all(e.get("_SYSTEMD_UNIT") == "kmodd.service" for e in loads), loads
    assert any("e1000" in e.get("MESSAGE", "") for e in loads), loads
    assert kmodd_vm.run("kmodctl why e1000", check=True).stdout.count("device:") == 1


def test_does_not_wait_for_local_filesystems(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> None:
    chain = kmodd_vm.run("systemd-analyze critical-chain kmodd.service --no-pager",
                         check=True).stdout
    assert "kmodd.service" in chain, chain
    assert "local-fs.target" not in chain, chain
    after = _show(kmodd_vm, "After")["After"].split()
    assert "local-fs.target" not in after and "tmp.mount" not in after, after
    assert "systemd-tmpfiles-setup.service" not in after, after
    # udev is not held back behind kmodd's interpreter start either.
    assert "kmodd.service" not in _show_udevd_after(kmodd_vm)


def _show_udevd_after(vm: BootVM) -> list[str]:
    r = vm.run("systemctl show -p After systemd-udevd.service", check=True)
    return r.stdout.partition("=")[2].split()


def test_unit_verifies_clean(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> None:
    r = kmodd_vm.run("systemd-analyze verify kmodd.service 2>&1; echo rc=$?")
    noise = [line for line in r.stdout.splitlines()
             if line.strip() and not line.startswith("rc=")]
    assert r.stdout.strip().endswith("rc=0") and not noise, r.stdout


def test_security_exposure_recorded(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> None:
    r = kmodd_vm.run("systemd-analyze security kmodd.service --no-pager", check=True)
    m = re.search(r"Overall exposure level for kmodd\.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout[-2000:]
    print(f"\nsystemd-analyze security kmodd.service: {m.group(1)} {m.group(2)}")
    # An unhardened service scores 9.6 (UNSAFE); the unit's sandbox must count.
    assert float(m.group(1)) < 7.0, r.stdout
