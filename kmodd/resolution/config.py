"""modprobe.d, modules.softdep and the kernel command line, read as libkmod 30 reads them.

The rules follow libkmod's ``kmod_config_new``: every ``*.conf`` (and
``*.alias``) file of the configuration directories is merged into one list
sorted by file name, the first directory holding a name wins, and the module
directory's ``modules.softdep`` takes its place in that list under its own
name.  Lines are parsed like ``kmod_config_parse`` (``strtok`` on blanks,
backslash continuation, ``#`` only in the first column), and the kernel
command line like ``kmod_config_parse_kcmdline``.  Problems are collected,
logged and never fatal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kmodd.record import dataclass, field
from kmodd.resolution import aliasmatch
from kmodd.resolution.names import alias_normalize, is_glob
from kmodd.root import Root

if TYPE_CHECKING:
    import logging

# C's isspace() in the C locale, which the softdep parser uses.
_C_BLANKS = frozenset(" \t\n\v\f\r")
_C_SPACE = re.compile(r"[ \t\n\v\f\r]+")


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else \
            f"{self.path}: {self.message}"


@dataclass(frozen=True)
class SoftDep:
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()


@dataclass
class ModprobeConfig:
    """Everything modprobe.d and the kernel command line say, in libkmod's order.

    ``install``, ``remove`` and ``softdeps`` keep only the first entry per
    name: libkmod always uses the first match, so a later duplicate can never
    win.  Their keys are fnmatch patterns, as in libkmod.
    """

    aliases: list[tuple[str, str]] = field(default_factory=list)
    blacklist: set[str] = field(default_factory=set)
    options: dict[str, list[str]] = field(default_factory=dict)
    install: dict[str, str] = field(default_factory=dict)
    remove: dict[str, str] = field(default_factory=dict)
    softdeps: dict[str, SoftDep] = field(default_factory=dict)
    weakdeps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # Every options line as (module, options) in file order, so options for a
    # module and for the alias it was found by interleave like libkmod's list.
    option_entries: list[tuple[str, str]] = field(default_factory=list)
    # Every accepted line as (command, name, value) in libkmod's order,
    # duplicates included: what ``modprobe -c`` lists.
    entries: list[tuple[str, str, str]] = field(default_factory=list)

    def options_for(self, module: str, alias: str | None = None) -> str:
        """The options libkmod gives ``module`` (``kmod_module_get_options``).

        ``alias`` is the alias the module was found by, whose options apply
        too.  Empty option strings are skipped; the rest are joined by one
        space, leading blanks kept as libkmod keeps them.
        """
        if alias is None or alias == module or alias not in self.options:
            return " ".join(o for o in self.options.get(module, ()) if o)
        return " ".join(opts for name, opts in self.option_entries
                        if opts and name in (module, alias))


def _log() -> logging.Logger:
    # Imported on first problem only: kmodctl resolve's startup time is measured.
    import logging
    return logging.getLogger(__name__)


# ---------------------------------------------------------------- fnmatch

def compile_glob(pattern: str) -> Callable[[str], bool]:
    """A predicate equal to ``fnmatch(pattern, s, 0) == 0`` in glibc."""
    if not is_glob(pattern):
        return pattern.__eq__
    glob = aliasmatch.compile_glob(pattern)
    return lambda s: aliasmatch.glob_match(glob, s)


# ---------------------------------------------------------------- files

def _underscores(name: str | None) -> str | None:
    """libkmod's ``underscores()``: None for a missing or malformed name."""
    if name is None:
        return None
    try:
        return alias_normalize(name)
    except ValueError:
        return None


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """``freadline_wrapped``: (number of the last physical line, logical line).

    A backslash joins the next physical line; before any other character it is
    dropped and that character kept.
    """
    parts: list[str] = []
    physical = text.split("\n")
    # A final newline does not start another line.
    if physical and physical[-1] == "":
        physical.pop()
    for number, raw in enumerate(physical, 1):
        if "\\" not in raw:
            parts.append(raw)
            yield number, "".join(parts)
            parts = []
            continue
        buf: list[str] = []
        i, n = 0, len(raw)
        continued = False
        while i < n:
            c = raw[i]
            if c == "\\":
                if i + 1 >= n:
                    continued = number < len(physical) or text.endswith("\n")
                    if not continued:
                        # getc() returned EOF after the backslash: libkmod keeps it as 0xff
                        buf.append("\udcff")
                    break
                buf.append(raw[i + 1])
                i += 2
                continue
            buf.append(c)
            i += 1
        parts.append("".join(buf))
        if not continued:
            yield number, "".join(parts)
            parts = []
    if parts and "".join(parts):
        # a continuation ran into the end of the file: libkmod counts one line more
        yield len(physical) + 1, "".join(parts)


