"""Packaging facts that are cheap to check without building: the pip install's
kmodd-request is the sh helper, the package bakes settings the helper still has,
and every Python dependency maps to a Debian package in contrib/debian/control."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
CONTROL = (CHECKOUT / "contrib/debian/control").read_text()
RULES = (CHECKOUT / "contrib/debian/rules").read_text()
HELPER = (CHECKOUT / "contrib/kmodd-request").read_text()

# PyPI name -> the Debian 12 package providing it
DEBIAN = {"pyudev": "python3-pyudev", "systemd-python": "python3-systemd",
          "pyelftools": "python3-pyelftools", "zstandard": "python3-zstandard"}


def test_pip_puts_the_sh_helper_on_path() -> None:
    assert PYPROJECT["tool"]["setuptools"]["script-files"] == ["contrib/kmodd-request"]
    scripts = PYPROJECT["project"]["scripts"]
    assert "kmodd-request" not in scripts and scripts["kmodd-request-py"]
    installed = Path(sys.executable).parent / "kmodd-request"
    if installed.exists():      # running from the project's venv (scripts/install-deps.sh)
        assert installed.read_text().startswith("#!/bin/sh\n")


def test_every_python_dependency_is_a_debian_package() -> None:
    depends = CONTROL.split("\nPackage: kmodd\n", 1)[1]
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]
        assert DEBIAN[name] in depends, f"{name}: add {DEBIAN[name]} to Depends"
    assert re.search(r"python3 \(>= 3\.11\)", depends) and "kmod," in depends
    # ExecReload=/bin/kill: procps, which minbase systems lack.
    assert "procps," in depends


def test_zstandard_floor_is_debian_12s() -> None:
    floor = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("zstandard"))
    assert floor == "zstandard>=0.20"


def test_the_package_bakes_lines_the_helper_still_has() -> None:
    # debian/rules rewrites these two defaults; a helper without them would be
    # installed with the "auto" fallback (the build's grep catches it too).
    assert ': "${KMODD_KMODCTL:=kmodctl}"\n' in HELPER
    assert ': "${KMODD_FALLBACK:=auto}"\n' in HELPER
    assert "KMODD_FALLBACK:=modprobe" in RULES and "KMODD_KMODCTL:=/usr/bin/kmodctl" in RULES


def test_the_unit_runs_what_the_package_installs() -> None:
    unit = (CHECKOUT / "systemd/kmodd.service").read_text()
    assert "ExecStart=/usr/sbin/kmodd\n" in unit
    assert "mv $(PKG)/usr/bin/kmodd $(PKG)/usr/sbin/kmodd" in RULES
