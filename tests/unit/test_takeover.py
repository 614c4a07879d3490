"""contrib/kmodd-takeover on a tree (--root): both directions, idempotence,
the saved helper, and files that are not kmodd's left alone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPT = CHECKOUT / "contrib/kmodd-takeover"
HELPER = "/usr/libexec/kmodd/kmodd-request"
WANTS = "etc/systemd/system/sysinit.target.wants/kmodd.service"
DROPIN = "systemd-modules-load.service.d/50-kmodd.conf"
DROPIN_SRC = "usr/lib/kmodd/systemd/" + DROPIN
DROPIN_DEST = "etc/systemd/system/" + DROPIN


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A system tree with the package's files and a kernel.modprobe to save."""
    r = tmp_path / "root"
    rule = r / "usr/lib/kmodd/udev/80-drivers.rules"
    rule.parent.mkdir(parents=True)
    shutil.copy(CHECKOUT / "systemd/80-drivers.rules", rule)
    (r / DROPIN_SRC).parent.mkdir(parents=True)
    shutil.copy(CHECKOUT / "systemd" / DROPIN, r / DROPIN_SRC)
    helper = r / HELPER.lstrip("/")
    helper.parent.mkdir(parents=True)
    shutil.copy(CHECKOUT / "contrib/kmodd-request", helper)
    helper.chmod(0o755)
    unit = r / "lib/systemd/system/kmodd.service"
    unit.parent.mkdir(parents=True)
    shutil.copy(CHECKOUT / "systemd/kmodd.service", unit)
    (r / "proc/sys/kernel").mkdir(parents=True)
    (r / "etc").mkdir()
    (r / "var/lib").mkdir(parents=True)
    (r / "proc/sys/kernel/modprobe").write_text("/usr/local/sbin/site-modprobe\n")
    return r


