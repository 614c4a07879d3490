"""install commands: option text never becomes shell code, whatever its quoting context."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kmodd.kernel import commands

HOSTILE = [
    "x=$(touch {p}1)",
    "x=`touch {p}2`",
    "a=1 ' ;touch {p}3; '",
    'b="$(touch {p}4)" c=\\" ;touch {p}5 #',
    "d=\"' ;touch {p}6; echo '\"",
    "e=${{x:=$(touch {p}7)}}",
    "f=* g=;touch {p}8",
]


@pytest.mark.parametrize("template", HOSTILE)
@pytest.mark.parametrize("context", ["unquoted", "double", "single", "double-in-subst"])
def test_hostile_options_never_run_in_any_quoting_context(tmp_path: Path, template: str,
                                                         context: str) -> None:
    pwned = tmp_path / "pwned"
    out = tmp_path / "out"
    options = template.format(p=pwned)
    command = {
        "unquoted": f"printf '%s\\n' $CMDLINE_OPTS > {out}",
        "double": f"printf '%s\\n' \"opts=$CMDLINE_OPTS\" > {out}",
        "single": f"printf '%s\\n' 'opts=$CMDLINE_OPTS' > {out}",
        "double-in-subst": f"printf '%s\\n' \"$(printf '%s' \"[$CMDLINE_OPTS]\")\" > {out}",
    }[context]
    res = commands.run_install("m", command, options)
    assert res.ok, res.error
    assert list(tmp_path.glob("pwned*")) == []
    lines = out.read_text().splitlines()
    if context == "unquoted":
        # One literal argument per kernel-parameter word: no globbing, no splitting.
        assert lines == commands.split_options(options)
    elif context == "double-in-subst":
        assert lines == [f"[{options}]"]
    else:
        # The text modprobe would paste there, as literal text.
        assert lines == [f"opts={options}"]


def test_contexts_are_recognised() -> None:
    scan = commands._scan
    assert [c for _, c in scan("a $CMDLINE_OPTS \"$CMDLINE_OPTS\" '$CMDLINE_OPTS'")] == \
        ["none", "double", "single"]
    # A command substitution inside double quotes starts a new, unquoted command.
    assert [c for _, c in scan("\"x $(echo $CMDLINE_OPTS) $CMDLINE_OPTS\"")] == ["none", "double"]
    assert [c for _, c in scan("\"`echo $CMDLINE_OPTS`\" `b $CMDLINE_OPTS`")] == ["none", "none"]
    # Escaped: the shell prints it literally, and so do we.
    assert scan("echo \\$CMDLINE_OPTS \"\\$CMDLINE_OPTS\"") == []
    # A quote character inside the other kind of quotes does not switch contexts.
    assert [c for _, c in scan("\"it's $CMDLINE_OPTS\" 'say \"$CMDLINE_OPTS'")] == \
        ["double", "single"]


def test_suffix_and_empty_options_like_kmod(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # libkmod replaces the text "$CMDLINE_OPTS" wherever it stands, suffix or not.
    res = commands.run_install("m", f"printf '%s|' $CMDLINE_OPTSx \"<$CMDLINE_OPTS>\" > {out}",
                               "a=1 b=2")
    assert res.ok, res.error
    assert out.read_text() == "a=1|b=2x|<a=1 b=2>|"
    res = commands.run_install("m", f"printf '%s|' x $CMDLINE_OPTS \"<$CMDLINE_OPTS>\" > {out}",
                               "")
    assert res.ok, res.error
    assert out.read_text() == "x|<>|"


def test_remove_commands_get_no_options(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = commands.run_remove("m", f"printf '%s|' x $CMDLINE_OPTS \"$MODPROBE_MODULE\" > {out}")
    assert res.ok, res.error
    assert out.read_text() == "x|m|"


FAKE_SYSTEMD_RUN = """#!/usr/bin/python3
# Stands in for systemd-run --pipe --wait: a clean environment plus --setenv
# values, the command after '--', stdin passed through; argv recorded.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
env = {"PATH": "/usr/bin:/bin"}
i = 0
while args[i] != "--":
    if args[i].startswith("--setenv="):
        key, _, value = args[i][len("--setenv="):].partition("=")
        env[key] = value
    i += 1
sys.exit(subprocess.run(args[i + 1:], env=env).returncode)
"""


@pytest.fixture
def under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "systemd-run"
    fake.write_text(FAKE_SYSTEMD_RUN)
    fake.chmod(0o755)
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    monkeypatch.setattr(commands, "SYSTEMD_BOOTED", str(booted))
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    log = tmp_path / "systemd-run.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_commands_run_in_a_transient_unit_under_systemd(under_systemd: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    pwned = tmp_path / "pwned"
    options = f'a=1 b="x y" c=$(touch {pwned}) d=`touch {pwned}` e=${{HOME}}'
    command = (f"printf '%s\\n' $CMDLINE_OPTS \"[$CMDLINE_OPTS]\" \"$MODPROBE_MODULE\" "
               f"> {out}; cat >> {out}")     # stdin is /dev/null, not the rest of the script
    res = commands.run_install("snd", command, options)
    assert res.ok, (res.error, res.output)
    assert not pwned.exists()
    assert out.read_text().splitlines() == [*commands.split_options(options),
                                            f"[{options}]", "snd"]
    (argv,) = [json.loads(line) for line in under_systemd.read_text().splitlines()]
    assert argv[:4] == ["--pipe", "--wait", "--collect", "--quiet"]
    assert argv[argv.index("--") + 1:] == [commands.SHELL, "-s"]
    # Request text only ever in --setenv values, which the manager never expands.
    assert all("$" not in arg for arg in argv if not arg.startswith("--setenv="))
    assert "--setenv=MODPROBE_MODULE=snd" in argv
    # A failing command is a failing command.
    res = commands.run_remove("snd", "exit 7")
    assert not res.ok and "exit status 7" in (res.error or "")


def test_without_systemd_commands_run_directly(under_systemd: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setattr(commands, "SYSTEMD_BOOTED", str(tmp_path / "not-booted"))
    assert commands.transient_runner() is None
    assert commands.run_install("m", "true").ok
    assert not under_systemd.exists()
    monkeypatch.undo()
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert commands.transient_runner() is None