def _token(line: str, pos: int) -> tuple[str | None, int]:
    """``strtok_r(…, "\\t ")``: the next blank-separated token and the position after it."""
    n = len(line)
    while pos < n and line[pos] in " \t":
        pos += 1
    if pos >= n:
        return None, pos
    end = pos
    while end < n and line[end] not in " \t":
        end += 1
    return line[pos:end], (end + 1 if end < n else end)


def _rest(line: str, pos: int) -> str | None:
    """``strtok_r(NULL, "\\0", …)``: everything after the one blank that ended the last token."""
    return line[pos:] if pos < len(line) else None


def softdep_words(text: str) -> list[tuple[str, str]]:
    """(``pre:``/``post:``, name) in line order, split as ``kmod_config_add_softdep`` splits.

    Its scanner only skips a blank when another blank follows, so a single
    blank at the very start sticks to the first word (``"\tpre:"`` is not
    ``pre:``); words before any ``pre:``/``post:`` are ignored.
    """
    words: list[tuple[str, str]] = []
    mode = ""
    start = 0
    was_space = False
    n = len(text)
    for i in range(n + 1):
        end = i == n
        if not end:
            if text[i] not in _C_BLANKS:
                was_space = False
                continue
            if was_space:
                start = i + 1
                continue
            was_space = True
            if start >= i:
                continue
        word = text[start:i]
        if word in ("pre:", "post:"):
            mode = word
        elif (not end or not was_space) and mode:
            words.append((mode, word))
        start = i + 1
    return words


def parse_softdep(text: str) -> SoftDep:
    """A softdep line's ``pre:`` and ``post:`` lists."""
    words = softdep_words(text)
    return SoftDep(tuple(w for m, w in words if m == "pre:"),
                   tuple(w for m, w in words if m == "post:"))


class _Builder:
    def __init__(self) -> None:
        self.config = ModprobeConfig()

    def problem(self, path: str, line: int, message: str) -> None:
        problem = ConfigProblem(path, line, message)
        self.config.problems.append(problem)
        _log().warning("%s", problem)

    def add_options(self, module: str, options: str) -> None:
        options = options.replace("\t", " ")
        self.config.options.setdefault(module, []).append(options)
        self.config.option_entries.append((module, options))
        self.config.entries.append(("options", module, options))

    def add_blacklist(self, module: str) -> None:
        self.config.blacklist.add(module)
        self.config.entries.append(("blacklist", module, ""))

    def parse_file(self, path: str, text: str) -> None:
        cfg = self.config
        for number, line in _logical_lines(text):
            if "\0" in line:
                line = line[:line.index("\0")]
            if not line or line[0] == "#":
                continue
            cmd, pos = _token(line, 0)
            if cmd is None:
                continue
            first, pos = _token(line, pos)
            name = _underscores(first)
            if cmd == "alias":
                target, _ = _token(line, pos)
                module = _underscores(target)
                if name is not None and module is not None:
                    cfg.aliases.append((name, module))
                    cfg.entries.append(("alias", name, module))
                    continue
            elif cmd == "blacklist":
                if name is not None:
                    self.add_blacklist(name)
                    continue
            elif cmd in ("options", "install", "remove", "softdep", "weakdep"):
                rest = _rest(line, pos)
                if name is not None and rest is not None:
                    if cmd != "options":
                        cfg.entries.append((cmd, name, rest))
                    if cmd == "options":
                        self.add_options(name, rest)
                    elif cmd == "install":
                        cfg.install.setdefault(name, rest)
                    elif cmd == "remove":
                        cfg.remove.setdefault(name, rest)
                    elif cmd == "softdep":
                        cfg.softdeps.setdefault(name, parse_softdep(rest))
                    else:
                        # Newer kmod's weak dependencies: recorded, never loaded.
                        cfg.weakdeps.setdefault(name, tuple(w for w in _C_SPACE.split(rest) if w))
                    continue
            elif cmd in ("include", "config"):
                self.problem(path, number, f"command {cmd} is deprecated and not parsed anymore")
                continue
            else:
                self.problem(path, number, f"ignoring unknown command {cmd!r}")
                continue
            self.problem(path, number, f"ignoring bad line starting with {cmd!r}")

    def parse_cmdline(self, buf: str) -> None:
        """``kmod_config_parse_kcmdline``: ``module.param[=value]`` words, quote-aware.

        A word quoted as a whole by the boot loader (``"mod.p=a b"``) is given
        back as ``p="a b"``, like libkmod re-quotes it.
        """
        ignore, modname_s, param_s, value_s = 0, 1, 2, 3
        state = modname_s
        quoted = False
        quote_start = -1
        modname = 0
        dot = param = value = -1
        n = len(buf)
        p = 0
        while p <= n:
            c = buf[p] if p < n else "\0"
            complete = False
            if c == '"':
                quoted = not quoted
                if quoted and state == modname_s and p == modname:
                    quote_start = p
                    modname = p + 1
                elif state != value_s:
                    state = ignore
            elif c in "\0 \n\t\v\f\r":
                if quoted and state == value_s:
                    pass
                elif quoted:
                    state = ignore
                elif state in (value_s, param_s):
                    complete = True
                else:
                    modname = p + 1
                    state = modname_s
                    quote_start = -1
            elif c == ".":
                if state == modname_s:
                    dot = p
                    param = p + 1
                    state = param_s
                elif state == param_s:
                    state = ignore
            elif c == "=":
                if state == param_s:
                    value = p + 1
                    state = value_s
                elif state == modname_s:
                    state = ignore
            if complete:
                module = buf[modname:dot]
                val = buf[value:p] if state == value_s else None
                if quote_start >= 0 and val is not None:
                    val = '"' + val
                    option = buf[param:value] + val
                else:
                    option = buf[param:p]
                self._cmdline_result(module, option, val)
                modname = p + 1
                state = modname_s
                quote_start = -1
            p += 1

    def _cmdline_result(self, module: str, option: str, value: str | None) -> None:
        if module == "modprobe" and option.startswith("blacklist="):
            # libkmod 30 adds these names as written, without underscores().
            for name in (value if value is not None else "").split(","):
                self.add_blacklist(name)
            return
        normalized = _underscores(module)
        if normalized is None:
            self.problem("/proc/cmdline", 0,
                         f"ignoring bad option on kernel command line: {module!r}")
            return
        self.add_options(normalized, option)


