"""install commands: option text never becomes shell code, whatever its quoting context."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd import commands

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
