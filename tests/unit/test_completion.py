"""kmodctl's bash completion, driven through bash itself on a fixture root."""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kmodd.cli.kmodctl import COMMANDS

SCRIPT = Path(__file__).resolve().parents[2] / "contrib/bash-completion/kmodctl"
VERSION = "6.1.0-kmodd-complete"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    moddir = tmp_path / "lib/modules" / VERSION
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/drivers/net/dummy.ko.xz:\n"
        "kernel/sound/core/snd-timer.ko.xz: kernel/sound/core/snd.ko.xz\n"
        "kernel/sound/core/snd.ko.xz:\n"
        "kernel/fs/minix/minix.ko:\n")
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text(VERSION + "\n")
    (tmp_path / "proc/modules").write_text(
        "snd_timer 49152 0 - Live 0x0000000000000000\n"
        "snd 126976 1 snd_timer, Live 0x0000000000000000\n"
        "e1000 159744 0 - Live 0x0000000000000000\n")
    return tmp_path


def complete(line: str, root: Path | None = None) -> list[str]:
    """COMPREPLY for the command line ``line`` (completing its last word)."""
    bash = shutil.which("bash")
    assert bash, "bash is needed"
    words = line.split(" ")
    script = (f"source {shlex.quote(str(SCRIPT))}\n"
              f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}\n"
              "_kmodctl\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {"PATH": "/usr/bin:/bin"}
    if root is not None:
        env["KMODCTL_COMPLETION_ROOT"] = str(root)
    r = subprocess.run([bash, "--norc", "-c", script], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return sorted(x for x in r.stdout.splitlines() if x)


def test_subcommands() -> None:
    assert complete("kmodctl lo") == ["load"]
    assert complete("kmodctl ") == sorted([*COMMANDS, "--version", "--help"])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_flags_match_argparse(command: str) -> None:
    parser = argparse.ArgumentParser(prog=f"kmodctl {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser, command)
    expected = sorted(opt for action in parser._actions for opt in action.option_strings
                      if opt not in ("-h", "--help"))
    assert sorted(set(complete(f"kmodctl {command} -"))) == expected


def test_module_names_from_modules_dep(root: Path) -> None:
    assert complete("kmodctl load snd", root) == ["snd", "snd_timer"]
    assert complete("kmodctl load snd-t", root) == ["snd_timer"]
    assert complete("kmodctl info mi", root) == ["minix"]
    assert complete("kmodctl deps -q du", root) == ["dummy"]


def test_load_takes_parameters_after_the_name_unless_all(root: Path) -> None:
    assert complete("kmodctl load dummy s", root) == []
    assert complete("kmodctl load -a dummy s", root) == ["snd", "snd_timer"]


def test_other_tree_with_dirname_and_version(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "lib/modules/9.9").mkdir(parents=True)
    (other / "lib/modules/9.9/modules.dep").write_text("kernel/x/zz-top.ko:\n")
    assert complete(f"kmodctl load -d {other} -S 9.9 z", root) == ["zz_top"]


def test_loaded_modules_for_unload_and_why(root: Path) -> None:
    assert complete("kmodctl unload snd", root) == ["snd", "snd_timer"]
    assert complete("kmodctl why e", root) == ["e1000"]
    assert complete("kmodctl unload du", root) == []     # dummy is not loaded


def test_dry_run_flag_is_not_a_count(root: Path) -> None:
    assert complete("kmodctl load -n du", root) == ["dummy"]
    assert complete("kmodctl monitor -n ", root) == []
