"""EPERM on the real kernel, told apart by cause: ``module_blacklist=`` on the kernel
command line and ``/proc/sys/kernel/modules_disabled``.

modules_disabled cannot be turned off again, so this runs on a guest of its own
(``fresh_vm``), booted with ``module_blacklist=loop``.
"""

from __future__ import annotations

import errno as E
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest

from testbed.vm import VM


@pytest.fixture(scope="module")
def eperm(fresh_vm: Callable[..., VM]) -> dict[str, Any]:
    vm = fresh_vm(devices=["e1000"], cmdline_extra="module_blacklist=loop")
    r = vm.run([sys.executable, "tests/vm/test_kernel_guest.py", "eperm"], timeout=900)
    assert r.rc == 0, r.stderr[-4000:]
    data: dict[str, Any] = json.loads(r.stdout)["eperm"]
    assert data["ok"], data.get("traceback")
    vm.shutdown()     # done with it: do not keep a second guest running
    return data


def test_cmdline_blacklist_is_eperm_naming_the_cause(eperm: dict[str, Any]) -> None:
    assert "module_blacklist=loop" in eperm["cmdline"]
    assert eperm["blacklisted"]["errno"] == E.EPERM
    assert "module_blacklist=" in eperm["blacklisted"]["message"]
    assert eperm["blacklisted_loader"]["status"] == "failed"
    assert eperm["blacklisted_loader"]["errno"] == E.EPERM
    # modprobe fails the same way (with a generic message).
    assert eperm["modprobe_blacklisted"]["rc"] == 1
    # Other modules still load.
    assert eperm["e1000_before"] == {"errno": 0, "inserted": True}


def test_modules_disabled_is_eperm_naming_the_cause(eperm: dict[str, Any]) -> None:
    assert eperm["modules_disabled"] is True
    load = eperm["dummy_disabled"]
    assert load["errno"] == E.EPERM and "modules_disabled" in load["message"]
    unload = eperm["unload_disabled"]
    assert unload["errno"] == E.EPERM and "modules_disabled" in unload["message"]
    assert eperm["e1000_state"] == {"e1000": "live"}
    cli = eperm["kmodctl_disabled"]
    assert cli["rc"] == 1 and "module loading is disabled" in cli["stderr"]
