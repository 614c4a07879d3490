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
    """Completion offers what --help shows: options whose help is
    argparse.SUPPRESS (load --kernel-request, for kmodd-request) are internal."""
    parser = argparse.ArgumentParser(prog=f"kmodctl {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser, command)
    expected = sorted(opt for action in parser._actions for opt in action.option_strings
                      if opt not in ("-h", "--help") and action.help != argparse.SUPPRESS)
    assert sorted(set(complete(f"kmodctl {command} -"))) == expected


def test_hidden_options_are_not_offered() -> None:
    assert "--kernel-request" not in complete("kmodctl load --")
    assert complete("kmodctl load --k") == []


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


def test_new_commands_complete_by_prefix() -> None:
    assert complete("kmodctl bl") == ["blame"]
    assert complete("kmodctl cr") == ["critical-chain"]
    assert complete("kmodctl de") == ["deny", "deps"]
    assert complete("kmodctl status --p") == ["--prometheus"]


def test_critical_chain_takes_one_loaded_module(root: Path) -> None:
    assert complete("kmodctl critical-chain snd", root) == ["snd", "snd_timer"]
    assert complete("kmodctl critical-chain --json e", root) == ["e1000"]
    assert complete("kmodctl critical-chain --socket /run/x s", root) == ["snd", "snd_timer"]
    assert complete("kmodctl critical-chain snd s", root) == []     # one module at most


def test_deny_offers_modules_from_modules_dep(root: Path) -> None:
    # Any module of the tree, loaded or not, and several of them.
    assert complete("kmodctl deny du", root) == ["dummy"]
    assert complete("kmodctl deny dummy snd-", root) == ["snd_timer"]
    assert complete("kmodctl deny e", root) == []       # loaded, but not in modules.dep


def test_allow_offers_the_persistent_deny_list(root: Path, tmp_path: Path) -> None:
    assert complete("kmodctl allow ", root) == []       # no list yet
    deny = root / "var/lib/kmodd/deny"
    deny.parent.mkdir(parents=True)
    deny.write_text("# modules kmodd never loads (kmodctl deny/allow)\n"
                    "floppy\npc-spkr  # noisy\n\n   # nothing\nsnd_timer\n")
    assert complete("kmodctl allow ", root) == ["floppy", "pc_spkr", "snd_timer"]
    assert complete("kmodctl allow pc", root) == ["pc_spkr"]
    # --root DIR: that tree's list, not the completion root's.
    other = tmp_path / "other"
    (other / "var/lib/kmodd").mkdir(parents=True)
    (other / "var/lib/kmodd/deny").write_text("vfat\n")
    assert complete(f"kmodctl allow --root {other} ", root) == ["vfat"]
    assert complete(f"kmodctl allow --root={other}/ v", root) == ["vfat"]


def test_root_completes_directories(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "treefile").write_text("")
    assert complete(f"kmodctl deny --root {tmp_path}/tr") == [f"{tmp_path}/tree"]
