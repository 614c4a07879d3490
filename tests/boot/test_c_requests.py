"""Kernel requests at boot go through the installed helper to kmodd."""

from __future__ import annotations

import json

from testbed.boot import BootVM
from testbed.image import DATA_MOUNT, DUMMY_LINK

from .conftest import Snapshot

HELPER = "/usr/libexec/kmodd/kmodd-request"


def _why(vm: BootVM, module: str) -> dict[str, object]:
    r = vm.run(f"kmodctl why {module} --json", check=True)
    why: dict[str, object] = json.loads(r.stdout)
    return why


def test_kernel_helper_is_kmodds(kmodd_vm: BootVM, stock: Snapshot,
                                 kmodd_boot: Snapshot) -> None:
    assert kmodd_vm.run("cat /proc/sys/kernel/modprobe", check=True).stdout.strip() == HELPER


def _entered(vm: BootVM, unit: str) -> float:
    r = vm.run(f"systemctl show -p ActiveEnterTimestampMonotonic --value {unit}", check=True)
    return int(r.stdout.strip()) / 1e6


def test_fstab_vfat_mount_by_kernel_request(kmodd_vm: BootVM, stock: Snapshot,
                                            kmodd_boot: Snapshot) -> None:
    assert "vfat" in stock.modules  # the same fstab line in the stock boot
    r = kmodd_vm.run(f"findmnt -n -o FSTYPE {DATA_MOUNT}", check=True)
    assert r.stdout.strip() == "vfat"
    why = _why(kmodd_vm, "vfat")
    # Local mounts are not ordered after kmodd.service (nothing is: see
    # docs/boot-testbed.md), so a mount whose disk shows up before kmodd is
    # ready asks while there is no daemon, and the helper loads it directly
    # (kmod's modprobe, its fallback).  Which one happened is read from the
    # journal's order; either way the module was loaded for the mount.
    mounted = _entered(kmodd_vm, "mnt-data.mount")
    ready = _entered(kmodd_vm, "kmodd.service")
    print(f"\nvfat mount at {mounted:.2f} s, kmodd ready at {ready:.2f} s: "
          f"{'kmodd answered' if why.get('loaded_by_kmodd') else 'loaded directly'}")
    if not why.get("loaded_by_kmodd"):
        assert mounted < ready, (why, mounted, ready)
        return
    assert why.get("kind") == "kernel", why
    assert why.get("key") == "fs-vfat", why
    text = kmodd_vm.run("kmodctl why vfat", check=True).stdout
    assert "request:      kernel fs-vfat" in text, text


def test_dummy_link_unit_by_kernel_request(kmodd_vm: BootVM, stock: Snapshot,
                                           kmodd_boot: Snapshot) -> None:
    assert "dummy" in stock.modules
    kmodd_vm.run(f"ip link show {DUMMY_LINK}", check=True)
    why = _why(kmodd_vm, "dummy")
    assert why.get("loaded_by_kmodd") and why.get("kind") == "kernel", why
    assert why.get("key") == "rtnl-link-dummy", why
