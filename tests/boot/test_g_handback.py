"""The live takeover is idempotent both ways; giving the job back gives the stock behaviour."""

from __future__ import annotations

import subprocess
from pathlib import Path

from testbed.boot import BootVM
from testbed.takeover import DerivedImages

from .conftest import Snapshot
from .test_a_boot import ALLOWED_MODULE_DIFFERENCES

HELPER = "/usr/libexec/kmodd/kmodd-request"
_STATE = ("cat /proc/sys/kernel/modprobe; systemctl is-active kmodd.service; "
          "test -e /run/kmodd/udev-handover && echo flag || echo noflag; "
          "test -e /etc/udev/rules.d/80-drivers.rules && echo rule || echo norule")


def test_live_disable_enable_round_trip(kmodd_vm: BootVM, power_cycle: str) -> None:
    """On the running machine, no reboot: each direction twice, the second a no-op."""
    vm = kmodd_vm
    before = vm.run("md5sum /boot/initrd.img-*", check=True).stdout
    try:
        out = [vm.run("kmodd-takeover disable --no-initramfs", timeout=120, check=True).stdout
               for _ in range(2)]
        assert vm.run(_STATE, check=True).stdout.split() == [
            "/sbin/modprobe", "inactive", "noflag", "norule"]
        assert "removed" in out[0] and "removed" not in out[1], out
        # The helper given back loads for the kernel again.
        vm.run("ip link add kdr0 type bridge && ip link del kdr0", timeout=120, check=True)
    finally:
        out = [vm.run("kmodd-takeover enable --no-initramfs", timeout=300, check=True).stdout
               for _ in range(2)]
    assert vm.run("kmodctl settle --timeout 120", timeout=180).rc == 0
    assert vm.run(_STATE, check=True).stdout.split() == [HELPER, "active", "flag", "rule"]
    assert "installed" in out[0] and "installed" not in out[1], out
    assert vm.run("md5sum /boot/initrd.img-*", check=True).stdout == before


def test_purge_leaves_the_tree_as_it_was(images: DerivedImages) -> None:
    assert "kmodd-takeover: removed /etc/udev/rules.d/80-drivers.rules" in images.handback_log
    assert not images.leftovers, images.leftovers


def test_handback_boot_is_stock(handback_vm: BootVM, stock: Snapshot, handback_boot: Snapshot,
                                images: DerivedImages, tmp_path: Path) -> None:
    vm = handback_vm
    assert handback_boot.state == "running", (handback_boot.state, handback_boot.failed_units)
    assert vm.run("test -e /etc/udev/rules.d/80-drivers.rules").rc != 0
    assert vm.run("cat /proc/sys/kernel/modprobe", check=True).stdout.strip() == "/sbin/modprobe"
    # Purged: no package, no unit, nothing kmodd made at run time.
    assert vm.run("dpkg -s kmodd").rc != 0
    assert vm.run("test -e /lib/systemd/system/kmodd.service || test -e /run/kmodd").rc != 0
    assert vm.run("systemctl is-active kmodd.service").stdout.strip() == "inactive"
    # The initramfs went back to udev's own rule.
    subprocess.run(["unmkinitramfs", str(images.handback.initrd), str(tmp_path)], check=True)
    assert not [p for p in tmp_path.rglob("80-drivers.rules")
                if "udev-handover" in p.read_text()]
    diff = stock.modules ^ handback_boot.modules
    assert not diff - ALLOWED_MODULE_DIFFERENCES, sorted(diff)
    assert handback_boot.drivers == stock.drivers
    # systemd-modules-load serves modules-load.d again.
    log = vm.run("journalctl -b -t systemd-modules-load -o cat --no-pager", check=True).stdout
    assert "Inserted module 'nbd'" in log, log
