"""Issue 15: with the takeover, kmodd serves modules-load.d and systemd-modules-load stands back."""

from __future__ import annotations

import json

from testbed.boot import BootVM
from testbed.image import MODULES_LOAD_CONF, MODULES_LOAD_LIST

from .conftest import Snapshot

# What the list's modules pull in (macvtap needs macvlan and tap).
DEPENDENCIES = ("macvlan", "tap")


def test_stock_boot_loads_the_list_with_systemd_modules_load(stock: Snapshot) -> None:
    for name in MODULES_LOAD_LIST:
        assert f"Inserted module '{name}'" in stock.extra["modules_load_journal"], name
    assert set(MODULES_LOAD_LIST + DEPENDENCIES) <= stock.modules


def test_kmodd_loads_the_same_list_and_systemd_modules_load_does_nothing(
        kmodd_vm: BootVM, stock: Snapshot, kmodd_boot: Snapshot) -> None:
    listed = set(MODULES_LOAD_LIST + DEPENDENCIES)
    assert listed <= kmodd_boot.modules, sorted(listed - kmodd_boot.modules)
    r = kmodd_vm.run("systemctl show systemd-modules-load.service -p ConditionResult "
                     "-p ActiveState", check=True)
    props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    # The drop-in's condition (kmodd serves the lists) skipped it.
    assert props["ConditionResult"] == "no", props
    log = kmodd_vm.run("journalctl -b -t systemd-modules-load -o cat --no-pager",
                       check=True).stdout
    assert "Inserted module" not in log, log
    assert kmodd_vm.run("test -e /run/kmodd/modules-load.served").rc == 0


def test_why_names_file_and_line(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> None:
    lines = kmodd_vm.run(f"cat {MODULES_LOAD_CONF}", check=True).stdout.splitlines()
    for name in MODULES_LOAD_LIST:
        where = f"{MODULES_LOAD_CONF}:{lines.index(name) + 1}"
        why = json.loads(kmodd_vm.run(f"kmodctl why {name} --json", check=True).stdout)
        assert why.get("loaded_by_kmodd") and why.get("kind") == "modules-load", why
        text = kmodd_vm.run(f"kmodctl why {name}", check=True).stdout
        assert f"listed in:    {where}" in text, text
