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


def test_debian_12s_zstandard_decompresses_modules(tmp_path: Path) -> None:
    """The floor is what Debian ships: kmodd's zstd reader under Debian's own
    python3 and python3-zstandard (scripts/install-deps.sh installs both)."""
    import shutil
    import subprocess

    assert shutil.which("zstd"), "zstd is needed (apt-get install zstd)"
    payload = tmp_path / "mod.ko"
    payload.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    for flags, name in (([], "sized.zst"), (["--no-content-size"], "streamed.zst")):
        with payload.open("rb") as src, (tmp_path / name).open("wb") as dst:
            subprocess.run(["zstd", "-q", "-c", *flags], stdin=src, stdout=dst, check=True)
    code = ("import sys, zstandard; sys.path.insert(0, sys.argv[1]); "
            "from kmodd.modfile.zstd import decompress; "
            "want = open(sys.argv[2], 'rb').read(); "
            "assert all(decompress(open(p, 'rb').read()) == want for p in sys.argv[3:]); "
            "print(zstandard.__version__)")
    r = subprocess.run(["/usr/bin/python3", "-c", code, str(CHECKOUT), str(payload),
                        str(tmp_path / "sized.zst"), str(tmp_path / "streamed.zst")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    major, minor = (int(x) for x in r.stdout.strip().split(".")[:2])
    assert (major, minor) >= (0, 20)


def test_entry_points_are_the_lean_ones(tmp_path: Path) -> None:
    """debian/rules writes both entry points from contrib/debian/console-script,
    which runs the front end without the generated wrapper's ``import re``."""
    import os
    import subprocess

    template = (CHECKOUT / "contrib/debian/console-script").read_text()
    assert "@MODULE@" in template and "\nimport re\n" not in template
    for module, dest in (("kmodd.cli.daemon", "usr/sbin/kmodd"),
                         ("kmodd.cli.kmodctl", "usr/bin/kmodctl")):
        assert f"s/@MODULE@/{module}/' contrib/debian/console-script >$(PKG)/{dest}" in RULES
    script = tmp_path / "kmodctl"
    script.write_text(template.replace("@MODULE@", "kmodd.cli.kmodctl"))
    code = ("import sys; script = sys.argv.pop(1); sys.argv[0] = script; "
            "exec(compile(open(script).read(), script, 'exec'))")
    res = subprocess.run([sys.executable, "-S", "-c", code, str(script), "status", "--socket",
                          str(tmp_path / "none")], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(CHECKOUT)})
    assert res.returncode == 1 and "kmodd is not running" in res.stderr
