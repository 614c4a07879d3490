"""SIGUSR2 makes the running daemon write every thread's stack and go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
VERSION = "9.9.9-stackdump"


def test_sigusr2_dumps_every_thread_and_the_daemon_goes_on(tmp_path: Path) -> None:
    moddir = tmp_path / "lib" / "modules" / VERSION
    moddir.mkdir(parents=True)
    for name in ("modules.dep", "modules.alias", "modules.softdep", "modules.builtin",
                 "modules.symbols"):
        (moddir / name).write_text("")
    sock = tmp_path / "run" / "kmodd" / "control"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmodd.cli.daemon", "--root", str(tmp_path),
         "--kernel", f"sim:{tmp_path / 'sim'}", "-S", VERSION, "--no-coldplug",
         "--no-journal", "--autoclean-interval", "0"],
        cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)},
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
        assert proc.poll() is None, "SIGUSR2 must not stop the daemon"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "most recent call first" in err, err
    # Every thread: the main one and the scheduler's workers at least.
    assert err.count("hread 0x") >= 2, err
    assert "kmodd/daemon/scheduler.py" in err, err
    assert "stopping: finishing loads in flight" in err
