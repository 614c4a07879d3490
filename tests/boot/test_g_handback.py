"""Giving the job back and rebooting gives the stock behaviour."""

from __future__ import annotations

from testbed.boot import BootVM

from .conftest import Snapshot
from .test_a_boot import ALLOWED_MODULE_DIFFERENCES


def test_handback_boot_is_stock(kmodd_vm: BootVM, stock: Snapshot,
                                handback_boot: Snapshot) -> None:
    vm = kmodd_vm
    assert handback_boot.state == "running", (handback_boot.state, handback_boot.failed_units)
    assert vm.run("test -e /etc/udev/rules.d/80-drivers.rules").rc != 0
    assert vm.run("cat /proc/sys/kernel/modprobe", check=True).stdout.strip() == "/sbin/modprobe"
    r = vm.run("systemctl is-enabled kmodd.service; systemctl is-active kmodd.service")
    assert r.stdout.split() == ["disabled", "inactive"], r.stdout
    assert vm.run("test -e /run/kmodd/udev-handover").rc != 0
    # The initramfs went back to udev's own rule too.
    r = vm.run("lsinitramfs /boot/initrd.img-$(uname -r) | grep -c 'rules.d/80-drivers.rules'; "
               "rm -rf /tmp/ird && mkdir /tmp/ird && unmkinitramfs /boot/initrd.img-$(uname -r) "
               "/tmp/ird && cat $(find /tmp/ird -name 80-drivers.rules); rm -rf /tmp/ird",
               timeout=900, check=True)
    assert "udev-handover" not in r.stdout, r.stdout
    diff = stock.modules ^ handback_boot.modules
    assert not diff - ALLOWED_MODULE_DIFFERENCES, sorted(diff)
    assert handback_boot.drivers == stock.drivers
