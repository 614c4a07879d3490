"""The man pages (man/*.scd) cannot drift from --help: every flag, sub-command
and kmodd.conf setting must be on its page, and every page must build."""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kmodd.cli.kmodctl import COMMANDS
from kmodd.daemon.settings import _FILE_KEYS, build_parser

MAN = Path(__file__).resolve().parents[2] / "man"
CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
PAGES = ("kmodd.8", "kmodctl.8", "kmodd-request.8", "kmodd.conf.5", "kmodd-takeover.8")


def page(name: str) -> str:
    return (MAN / f"{name}.scd").read_text()


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings
            if opt not in ("-h", "--help")]


def sections(text: str, level: str) -> dict[str, str]:
    """Heading -> body, for headings of ``level`` ("#" or "##")."""
    parts = re.split(rf"^{level} (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_every_kmodd_flag_is_on_its_page() -> None:
    text = page("kmodd.8")
    missing = [opt for opt in options(build_parser()) if f"*{opt}*" not in text]
    assert not missing, f"kmodd(8) lacks {missing}"


def test_every_kmodctl_command_and_flag_is_on_its_page() -> None:
    text = page("kmodctl.8")
    commands = sections(text, "##")
    shared = sections(text, "#")["TREE OPTIONS"]
    missing = []
    for command, (module, _) in COMMANDS.items():
        if command not in commands:
            missing.append(command)
            continue
        parser = argparse.ArgumentParser(prog=f"kmodctl {command}")
        importlib.import_module(module).add_arguments(parser, command)
        for opt in options(parser):
            if f"*{opt}*" not in commands[command] and f"*{opt}*" not in shared:
                missing.append(f"{command} {opt}")
    assert "*--version*" in text
    assert not missing, f"kmodctl(8) lacks {missing}"


def test_every_setting_is_in_kmodd_conf_5() -> None:
    text = sections(page("kmodd.conf.5"), "#")["SETTINGS"]
    missing = [key for key in _FILE_KEYS if f"*{key}*" not in text]
    assert not missing, f"kmodd.conf(5) lacks {missing}"


def test_every_takeover_option_is_on_its_page() -> None:
    script = (CONTRIB / "kmodd-takeover").read_text()
    flags = set(re.findall(r"^\t(-[-a-z]+)(?:[|=)])", script, flags=re.M))
    for actions in re.findall(r"^\t([a-z|]+)\) \[ -z \"\$action\" \]", script, flags=re.M):
        flags |= set(actions.split("|"))
    assert {"--root", "--no-initramfs", "enable"} <= flags
    text = page("kmodd-takeover.8")
    missing = sorted(f for f in flags if f"*{f}*" not in text)
    assert not missing, f"kmodd-takeover(8) lacks {missing}"


@pytest.mark.parametrize("name", PAGES)
def test_page_builds(name: str, tmp_path: Path) -> None:
    scdoc = shutil.which("scdoc")
    assert scdoc, "scdoc is needed to build the man pages (apt-get install scdoc)"
    r = subprocess.run([scdoc], input=page(name), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    title, section = name.rsplit(".", 1)
    assert r.stdout.count(f'.TH "{title}" "{section}"') == 1
