"""--version everywhere, from pyproject.toml alone."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import kmodd

CHECKOUT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["version"]


def test_package_version_is_pyprojects() -> None:
    assert kmodd.version() == VERSION == kmodd.__version__


@pytest.mark.parametrize("module,prog", [("kmodd.cli.daemon", "kmodd"),
                                         ("kmodd.cli.kmodctl", "kmodctl")])
def test_version_flag(module: str, prog: str) -> None:
    r = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                       text=True, timeout=60, cwd=CHECKOUT)
    assert r.returncode == 0 and r.stdout == f"{prog} {VERSION}\n", r.stderr


def test_takeover_script_version_is_baked_by_the_package_only() -> None:
    r = subprocess.run(["sh", str(CHECKOUT / "contrib/kmodd-takeover"), "--version"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "kmodd-takeover (from a source tree)\n"
