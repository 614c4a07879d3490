"""sd_notify against a real datagram socket, the watchdog interval, and the
journald / stderr choice with structured fields."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd import journal
from kmodd.daemon import systemd as sd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_sends_fields(notify_socket: socket.socket) -> None:
    assert sd.notify(READY=1, STATUS="coldplug queued: 12 devices")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=coldplug queued: 12 devices\n"
    assert sd.notify(WATCHDOG=1)
    assert notify_socket.recv(4096) == b"WATCHDOG=1\n"


def test_notify_never_blocks_on_a_manager_that_stopped_reading(
        notify_socket: socket.socket) -> None:
    """A receive queue that is full (the listener stopped reading) makes notify
    fail at once instead of blocking the caller (the daemon's event loop)."""
    import threading
    sent: list[bool] = []

    def flood() -> None:
        # Far more than any receive queue holds (max_dgram_qlen, SO_RCVBUF).
        for i in range(5000):
            sent.append(sd.notify(STATUS=f"status {i} " + "x" * 512))

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "notify blocked on a full notify socket"
    assert sent[0] is True and sent[-1] is False
    notify_socket.recv(4096)             # the manager reads again: sends resume
    assert sd.notify(READY=1)


def test_notify_keeps_one_line_per_field(notify_socket: socket.socket) -> None:
    sd.notify(STATUS="two\nlines")
    assert notify_socket.recv(4096) == b"STATUS=two lines\n"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"kmodd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert sd.notify(STOPPING=1)
        assert sock.recv(100) == b"STOPPING=1\n"
    finally:
        sock.close()


def test_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd.notify(READY=1) is False


def test_notify_to_a_vanished_socket_does_not_raise(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd.notify(READY=1) is False


@pytest.mark.parametrize("usec,pid,expected", [
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "1", None),      # meant for another process
    ("0", None, None),
    ("junk", None, None),
    (None, None, None),
])
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert sd.watchdog_interval() == expected


@pytest.fixture
def clean_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("kmodd")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in saved[0]:
        logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_stderr_when_not_under_systemd(monkeypatch: pytest.MonkeyPatch,
                                       clean_logger: logging.Logger) -> None:
    for name in ("JOURNAL_STREAM", "INVOCATION_ID"):
        monkeypatch.delenv(name, raising=False)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    handler = journal.setup_logging()
    assert isinstance(handler, logging.StreamHandler)
    journal.log(logging.getLogger("kmodd.daemon.service"), logging.INFO, "loaded %s", "e1000",
           module="e1000", modalias="pci:v00008086d0000100E", devpath="/devices/pci0000:00",
           errno=None)
    line = stream.getvalue()
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} kmodd.daemon.service: INFO: loaded e1000", line), line
    assert "MODULE=e1000" in line and "MODALIAS=pci:v00008086d0000100E" in line
    assert "ERRNO" not in line      # None fields are left out


def test_journal_under_systemd_with_structured_fields(monkeypatch: pytest.MonkeyPatch,
                                                      clean_logger: logging.Logger) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    handler = journal.setup_logging()
    from systemd.journal import JournalHandler
    assert isinstance(handler, JournalHandler)
    sent: list[tuple[str, dict[str, Any]]] = []

    def capture(message: str, /, **fields: Any) -> None:
        # Same shape as systemd.journal.send(MESSAGE, **fields).
        sent.append((message, fields))

    handler.send = capture
    journal.log(logging.getLogger("kmodd.daemon.scheduler"), logging.ERROR, "cannot load %s",
                "e1000", module="e1000", errno=2, requested_by="uevent", devpath=None)
    message, fields = sent[0]
    assert message == "cannot load e1000"
    assert fields["MODULE"] == "e1000"
    assert fields["ERRNO"] == "2"
    assert fields["REQUESTED_BY"] == "uevent"
    assert fields["SYSLOG_IDENTIFIER"] == "kmodd"
    assert fields["PRIORITY"] == "3"
    assert "DEVPATH" not in fields


