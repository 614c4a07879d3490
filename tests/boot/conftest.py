"""Fixtures for the boot test bed: one Debian machine, three boots, shared by every test.

``stock``        the first boot of a fresh overlay: udev and /sbin/modprobe load
                 modules (a ``Snapshot`` of what the boot did)
``kmodd_vm``     the same machine after kmodd's package was installed with
                 ``dpkg -i``, the takeover done as docs/systemd.md says
                 (``kmodd-takeover enable``, which runs ``update-initramfs -u``),
                 and a power cycle: the booted ``BootVM``
``kmodd_boot``   the ``Snapshot`` of that boot, taken before any test touched it
``handback_boot`` ``kmodd-takeover disable`` and a power cycle: the last boot

Test files run in name order (test_a_... to test_g_...), so the handback comes
last.  Nothing skips: a machine that cannot boot fails the tests, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from testbed.boot import BootVM
from testbed.initramfs import PROJECT_ROOT

_HERE = Path(__file__).resolve().parent
SYSTEM_TIMEOUT = 600.0
# update-initramfs in the guest: minutes under emulation, tens of minutes on a busy host
TAKEOVER_TIMEOUT = float(os.environ.get("BOOTBED_TAKEOVER_TIMEOUT", "3600"))
T = TypeVar("T")


# Tests on the machine after kmodd's package and the takeover: the in-guest
# update-initramfs alone outlasts CI's budget under emulation, so CI's `boot`
# step runs the others (-m "not takeover") and `scripts/test.sh boot-takeover`
# runs these.
_TAKEOVER_FIXTURES = {"kmodd_vm", "kmodd_boot", "handback_boot", "takeover_log"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.boot)
            if _TAKEOVER_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.takeover)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                             ) -> Generator[None, Any, None]:
    """A boot test that skips is a failure, like a VM test."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("boot") is not None:
        report.outcome = "failed"
        report.longrepr = f"boot tests must never be skipped ({report.longrepr})"


@dataclass
class Snapshot:
    """What one boot did, read right after it settled."""

    boot_id: str
    state: str
    failed_units: set[str]
    modules: set[str]
    drivers: dict[str, str]  # "bus:device" -> driver
    console: str
    extra: dict[str, str] = field(default_factory=dict)


_SNAPSHOT = r"""
# The agent answers early in the boot (before the root is even writable):
# wait for the boot to finish before looking.
state=$(systemctl is-system-running --wait 2>&1)
echo "@state $state"
systemctl list-units --state=failed --plain --no-legend --no-pager | awk '{print "@failed " $1}'
awk '{print "@module " $1}' /proc/modules
for d in /sys/bus/*/devices/*; do
    [ -L "$d/driver" ] || continue
    b=${d#/sys/bus/}; b=${b%%/*}
    echo "@driver $b:${d##*/} $(basename "$(readlink "$d/driver")")"
done
"""


def snapshot(vm: BootVM) -> Snapshot:
    out = vm.run(_SNAPSHOT, timeout=SYSTEM_TIMEOUT, check=True).stdout
    state, failed, modules, drivers = "", set(), set(), {}
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "@state":
            state = rest.strip()
        elif tag == "@failed":
            failed.add(rest.strip())
        elif tag == "@module":
            modules.add(rest.strip())
        elif tag == "@driver":
            dev, _, drv = rest.partition(" ")
            drivers[dev] = drv
    return Snapshot(vm.boot_id, state, failed, modules, drivers, vm.console_log())


def build_deb(outdir: Path) -> Path:
    """kmodd's Debian package, built from this checkout as the packaging docs say."""
    script = PROJECT_ROOT / "contrib" / "build-deb.sh"
    if not script.is_file():
        raise AssertionError(f"{script} is missing: the boot tests install kmodd's package")
    proc = subprocess.run(["bash", str(script), str(outdir)], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"build-deb.sh failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    debs = sorted(outdir.glob("kmodd_*_all.deb"))
    if len(debs) != 1:
        raise AssertionError(f"build-deb.sh made {debs}, expected one kmodd_*_all.deb")
    return debs[0]


@pytest.fixture(scope="session")
def machine() -> Iterator[BootVM]:
    vm = BootVM()
    seconds = _once("the stock boot", vm.boot)
    print(f"\nbootbed: stock boot, agent up after {seconds:.0f} s", file=sys.stderr)
    try:
        yield vm
    finally:
        vm.shutdown()


@pytest.fixture(scope="session")
def stock(machine: BootVM) -> Snapshot:
    return _once("the stock snapshot", lambda: snapshot(machine))


@pytest.fixture(scope="session")
def deb() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kmodd-deb-") as tmp:
        yield _once("build-deb.sh", lambda: build_deb(Path(tmp)))


# A session fixture that raised is set up again for every test that asks for
# it; a failed takeover or boot (many minutes) is remembered instead.
_failed: dict[str, str] = {}


def _once(name: str, step: Callable[[], T]) -> T:
    if name in _failed:
        pytest.fail(f"{name} failed earlier in this session:\n{_failed[name]}", pytrace=False)
    try:
        return step()
    except BaseException as exc:
        _failed[name] = f"{type(exc).__name__}: {exc}"[-6000:]
        raise


@pytest.fixture(scope="session")
def takeover_log(machine: BootVM, stock: Snapshot, deb: Path) -> str:
    """Install the package and take over exactly as an administrator does."""
    def step() -> str:
        path = machine.put_file(deb.name, deb.read_bytes())
        # update-initramfs under emulation on a busy host takes minutes
        res = machine.run(f"dpkg -i {path} && kmodd-takeover enable", timeout=TAKEOVER_TIMEOUT,
                          check=True)
        machine.run(f"umount {Path(path).parent}", timeout=60, check=True)
        return res.stdout + res.stderr
    return _once("the takeover", step)


@pytest.fixture(scope="session")
def kmodd_vm(machine: BootVM, takeover_log: str) -> BootVM:
    def step() -> BootVM:
        if not hasattr(machine, "_kmodd_booted"):
            seconds = machine.reboot(poweroff=True)
            print(f"\nbootbed: kmodd boot, agent up after {seconds:.0f} s", file=sys.stderr)
            machine._kmodd_booted = True  # type: ignore[attr-defined]
        return machine
    return _once("the kmodd boot", step)


@pytest.fixture(scope="session")
def kmodd_boot(kmodd_vm: BootVM) -> Snapshot:
    snap = _once("the kmodd snapshot", lambda: snapshot(kmodd_vm))
    snap.extra["boot_number"] = str(kmodd_vm.boots)
    return snap


@pytest.fixture(scope="session")
def handback_boot(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> Snapshot:
    def step() -> Snapshot:
        res = kmodd_vm.run("kmodd-takeover disable", timeout=TAKEOVER_TIMEOUT, check=True)
        kmodd_vm.reboot(poweroff=True)
        snap = snapshot(kmodd_vm)
        snap.extra["disable_log"] = res.stdout + res.stderr
        return snap
    return _once("the handback boot", step)
