"""Fixtures shared by the unit tests of more than one module."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An empty run directory (mode 0755) for a daemon's FIFOs and pid files."""
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    return d