def test_journal_stream_must_match_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert journal.under_systemd()
    # Inherited by a child whose stderr went elsewhere: not ours.
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not journal.under_systemd()


def test_explicit_choice_wins(monkeypatch: pytest.MonkeyPatch,
                              clean_logger: logging.Logger) -> None:
    monkeypatch.setenv("INVOCATION_ID", "x")
    assert isinstance(journal.setup_logging(use_journal=False), logging.StreamHandler)
    # Calling again replaces the handler instead of doubling every line.
    journal.setup_logging(use_journal=False)
    assert len(clean_logger.handlers) == 1


def test_import_is_cheap() -> None:
    """kmodd.daemon.systemd and kmodd.journal are on the path to READY: no journal, no logging."""
    code = ("import sys, kmodd.daemon.systemd, kmodd.journal; "
            "print(sorted(m for m in ('logging', 'systemd.journal', 'ctypes') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.strip() == "[]"


# -- the units ---------------------------------------------------------------------

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> every value it is given, across sections (systemd allows repeats)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_service_unit_contract() -> None:
    s = unit_settings(UNITS / "kmodd.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["DefaultDependencies"] == ["no"]
    assert "sysinit.target" in s["Before"][0] and "systemd-journald.socket" in s["After"][0]
    assert s["RuntimeDirectory"] == ["kmodd"] and s["RuntimeDirectoryPreserve"] == ["yes"]
    caps = s["CapabilityBoundingSet"][0].split()
    assert "CAP_SYS_MODULE" in caps
    # The reply pipes of kmodd-request need ptrace read access (see kernelreq).
    assert "CAP_SYS_PTRACE" in caps
    assert s.get("ProtectKernelModules", ["no"]) == ["no"]
    assert s["ProtectSystem"] == ["strict"] and "/run/kmodd" in s["ReadWritePaths"][0].split()
    assert "@module" in s["SystemCallFilter"][0]
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0]
    assert s["ExecStart"] == ["/usr/sbin/kmodd"]
    assert s["ConditionCapability"] == ["CAP_SYS_MODULE"]
    assert s["OOMScoreAdjust"] == ["-1000"] and s["MemoryHigh"]
    assert s["StateDirectory"] == ["kmodd"]
    assert "man:kmodd(8)" in s["Documentation"][0].split()


def test_service_unit_never_holds_back_udev_or_waits_for_filesystems() -> None:
    s = unit_settings(UNITS / "kmodd.service")
    ordering = " ".join(s.get("Before", []) + s.get("After", []) + s.get("Wants", [])
                        + s.get("Requires", []))
    # udevd must not wait for an interpreter's start (and udev must never
    # be ordered after kmodd: nothing in this tree may add that back).
    assert "systemd-udev" not in ordering
    assert not (UNITS / "systemd-udevd.service.d").exists()
    # PrivateTmp= pulls in After=local-fs.target through systemd-tmpfiles-setup.
    assert s.get("PrivateTmp", ["no"]) == ["no"]
    assert "local-fs.target" not in ordering
    # After any stop (crash and watchdog kill included) udev takes over again,
    # and so does systemd-modules-load (see the drop-in tests below).
    assert s["ExecStopPost"] == [
        "-/bin/rm -f /run/kmodd/udev-handover /run/kmodd/modules-load.served"]


def test_service_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check the unit (apt-get install systemd)"
    unit = tmp_path / "kmodd.service"
    # Point ExecStart at something that exists; everything else as shipped.
    unit.write_text((UNITS / "kmodd.service").read_text()
                    .replace("ExecStart=/usr/sbin/kmodd", "ExecStart=/bin/true"))
    # --man=no: the pages are installed by the package (its check runs verify with them).
    r = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "kmodd.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def _rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


HANDOVER_TEST = 'TEST!="/run/kmodd/udev-handover", '


def test_udev_takeover_rules_are_udevs_plus_the_handover_condition() -> None:
    """The shipped rule must stay udev's own except for the hand-over TEST."""
    udev_rules = [Path(d) / "80-drivers.rules" for d in ("/usr/lib/udev/rules.d",
                                                         "/lib/udev/rules.d")]
    theirs = next((p for p in udev_rules if p.is_file()), None)
    assert theirs is not None, "udev's 80-drivers.rules is needed (apt-get install udev)"
    ours = _rule_lines((UNITS / "80-drivers.rules").read_text())
    modalias = [line for line in ours if "MODALIAS" in line]
    assert len(modalias) == 1 and HANDOVER_TEST in modalias[0]
    assert [line.replace(HANDOVER_TEST, "") for line in ours] == \
        _rule_lines(theirs.read_text())
    # kmodd-takeover recognises its own file by the first line.
    assert (UNITS / "80-drivers.rules").read_text().startswith("# kmodd-takeover:")


MODULES_LOAD_DROPIN = UNITS / "systemd-modules-load.service.d/50-kmodd.conf"


def test_modules_load_drop_in_stands_back_only_while_kmodd_serves() -> None:
    from kmodd.daemon.modules_load import MODULES_LOAD_MARKER
    from kmodd.daemon.settings import DEFAULT_STATE
    text = MODULES_LOAD_DROPIN.read_text()
    # kmodd-takeover recognises its own files by the first line.
    assert text.startswith("# kmodd-takeover:")
    s = unit_settings(MODULES_LOAD_DROPIN)
    # The file the daemon keeps while serving the lists (next to its state
    # file), which the unit removes after any stop.
    marker = str(Path(DEFAULT_STATE).parent / MODULES_LOAD_MARKER)
    assert s["ConditionPathExists"] == ["!" + marker]
    assert marker in unit_settings(UNITS / "kmodd.service")["ExecStopPost"][0].split()
    # Ordering only: no Requires=/Wants=/BindsTo= that would start kmodd, or
    # fail this service, when kmodd is not enabled or not installed.
    assert s["After"] == ["kmodd.service"]
    assert set(s) == {"After", "ConditionPathExists"}


def systemd_unit_dir() -> Path:
    for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(d) / "systemd-modules-load.service").is_file():
            return Path(d)
    raise AssertionError("systemd's units are needed (apt-get install systemd)")


