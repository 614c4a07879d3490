"""Hotplug while kmodd restarts, and with kmodd stopped: every device gets its driver."""

from __future__ import annotations

import time

from testbed.boot import BootVM

from .conftest import Snapshot

# Hot-added devices whose drivers no boot loaded: QEMU device -> (PCI slot, driver).
DURING_RESTART = {
    "e1000e": ("0x1a", "e1000e"),
    "vmxnet3": ("0x1b", "vmxnet3"),
    "pvscsi": ("0x1c", "vmw_pvscsi"),
    "megasas": ("0x1d", "megaraid_sas"),
}
WHILE_STOPPED = ("ne2k_pci", "0x1e", "ne2k-pci")


def _wait_driver(vm: BootVM, slot: str, timeout: float = 180) -> str:
    path = f"/sys/bus/pci/devices/0000:00:{int(slot, 16):02x}.0/driver"
    deadline = time.monotonic() + timeout
    while True:
        r = vm.run(f"basename $(readlink {path}) 2>/dev/null")
        if r.rc == 0 and r.stdout.strip():
            return r.stdout.strip()
        if time.monotonic() > deadline:
            return ""
        time.sleep(2)


def test_hotplug_during_restart_and_while_stopped(kmodd_vm: BootVM,
                                                  kmodd_boot: Snapshot) -> None:
    vm = kmodd_vm
    loaded = vm.run("cut -d' ' -f1 /proc/modules", check=True).stdout.split()
    for _dev, (_slot, drv) in [*DURING_RESTART.items(), (WHILE_STOPPED[0], WHILE_STOPPED[1:])]:
        assert drv.replace("-", "_") not in loaded, drv
    # The restart is issued in the guest, and the devices arrive while it runs.
    vm.run("systemctl --no-block restart kmodd.service", check=True)
    for i, (dev, (slot, _drv)) in enumerate(DURING_RESTART.items()):
        vm.qmp("device_add", driver=dev, id=f"hot{i}", addr=slot)
    got = {dev: _wait_driver(vm, slot) for dev, (slot, _drv) in DURING_RESTART.items()}
    assert got == {dev: drv for dev, (_slot, drv) in DURING_RESTART.items()}, got
    # The restart may still be under way (udev loaded the drivers meanwhile):
    # a start joins its job and returns once kmodd is ready.
    vm.run("systemctl start kmodd.service && kmodctl settle --timeout 120", timeout=300,
           check=True)

    # kmodd stopped: its flag is gone, so udev loads the driver again.
    vm.run("systemctl stop kmodd.service", timeout=60, check=True)
    try:
        assert vm.run("test -e /run/kmodd/udev-handover").rc != 0
        dev, slot, drv = WHILE_STOPPED
        vm.qmp("device_add", driver=dev, id="hotstop", addr=slot)
        assert _wait_driver(vm, slot) == drv
    finally:
        vm.run("systemctl start kmodd.service && kmodctl settle --timeout 120",
               timeout=300, check=True)
    assert vm.run("test -e /run/kmodd/udev-handover").rc == 0
