"""The README's main job (``testbed/main_job.py``) on a guest of its own.

``tests/vm/test_service_e2e.py`` checks each behaviour of the daemon in
detail; this test checks that the demonstration an administrator runs
(``scripts/run-main.sh``) still works from start to end: the job function
meets every milestone, says so, and exits 0.  One boot, about a minute on an
idle host (several under load).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from testbed.main_job import JOB, JOBS, MILESTONES, daemon_demo, sections, selected_job
from testbed.vm import VM


def test_job_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMODD_MAIN_JOB", raising=False)
    assert selected_job() is JOB is daemon_demo
    monkeypatch.setenv("KMODD_MAIN_JOB", "resolve")
    assert selected_job() is JOBS["resolve"]
    monkeypatch.setenv("KMODD_MAIN_JOB", "testbed.main_job:daemon_demo")
    assert selected_job() is daemon_demo
    assert sections("@@ a\nx\ny\n@@ rc 3\n@@ b\n@@ rc 0\n") == {"a": (3, "x\ny\n"), "b": (0, "")}


def test_daemon_demo_meets_every_milestone(fresh_vm: Callable[..., VM],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    vm = fresh_vm()
    rc = daemon_demo(vm)
    out = capsys.readouterr().out
    print(out)      # the narrative, for the test report
    assert rc == 0, f"the main job failed:\n{out[-6000:]}"
    for milestone in MILESTONES:
        assert re.search(rf"^\[\+ *[0-9.]+s\] OK +{milestone}: ", out, re.M), milestone
    assert "kmodd main job: every milestone met" in out
    # Narrated as it happened: the daemon's own log lines, in order.
    order = [out.find(marker) for marker in
             ("kmodd ready", "coldplug done", "loaded e1000e for", "loaded dummy for",
              "autoclean: unloaded dummy")]
    assert -1 not in order and order == sorted(order), order
