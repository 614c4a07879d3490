"""Fixtures for tests on Debian's real kernel inside the QEMU test bed.

``vm``        session scope: ONE boot for the whole pytest session, with the
              dozen DEFAULT_DEVICES.  Tests share it: clean up what you load
              (``modprobe -r``) or use names nobody else relies on.
``fresh_vm``  module scope factory: ``fresh_vm(devices=None, **VM kwargs) -> VM``
              boots a new guest for the calling test module (e.g. the daemon
              end-to-end tests); every VM it made is shut down when the module
              ends.  The session ``vm``, if already booted, is paused meanwhile
              (and resumed for any test that asks for ``vm``).

Both raise (never skip) when the test bed cannot boot: the error says why.
Every test under tests/vm is marked ``vm``, and a vm test that skips is
reported as a failure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.vm import VM

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                             ) -> Generator[None, Any, None]:
    """A VM test that skips is a failure: the test bed must never be silently absent."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and item.get_closest_marker("vm") is not None
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"VM tests must never be skipped (skip reason: {reason})"


def _boot(**kwargs: Any) -> VM:
    vm = VM(**kwargs)
    seconds = vm.boot()
    try:
        vm.verify_share()
    except BaseException:
        vm.shutdown()
        raise
    print(f"\ntestbed: booted {vm.kernel.version if vm.kernel else '?'} in {seconds:.1f} s",
          file=sys.stderr)
    return vm


_session_vm: list[VM] = []
_paused: list[VM] = []


def _pause_session_vm() -> None:
    for machine in _session_vm:
        if machine not in _paused:
            machine.qmp("stop")
            _paused.append(machine)


def _resume_session_vm() -> None:
    while _paused:
        machine = _paused.pop()
        if machine in _session_vm:
            machine.qmp("cont")


@pytest.fixture(autouse=True)
def _session_vm_running(request: pytest.FixtureRequest) -> None:
    """A test that uses ``vm`` gets it running even if a fresh_vm paused it."""
    if "vm" in request.fixturenames:
        _resume_session_vm()


@pytest.fixture(scope="session")
def vm() -> Iterator[VM]:
    machine = _boot()
    _session_vm.append(machine)
    try:
        yield machine
    finally:
        _session_vm.clear()
        _paused.clear()
        machine.shutdown()


@pytest.fixture(scope="module")
def fresh_vm() -> Iterator[Callable[..., VM]]:
    made: list[VM] = []

    def factory(devices: list[str] | None = None, **kwargs: Any) -> VM:
        # One running guest at a time on a shared 2-core host: the session VM
        # (if booted) is paused while this module's guests run.
        _pause_session_vm()
        machine = _boot(devices=devices, **kwargs)
        made.append(machine)
        return machine

    try:
        yield factory
    finally:
        for machine in made:
            machine.shutdown()
        _resume_session_vm()