def boot_cycles(tmp_path: Path, unit_text: str) -> list[str]:
    """systemd-analyze verify of a whole boot (multi-user.target) with kmodd
    enabled and the drop-in installed: the lines reporting ordering cycles."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (apt-get install systemd)"
    units = tmp_path / "units"
    (units / "systemd-modules-load.service.d").mkdir(parents=True)
    shutil.copy(MODULES_LOAD_DROPIN, units / "systemd-modules-load.service.d")
    (units / "kmodd.service").write_text(unit_text)
    (units / "sysinit.target.wants").mkdir()
    (units / "sysinit.target.wants/kmodd.service").symlink_to("../kmodd.service")
    # A trailing ":" keeps systemd's own unit directories after ours.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}
    r = subprocess.run([analyze, "verify", "--man=no", str(units / "kmodd.service"),
                        str(systemd_unit_dir() / "multi-user.target")],
                       capture_output=True, text=True, env=env, timeout=120)
    out = r.stdout + r.stderr
    return [line for line in out.splitlines() if "cycl" in line.lower()]


def test_modules_load_drop_in_makes_no_ordering_cycle(tmp_path: Path) -> None:
    shipped = (UNITS / "kmodd.service").read_text().replace(
        "ExecStart=/usr/sbin/kmodd", "ExecStart=/bin/true")
    assert boot_cycles(tmp_path / "shipped", shipped) == []
    # The check can fail: a kmodd ordered after systemd-sysctl (itself after
    # systemd-modules-load) closes a loop through the drop-in's After=.
    looped = shipped.replace("\nAfter=systemd-journald.socket",
                             "\nAfter=systemd-sysctl.service systemd-journald.socket")
    assert looped != shipped
    assert boot_cycles(tmp_path / "looped", looped)