@pytest.fixture
def spy(tmp_path: Path) -> Path:
    """udevadm and update-initramfs that record being run (they must not be, with --root)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("udevadm", "update-initramfs"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >>{tmp_path}/ran\n")
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def takeover(root: Path, spy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{spy}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(["sh", str(SCRIPT), *args, "--root", str(root)],
                          capture_output=True, text=True, env=env, timeout=60)


def proc(root: Path) -> str:
    return (root / "proc/sys/kernel/modprobe").read_text().strip()


def test_enable_then_disable_twice_each(root: Path, spy: Path) -> None:
    assert shutil.which("systemctl"), "systemctl is needed (apt-get install systemd)"
    for _ in range(2):
        r = takeover(root, spy, "enable")
        assert r.returncode == 0, r.stderr
        assert (root / "etc/udev/rules.d/80-drivers.rules").read_bytes() == \
            (root / "usr/lib/kmodd/udev/80-drivers.rules").read_bytes()
        assert (root / "etc/sysctl.d/50-kmodd.conf").read_text().splitlines()[-1] == \
            f"kernel.modprobe = {HELPER}"
        assert proc(root) == HELPER
        # The value to give back is the first one, not our own.
        assert (root / "var/lib/kmodd/modprobe.orig").read_text() == \
            "/usr/local/sbin/site-modprobe\n"
        assert (root / WANTS).is_symlink()
        # systemd-modules-load stands back while kmodd serves modules-load.d.
        assert (root / DROPIN_DEST).read_bytes() == (root / DROPIN_SRC).read_bytes()
    status = takeover(root, spy, "status").stdout
    assert "(kmodd's)" in status and f"kernel.modprobe = {HELPER}" in status
    assert f"systemd-modules-load drop-in: {root / DROPIN_DEST} (kmodd's)" in status
    assert "modules-load.d: not served by kmodd" in status
    for _ in range(2):
        r = takeover(root, spy, "disable")
        assert r.returncode == 0, r.stderr
        assert proc(root) == "/usr/local/sbin/site-modprobe"
        for gone in ("etc/udev/rules.d/80-drivers.rules", "etc/sysctl.d/50-kmodd.conf",
                     "var/lib/kmodd/modprobe.orig", WANTS, DROPIN_DEST):
            assert not (root / gone).exists(), gone
    status = takeover(root, spy, "status").stdout
    assert "udev's own" in status and "drop-in: none" in status
    # The directories enable created are gone again, the tree as it was.
    assert list((root / "etc").iterdir()) == [] and list((root / "var/lib").iterdir()) == []
    # --root never reloads the host's udev nor rebuilds its initramfs.
    assert not (spy.parent / "ran").exists()


def test_directories_that_were_there_stay(root: Path, spy: Path) -> None:
    (root / "etc/udev/rules.d").mkdir(parents=True)
    assert takeover(root, spy, "enable").returncode == 0
    assert takeover(root, spy, "disable").returncode == 0
    assert (root / "etc/udev/rules.d").is_dir()
    assert not (root / "etc/sysctl.d").exists()


def test_disable_without_saved_value_restores_sbin_modprobe(root: Path, spy: Path) -> None:
    (root / "proc/sys/kernel/modprobe").write_text(HELPER + "\n")
    assert takeover(root, spy, "enable").returncode == 0
    assert not (root / "var/lib/kmodd/modprobe.orig").exists()
    assert takeover(root, spy, "disable").returncode == 0
    assert proc(root) == "/sbin/modprobe"


def test_an_outdated_rule_is_replaced(root: Path, spy: Path) -> None:
    assert takeover(root, spy, "enable").returncode == 0
    ours = root / "etc/udev/rules.d/80-drivers.rules"
    ours.write_text(ours.read_text().replace("sm_ftl", "old"))
    assert "outdated" in takeover(root, spy, "status").stdout
    assert takeover(root, spy, "enable").returncode == 0
    assert "sm_ftl" in ours.read_text()


def test_someone_elses_rule_is_never_touched(root: Path, spy: Path) -> None:
    theirs = root / "etc/udev/rules.d/80-drivers.rules"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("# the administrator's own\n")
    r = takeover(root, spy, "enable")
    assert r.returncode == 1 and "not kmodd's" in r.stderr
    assert theirs.read_text() == "# the administrator's own\n"
    assert proc(root) == "/usr/local/sbin/site-modprobe"      # nothing else changed
    assert not (root / "etc/sysctl.d/50-kmodd.conf").exists()
    assert takeover(root, spy, "disable").returncode == 0
    assert theirs.read_text() == "# the administrator's own\n"


def test_an_outdated_drop_in_is_replaced(root: Path, spy: Path) -> None:
    assert takeover(root, spy, "enable").returncode == 0
    ours = root / DROPIN_DEST
    ours.write_text(ours.read_text().replace("After=kmodd.service\n", ""))
    assert "drop-in: " + str(ours) + " (kmodd's, outdated" in takeover(root, spy, "status").stdout
    assert takeover(root, spy, "enable").returncode == 0
    assert ours.read_bytes() == (root / DROPIN_SRC).read_bytes()


def test_someone_elses_drop_in_is_never_touched(root: Path, spy: Path) -> None:
    theirs = root / DROPIN_DEST
    theirs.parent.mkdir(parents=True)
    theirs.write_text("[Unit]\nAfter=my.service\n")
    r = takeover(root, spy, "enable")
    assert r.returncode == 1 and "not kmodd's" in r.stderr
    assert not (root / "etc/udev/rules.d/80-drivers.rules").exists()   # nothing changed
    assert proc(root) == "/usr/local/sbin/site-modprobe"
    r = takeover(root, spy, "disable")
    assert r.returncode == 0 and "is not kmodd's: left alone" in r.stderr
    assert theirs.read_text() == "[Unit]\nAfter=my.service\n"


def test_enable_without_the_package_fails_cleanly(tmp_path: Path, spy: Path) -> None:
    r = takeover(tmp_path, spy, "enable")
    assert r.returncode == 1 and "is the kmodd package installed" in r.stderr
    assert not (tmp_path / "etc").exists()


def test_unwritable_proc_is_a_warning_not_a_failure(root: Path, spy: Path) -> None:
    shutil.rmtree(root / "proc")
    r = takeover(root, spy, "enable")
    assert r.returncode == 0 and "warning: cannot write" in r.stderr
    assert (root / "etc/sysctl.d/50-kmodd.conf").is_file()


def test_bad_usage(root: Path, spy: Path) -> None:
    assert takeover(root, spy).returncode == 2
    assert takeover(root, spy, "enable", "disable").returncode == 2
    assert takeover(root, spy, "frobnicate").returncode == 2


