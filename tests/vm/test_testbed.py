"""The test bed itself: Debian's real kernel boots, runs the host venv, loads modules."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from testbed.initramfs import PROJECT_ROOT, TestbedError, find_kernel
from testbed.vm import VM, BootError, GuestTimeout

# Modalias prefixes the default devices must show in the guest (vendor:device).
EXPECTED_PCI = {
    "e1000": "v00008086d0000100E",
    "virtio-rng-pci": "v00001AF4d00001005",
    "i6300esb": "v00008086d000025AB",
    "intel-hda": "v00008086d00002668",
    "usb-ehci": "v00008086d000024CD",
    "ich9-usb-uhci1": "v00008086d00002934",
    "ES1370": "v00001274d00005000",
    "pcnet": "v00001022d00002000",
    "rtl8139": "v000010ECd00008139",
    "virtio-net-pci": "v00001AF4d00001000",
    "lsi53c895a": "v00001000d00000012",
    "sdhci-pci": "v00001B36d00000007",
    "ahci": "v00008086d00002922",
}


def test_runs_debian_kernel(vm: VM) -> None:
    expected = find_kernel().version
    assert vm.run("uname -r").check().stdout.strip() == expected
    assert "Debian" in vm.run("cat /proc/version").check().stdout


def test_proc_modules_and_initramfs_modules(vm: VM) -> None:
    modules = vm.run("cat /proc/modules").check().stdout
    names = {line.split()[0] for line in modules.splitlines()}
    assert {"9p", "9pnet_virtio", "overlay", "virtio_pci"} <= names


def test_guest_root_is_writable_overlay_and_checkout_is_shared(vm: VM, tmp_path: Path) -> None:
    r = vm.run("echo guest >/etc/testbed-probe && cat /etc/testbed-probe").check()
    assert r.stdout == "guest\n"
    assert not Path("/etc/testbed-probe").exists()  # the host root is untouched
    probe = PROJECT_ROOT / "build" / "testbed" / f"share-probe-{time.time_ns()}"
    try:
        vm.run(["sh", "-c", f"echo from-guest >{probe}"]).check()
        assert probe.read_text() == "from-guest\n"
    finally:
        probe.unlink(missing_ok=True)


def test_host_venv_python_imports_kmodd(vm: VM) -> None:
    r = vm.run([sys.executable, "-c",
                "import sys, kmodd; print(sys.prefix); print(kmodd.__file__)"],
               timeout=180).check()
    prefix, path = r.stdout.split()
    assert prefix == sys.prefix
    assert path == str(PROJECT_ROOT / "kmodd" / "__init__.py")


def test_default_devices_show_modaliases(vm: VM) -> None:
    out = vm.run("cat /sys/bus/pci/devices/*/modalias").check().stdout
    missing = {dev: ident for dev, ident in EXPECTED_PCI.items() if f"pci:{ident}" not in out}
    assert not missing, f"devices without a modalias in the guest: {missing}\n{out}"
    everything = vm.run("find /sys/devices -name modalias -exec cat {} + | sort -u").check()
    assert "acpi:QEMU0001:" in everything.stdout  # pvpanic


def _loaded(vm: VM) -> set[str]:
    return {line.split()[0] for line in vm.run("cat /proc/modules").check().stdout.splitlines()}


def test_modprobe_e1000_really_loads(vm: VM) -> None:
    # The session VM is shared: leave it as found (other tests expect e1000 absent).
    was_loaded = "e1000" in _loaded(vm)
    try:
        vm.run("modprobe e1000", timeout=120).check()
        assert "e1000" in _loaded(vm)
        assert vm.run("ls /sys/bus/pci/drivers/e1000 | grep -q '^0000:'").rc == 0
    finally:
        if not was_loaded:
            vm.run("modprobe -r e1000", timeout=120).check()
    assert was_loaded or "e1000" not in _loaded(vm)


def test_qmp_hotplug_e1000(vm: VM) -> None:
    before = set(vm.run("ls /sys/bus/pci/devices").check().stdout.split())
    vm.qmp("device_add", driver="e1000", id="tb_hot_e1000")
    try:
        deadline = time.monotonic() + 60
        new: set[str] = set()
        while time.monotonic() < deadline:
            now = set(vm.run("ls /sys/bus/pci/devices").check().stdout.split())
            new = now - before
            if new:
                break
            time.sleep(0.5)
        assert new, "hot-added e1000 did not show up in /sys/bus/pci/devices"
        (dev,) = new
        alias = vm.run(f"cat /sys/bus/pci/devices/{dev}/modalias").check().stdout
        assert alias.startswith("pci:v00008086d0000100E")
    finally:
        vm.qmp("device_del", id="tb_hot_e1000")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = set(vm.run("ls /sys/bus/pci/devices").check().stdout.split())
            if now == before:
                break
            time.sleep(0.5)
        assert now == before, "hot-added e1000 was not removed by device_del"


def test_command_status_streams_and_timeout(vm: VM) -> None:
    r = vm.run("echo out; echo err >&2; exit 7")
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert vm.run(["printf", "%s|", "a b", "$HOME", "'q'"]).stdout == "a b|$HOME|'q'|"
    assert vm.run("cat", input="data\n").stdout == "data\n"
    assert vm.run("echo $FOO", env={"FOO": "bar baz"}).stdout == "bar baz\n"
    start = time.monotonic()
    with pytest.raises(GuestTimeout) as info:
        vm.run("echo started; sleep 1000 & sleep 1000", timeout=3)
    assert time.monotonic() - start < 30
    assert info.value.partial is not None and "started" in info.value.partial.stdout
    # Everything the command started was killed.
    assert vm.run("pgrep -x sleep || true").stdout == ""
    # The agent is fast enough for many small commands.
    durations = sorted(vm.run("true").duration for _ in range(5))
    assert durations[2] < 2.0, durations


def test_kernel_modprobe_points_at_true(vm: VM) -> None:
    assert vm.run("cat /proc/sys/kernel/modprobe").stdout.strip() == "/bin/true"


def test_boot_failures_say_why() -> None:
    with pytest.raises(BootError, match="not a valid device model"):
        VM(["no-such-device"]).boot(timeout=60)
    with pytest.raises(TestbedError, match="no kernel to boot"):
        VM(kernel_version="0.0.0-none").boot(timeout=60)


def test_commands_run_concurrently(vm: VM) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(vm.run, "sleep 3; echo slow")
        time.sleep(0.2)
        fast = vm.run("echo fast")
        assert fast.stdout == "fast\n" and not slow.done()
        assert slow.result().stdout == "slow\n"