def _conf_candidates(path: Path) -> Iterator[tuple[str, Path]]:
    """(name, file) pairs a configuration path contributes (``conf_files_list``)."""
    try:
        if not path.is_dir():
            if path.exists():
                yield path.name, path
            return
        entries = os.listdir(path)
    except OSError:
        return
    for name in entries:
        if name.startswith(".") or len(name) < 6 or \
                not (name.endswith(".conf") or name.endswith(".alias")):
            continue
        full = path / name
        if full.is_dir():
            _log().warning("directories inside directories are not supported: %s", full)
            continue
        yield name, full


def config_files(root: Root, moddir: Path | None,
                 config_paths: Sequence[str] | None = None) -> list[Path]:
    """The files libkmod would parse, in order."""
    chosen: dict[str, Path] = {}
    if moddir is not None:
        chosen["modules.softdep"] = moddir / "modules.softdep"
    paths = [Path(p) for p in config_paths] if config_paths is not None \
        else root.modprobe_dirs()
    for path in paths:
        for name, full in _conf_candidates(path):
            chosen.setdefault(name, full)
    # strcmp order on the names; bytes order equals code point order for UTF-8.
    return [chosen[name] for name in sorted(chosen)]


def parse_cmdline(cmdline: str) -> ModprobeConfig:
    """Only what the kernel command line contributes (for tests and diagnostics)."""
    builder = _Builder()
    builder.parse_cmdline(cmdline)
    return builder.config


def load_config(root: Root, moddir: Path | None, config_paths: Sequence[str] | None = None,
                cmdline: str | None = None) -> ModprobeConfig:
    """Read the whole modprobe configuration the way libkmod 30 does.

    ``config_paths`` (``modprobe -C``, files or directories) replaces the
    default modprobe.d directories; ``cmdline`` replaces ``ROOT/proc/cmdline``.
    """
    builder = _Builder()
    for path in config_files(root, moddir, config_paths):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        builder.config.files.append(str(path))
        builder.parse_file(str(path), data.decode("utf-8", "surrogateescape"))
    if cmdline is None:
        try:
            # libkmod reads at most one page of the command line.
            raw = (root.proc / "cmdline").read_bytes()[:4095]
        except OSError:
            raw = b""
        cmdline = raw.decode("utf-8", "surrogateescape")
    builder.parse_cmdline(cmdline)
    return builder.config
