"""Structured logging reaches a real systemd-journald with its fields.

A private journald runs in its own mount namespace (tmpfs on /run), so the
test needs root, as the project's tests do; it never touches a host journal.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

JOURNALD = "/lib/systemd/systemd-journald"

SCRIPT = textwrap.dedent(f"""
    set -e
    mount -t tmpfs tmpfs /run
    mkdir -p /run/systemd/journal
    {JOURNALD} >/dev/null 2>&1 &
    journald=$!
    trap 'kill $journald 2>/dev/null || true' EXIT
    for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
    "$PYTHON" -c '
    import logging
    from kmodd import journal as systemd
    systemd.setup_logging(use_journal=True)
    log = logging.getLogger("kmodd.daemon.service")
    systemd.log(log, logging.INFO, "loaded %s for %s", "e1000", "pci:v00008086d0000100E",
                module="e1000", modalias="pci:v00008086d0000100E",
                devpath="/devices/pci0000:00/0000:00:03.0", requested_by="coldplug")
    systemd.log(log, logging.WARNING, "cannot load %s: %s", "bad", "No such device",
                module="bad", errno=19)
    '
    for i in $(seq 100); do
        journalctl -t kmodd MODULE=e1000 -o json --no-pager | grep -q . && break
        sleep 0.05
    done
    journalctl -t kmodd MODULE=e1000 -o json --no-pager
    echo @@
    journalctl -t kmodd MODULE=bad -o json --no-pager
""")


def test_fields_are_queryable_with_journalctl() -> None:
    assert os.geteuid() == 0, "needs root: it runs a private journald in a mount namespace"
    assert os.path.exists(JOURNALD) and shutil.which("journalctl"), \
        "systemd-journald and journalctl are missing (scripts/install-deps.sh installs them)"
    out = subprocess.run(["unshare", "-m", "sh", "-c", SCRIPT], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable},
                         check=True).stdout
    e1000_part, bad_part = out.split("@@\n")
    (entry,) = [json.loads(line) for line in e1000_part.splitlines() if line.strip()]
    assert entry["MESSAGE"] == "loaded e1000 for pci:v00008086d0000100E"
    assert entry["SYSLOG_IDENTIFIER"] == "kmodd" and entry["PRIORITY"] == "6"
    assert entry["MODALIAS"] == "pci:v00008086d0000100E"
    assert entry["DEVPATH"] == "/devices/pci0000:00/0000:00:03.0"
    assert entry["REQUESTED_BY"] == "coldplug"
    (bad,) = [json.loads(line) for line in bad_part.splitlines() if line.strip()]
    assert bad["ERRNO"] == "19" and bad["PRIORITY"] == "4"


def test_a_field_that_cannot_be_encoded_keeps_the_line_and_never_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    from kmodd.journal import log

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    logger = logging.getLogger("kmodd.test.journal")
    with caplog.at_level(logging.INFO, logger="kmodd.test.journal"):
        log(logger, logging.INFO, "loaded %s", "e1000", module=Unprintable())
    assert [r.getMessage() for r in caplog.records] == ["loaded e1000"]
