"""The modules listed for loading at boot: what ``systemd-modules-load`` reads,
and Debian's ``/etc/modules``, all off the :class:`~kmodd.root.Root`.

* ``modules_load=a,b`` on the kernel command line (and ``rd.modules_load=``
  in the initrd only, as systemd's ``PROC_CMDLINE_STRIP_RD_PREFIX`` does);
* ``*.conf`` in ``/etc/modules-load.d``, ``/run/modules-load.d``,
  ``/usr/local/lib/modules-load.d``, ``/usr/lib/modules-load.d`` (and
  ``/lib/modules-load.d``, Debian's split-usr path): a file name in an
  earlier directory hides the same name in later ones, a symlink to
  ``/dev/null`` masks it, files are read in the order of their names
  (systemd's ``conf_files_list_nulstr``); one module per line, lines starting
  with ``#`` or ``;`` are comments;
* ``/etc/modules`` (Debian, modules(5)): one module per line, words after the
  name are its parameters, as Debian's kmod init script passed them.  Debian
  links ``/etc/modules-load.d/modules.conf`` to it; read once either way.

Each module is listed once, where it first appears (``kmodctl why`` names
that file and line).
"""

from __future__ import annotations

import os

from kmodd.record import dataclass

# The daemon's head start reads the lists before logging, typing or shlex are
# imported (kmodd.daemon.learned): types for type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from kmodd.root import Root

MODULES_LOAD_DIRS = ("etc/modules-load.d", "run/modules-load.d",
                     "usr/local/lib/modules-load.d", "usr/lib/modules-load.d",
                     "lib/modules-load.d")
DEBIAN_MODULES = "etc/modules"
CMDLINE = "kernel command line"
COMMENTS = "#;"


@dataclass(frozen=True)
class ListedModule:
    name: str
    source: str             # the file as seen from the root ("/etc/modules-load.d/x.conf")
    line: int               # 0 for the kernel command line
    options: str = ""

    @property
    def where(self) -> str:
        return self.source if self.line == 0 else f"{self.source}:{self.line}"


@dataclass(frozen=True)
class ListProblem:
    source: str
    message: str


def _shown(root: Root, path: Path) -> str:
    """The path as the administrator knows it: relative to the root, absolute."""
    try:
        return "/" + str(path.relative_to(root.base)).lstrip("/")
    except ValueError:
        return str(path)


def _is_mask(root: Root, path: Path) -> bool:
    if not path.is_symlink():
        return False
    try:
        target = os.readlink(path)
    except OSError:
        return False
    return target == "/dev/null" or path.resolve() == root.path("dev/null").resolve()


def conf_files(root: Root) -> list[Path]:
    """The *.conf files to read, in the order of their names; earlier directories
    win for the same name and a /dev/null link masks it (conf_files_list)."""
    chosen: dict[str, Path | None] = {}
    for rel in MODULES_LOAD_DIRS:
        d = root.path(rel)
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".conf") or name in chosen:
                continue
            path = d / name
            if _is_mask(root, path):
                chosen[name] = None
            elif path.is_file():
                chosen[name] = path
    return [p for _, p in sorted(chosen.items()) if p is not None]


def _cmdline_words(text: str) -> list[str]:
    import shlex
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def cmdline_modules(text: str, *, in_initrd: bool) -> list[str]:
    """``modules_load=`` (and ``rd.modules_load=`` in the initrd): comma lists, in order."""
    out: list[str] = []
    for word in _cmdline_words(text):
        key, eq, value = word.partition("=")
        # proc_cmdline_key_streq: "-" and "_" are the same in keys.
        key = key.replace("-", "_")
        if key.startswith("rd."):
            if not in_initrd:
                continue
            key = key[3:]
        if key != "modules_load":
            continue
        if not eq or not value:
            continue
        out += [m for m in value.split(",") if m]
    return out


def _read_lines(path: Path) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1)]


def listed_modules(root: Root, *, cmdline: str | None = None,
                   in_initrd: bool | None = None) -> tuple[list[ListedModule], list[ListProblem]]:
    """Every module listed for loading, once each, with where it was listed.

    ``cmdline=None`` reads ``ROOT/proc/cmdline``; ``in_initrd=None`` checks
    ``ROOT/etc/initrd-release`` like systemd's in_initrd().
    """
    problems: list[ListProblem] = []
    out: dict[str, ListedModule] = {}

    def add(name: str, source: str, line: int, options: str = "") -> None:
        from kmodd.resolution.names import modname_normalize
        key = modname_normalize(name)
        if key not in out:
            out[key] = ListedModule(name, source, line, options)

    if cmdline is None:
        try:
            cmdline = root.path("proc/cmdline").read_text(errors="replace")
        except OSError:
            cmdline = ""
    if in_initrd is None:
        in_initrd = root.path("etc/initrd-release").exists()
    for name in cmdline_modules(cmdline, in_initrd=in_initrd):
        add(name, CMDLINE, 0)

    debian = root.path(DEBIAN_MODULES)
    debian_real = debian.resolve() if debian.exists() else None
    files = conf_files(root)
    if debian_real is not None and not any(p.resolve() == debian_real for p in files):
        files.append(debian)
    for path in files:
        is_debian = debian_real is not None and path.resolve() == debian_real
        shown = _shown(root, path)
        try:
            lines = _read_lines(path)
        except OSError as exc:
            problems.append(ListProblem(shown, f"cannot read: {exc.strerror or exc}"))
            continue
        for n, text in lines:
            if not text or text[0] in COMMENTS:
                continue
            if is_debian:
                name, _, options = text.partition(" ")
                add(name, shown, n, " ".join(options.split()))
            elif any(c.isspace() for c in text):
                # systemd-modules-load looks the whole line up and fails on it.
                problems.append(ListProblem(f"{shown}:{n}",
                                            f"{text!r} is not a module name (one per line)"))
            else:
                add(text, shown, n)
    return list(out.values()), problems
