"""The README's main job (``scripts/run-main.sh`` with no KMODD_MAIN_JOB): kmodd as
the loader of a booted Debian machine meets every milestone.

It boots the takeover image (built and cached by the fixtures of the other
boot tests, so only the boot itself is paid here) on a machine of its own.
"""

from __future__ import annotations

import re

import pytest

from testbed import boot_job, main_job

from .conftest import Snapshot


def test_the_main_job_is_the_boot_job_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[bool] = []

    def fake_main(console: bool = False) -> int:
        ran.append(console)
        return 0

    monkeypatch.setattr(boot_job, "main", fake_main)
    monkeypatch.delenv("KMODD_MAIN_JOB", raising=False)
    assert main_job.main() == 0 and ran == [False]
    monkeypatch.setenv("KMODD_MAIN_JOB", "boot")
    assert main_job.main(console=True) == 0 and ran == [False, True]


def test_boot_main_job_meets_every_milestone(handback_boot: Snapshot,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # After the other boot tests (handback_boot is the last of their boots):
    # the shared machine is idle, so the two never compete for the CPUs.
    rc = boot_job.main()
    out = capsys.readouterr().out
    print(out)      # the narrative, for the test report
    assert rc == 0, f"the main job failed:\n{out[-6000:]}"
    for milestone in boot_job.MILESTONES:
        assert re.search(rf"^\[\+ *[0-9.]+s\] +{re.escape(milestone)} +met$", out, re.M), milestone
    assert "kmodd boot job: every milestone met" in out
