"""Stock boot and kmodd's boot of the same image and devices reach the same system."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from testbed.boot import BootVM
from testbed.image import build_image
from testbed.takeover import DerivedImages

from .conftest import Snapshot

# Modules one boot may have and the other not, and why:
#   (none so far: a difference is a failure until it is explained here)
ALLOWED_MODULE_DIFFERENCES: frozenset[str] = frozenset()


def _ok(snap: Snapshot, allowed_failed: set[str]) -> None:
    assert snap.state in ("running", "degraded"), (snap.state, snap.console[-3000:])
    if snap.state == "degraded":
        assert snap.failed_units <= allowed_failed, snap.failed_units - allowed_failed


def test_stock_boot_reaches_running(stock: Snapshot) -> None:
    # The reference: a stock boot must not degrade either (nothing else to compare with).
    assert stock.state == "running", (stock.state, stock.failed_units)
    assert stock.drivers, "no device has a driver: the snapshot is broken"


def test_kmodd_boot_reaches_running(stock: Snapshot, kmodd_boot: Snapshot) -> None:
    _ok(kmodd_boot, stock.failed_units)


def test_initramfs_rebuilt_with_the_rule_and_found_root(kmodd_vm: BootVM, kmodd_boot: Snapshot,
                                                         images: DerivedImages,
                                                         tmp_path: Path) -> None:
    image = build_image()
    r = kmodd_vm.run("sha256sum /boot/initrd.img-$(uname -r); findmnt -n -o SOURCE /",
                     check=True)
    digest, source = r.stdout.split()[0], r.stdout.split()[-1]
    booted = images.takeover.initrd.read_bytes()
    # The machine booted the initramfs the takeover rebuilt, not the image's.
    assert hashlib.sha256(booted).hexdigest() == digest
    assert digest != hashlib.sha256(image.initrd.read_bytes()).hexdigest()
    assert source == "/dev/vda"
    # ... and that initramfs holds the takeover's rule, which defers to a flag
    # file that never exists there, so udev loads virtio_blk in it.
    subprocess.run(["unmkinitramfs", str(images.takeover.initrd), str(tmp_path)], check=True)
    rules = list(tmp_path.rglob("80-drivers.rules"))
    assert len(rules) == 1, rules
    assert 'TEST!="/run/kmodd/udev-handover"' in rules[0].read_text()
    assert not list(tmp_path.rglob("*kmodd*")), "kmodd itself is not in the initramfs"
    assert list(tmp_path.rglob("virtio_blk.ko*")), "MODULES=most: the disk driver is in it"


def test_same_modules_loaded(stock: Snapshot, kmodd_boot: Snapshot) -> None:
    only_stock = stock.modules - kmodd_boot.modules - ALLOWED_MODULE_DIFFERENCES
    only_kmodd = kmodd_boot.modules - stock.modules - ALLOWED_MODULE_DIFFERENCES
    assert not only_stock and not only_kmodd, (sorted(only_stock), sorted(only_kmodd))


def test_every_stock_driver_bound_in_kmodd_boot(stock: Snapshot, kmodd_boot: Snapshot) -> None:
    missing = {dev: (drv, kmodd_boot.drivers.get(dev)) for dev, drv in stock.drivers.items()
               if kmodd_boot.drivers.get(dev) != drv}
    assert not missing, missing
    assert len(stock.drivers) >= 20
