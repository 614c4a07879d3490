"""Fixtures for the boot test bed: three machines, four boots, shared by every test.

``stock``         a boot of the image: udev and /sbin/modprobe load modules (a
                  ``Snapshot`` of what the boot did); the machine is then turned off
``images``        kmodd's package built from this checkout, installed and taken
                  over in a chroot of the image's tree (``dpkg -i``, ``kmodd-takeover
                  enable --no-start``, the real ``update-initramfs -u``), and given
                  back (``kmodd-takeover disable``, ``dpkg --purge``):
                  ``testbed.takeover.derived_images``, cached
``kmodd_vm``      the takeover image booted on the same devices: the ``BootVM``
``kmodd_boot``    the ``Snapshot`` of that boot, taken before any test touched it
``power_cycle``   ``systemctl poweroff`` of the kmodd machine and a cold boot again
                  (the id of the boot that was powered off)
``handback_vm``   the handback image booted (the kmodd machine turned off first)
``handback_boot`` its ``Snapshot``

Test files run in name order (test_a_... to test_g_...): the power cycle comes
in test_f, the handback last.  Nothing skips: a machine that cannot boot fails
the tests, saying why.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from testbed.boot import BootVM
from testbed.image import ImageArtifacts
from testbed.takeover import DerivedImages, build_deb, derived_images

_HERE = Path(__file__).resolve().parent
SYSTEM_TIMEOUT = 600.0
T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.boot)


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
# wait for the boot to finish before looking.  "running" does not wait for
# coldplug (udev works through the trigger's events on its own, kmodd too),
# and a USB device enumerates only once its controller's driver is bound:
# wait for both loaders, then for the drivers to stay the same for 5 s.
state=$(systemctl is-system-running --wait 2>&1)
echo "@state $state"
drivers() {
    for d in /sys/bus/*/devices/*; do
        [ -L "$d/driver" ] || continue
        b=${d#/sys/bus/}; b=${b%%/*}
        echo "@driver $b:${d##*/} $(basename "$(readlink "$d/driver")") $(readlink -f "$d")"
    done
}
prev= i=0
while [ $i -lt 30 ]; do
    udevadm settle --timeout=120
    if systemctl -q is-active kmodd.service; then kmodctl settle --timeout 120 >/dev/null; fi
    now=$(drivers; cat /proc/modules)
    [ "$now" = "$prev" ] && break
    prev=$now i=$((i + 1))
    sleep 5
done
echo "@settled $i"
systemctl list-units --state=failed --plain --no-legend --no-pager | awk '{print "@failed " $1}'
awk '{print "@module " $1}' /proc/modules
drivers
"""


def _device_key(dev: str, path: str) -> str:
    """A device's name, stable across boots of the same devices.

    USB bus numbers follow the order the host controller drivers registered
    (ehci_hcd or uhci_hcd first), which differs between boots: a USB device is
    named by its controller's PCI address and its port path instead.  An HD
    audio codec's name carries its card's index (hdaudioC1D0), which follows
    the order the sound drivers probed: it is named by its controller's PCI
    address and its codec address.
    """
    codec = re.fullmatch(r"hdaudio:hdaudioC\d+D(\d+)", dev)
    if codec and path.count("/") >= 2:
        return f"hdaudio:{path.rsplit('/', 2)[-2]}/D{codec.group(1)}"
    if not dev.startswith("usb:") or "/usb" not in path:
        return dev
    controller, _, ports = path.partition("/usb")
    tail = re.sub(r"(^|/)\d+-", r"\1X-", ports.split("/", 1)[1]) if "/" in ports else "root"
    return f"usb:{controller.rsplit('/', 1)[-1]}/{tail}"


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
            dev, drv, path = [*rest.split(), "", ""][:3]
            drivers[_device_key(dev, path)] = drv
    return Snapshot(vm.boot_id, state, failed, modules, drivers, vm.console_log())


@pytest.fixture(scope="session")
def stock() -> Snapshot:
    def step() -> Snapshot:
        with BootVM() as vm:
            print(f"\nbootbed: stock boot, agent up after {vm.boot_seconds:.0f} s",
                  file=sys.stderr)
            snap = snapshot(vm)
            # By its identifier: it logs before journald rotates into the
            # persistent journal, which can lose the unit's _SYSTEMD_UNIT match.
            snap.extra["modules_load_journal"] = vm.run(
                "journalctl -b -t systemd-modules-load -o cat --no-pager", check=True).stdout
            return snap
    return _once("the stock boot", step)


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
def images(deb: Path) -> DerivedImages:
    return _once("the takeover and handback images", lambda: derived_images(deb))


@contextlib.contextmanager
def _running(label: str, image: ImageArtifacts) -> Iterator[BootVM]:
    """A machine of ``image``, booted once per session (a failed boot is remembered)."""
    vm = BootVM(image=image)
    seconds = _once(f"the {label} boot", vm.boot)
    print(f"\nbootbed: {label} boot, agent up after {seconds:.0f} s", file=sys.stderr)
    try:
        yield vm
    finally:
        vm.shutdown()


@pytest.fixture(scope="session")
def kmodd_vm(stock: Snapshot, images: DerivedImages) -> Iterator[BootVM]:
    # After the stock boot (its machine is off by then): one machine at a time.
    with _running("kmodd", images.takeover) as vm:
        yield vm


@pytest.fixture(scope="session")
def kmodd_boot(kmodd_vm: BootVM) -> Snapshot:
    return _once("the kmodd snapshot", lambda: snapshot(kmodd_vm))


@pytest.fixture(scope="session")
def power_cycle(kmodd_vm: BootVM, kmodd_boot: Snapshot) -> str:
    """Power the kmodd machine off (kmodd running) and on; the id of the boot that ended."""
    def step() -> str:
        ended = kmodd_vm.boot_id
        seconds = kmodd_vm.reboot(poweroff=True)
        print(f"\nbootbed: kmodd power cycle, agent up after {seconds:.0f} s", file=sys.stderr)
        kmodd_vm.run("systemctl is-system-running --wait", timeout=SYSTEM_TIMEOUT)
        return ended
    return _once("the power cycle", step)


@pytest.fixture(scope="session")
def handback_vm(kmodd_vm: BootVM, images: DerivedImages) -> Iterator[BootVM]:
    # The last machine: the kmodd one is done (test files run in name order).
    kmodd_vm.shutdown()
    with _running("handback", images.handback) as vm:
        yield vm


@pytest.fixture(scope="session")
def handback_boot(handback_vm: BootVM) -> Snapshot:
    return _once("the handback snapshot", lambda: snapshot(handback_vm))
