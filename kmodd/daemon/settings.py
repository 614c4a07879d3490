"""Daemon settings: ``/etc/kmodd.conf`` (TOML) with every setting also a flag.

Flags win over the file; SIGHUP re-reads the file and keeps the flags.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from kmodd.daemon.limits import (
    MAX_KMOD_CONCURRENT,
    RUNAWAY_LIMIT,
    RUNAWAY_WINDOW,
    default_max_workers,
)
from kmodd.record import dataclass, field, replace
from kmodd.resolution.names import modname_normalize
from kmodd.root import Root, run_path

# typing is for type checkers only: the daemon's head start follows these
# settings before the daemon has imported it (kmodd.cli.daemon).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

DEFAULT_CONFIG = "/etc/kmodd.conf"
# Drop-in directories, highest priority first, as systemd orders its own
# (conf_files_list_strv): a file name in an earlier directory hides the same
# name in later ones; the survivors apply in lexical order of their names
# after the main file, later ones overriding earlier ones.  A drop-in made a
# symlink to /dev/null (empty) masks the file of that name.
CONFIG_DROPIN_DIRS = ("/etc/kmodd.conf.d", run_path("kmodd.conf.d"),
                      "/usr/local/lib/kmodd/kmodd.conf.d", "/usr/lib/kmodd/kmodd.conf.d")
DEFAULT_SOCKET = run_path("control")
DEFAULT_STATE = run_path("state.json")
DEFAULT_REQUEST_FIFO = run_path("request")


class SettingsError(Exception):
    """A bad configuration file or flag; the message names the file, key and problem."""


@dataclass(frozen=True)
class Settings:
    max_workers: int = field(default_factory=default_max_workers)
    autoclean_interval: float = 60.0     # seconds between sweeps; 0 disables autoclean
    idle_timeout: float = 60.0           # how long a module must be unused before it goes
    never_unload: tuple[str, ...] = ()
    socket: str = DEFAULT_SOCKET
    state_file: str = DEFAULT_STATE
    request_fifo: str = DEFAULT_REQUEST_FIFO
    modprobe_config: tuple[str, ...] | None = None   # -C: replaces the modprobe.d dirs
    coldplug: bool = True
    log_level: str = "info"
    journal: bool | None = None          # None: journald when running under systemd
    backoff_initial: float = 5.0
    backoff_max: float = 600.0
    runaway_limit: int = RUNAWAY_LIMIT
    runaway_window: float = RUNAWAY_WINDOW
    queue_limit: int = 16384
    modules_load: bool = True            # load what modules-load.d and /etc/modules list
    head_start: bool = True              # insert last boot's coldplug modules at once
    deny: tuple[str, ...] = ()           # modules never loaded, whoever asks
    uevent_reader: str = "netlink"       # "netlink" (kmodd's own) or "pyudev"
    # not in the file: where and what to run against
    config_file: str = DEFAULT_CONFIG
    root: str = "/"
    modules_base: str | None = None
    version: str | None = None
    kernel: str = "real"                 # "real" or "sim:PATH"

    @property
    def root_obj(self) -> Root:
        return Root(Path(self.root),
                    Path(self.modules_base) if self.modules_base else None)


# Keys allowed in kmodd.conf and the type each must have.
_FILE_KEYS: dict[str, str] = {
    "max_workers": "int", "autoclean_interval": "number", "idle_timeout": "number",
    "never_unload": "names", "socket": "str", "state_file": "str", "request_fifo": "str",
    "modprobe_config": "strlist", "coldplug": "bool", "log_level": "str",
    "journal": "bool", "backoff_initial": "number", "backoff_max": "number",
    "runaway_limit": "int", "runaway_window": "number", "queue_limit": "int",
    "modules_load": "bool", "deny": "names", "uevent_reader": "str", "head_start": "bool",
}
_LOG_LEVELS = ("debug", "info", "notice", "warning", "error")
UEVENT_READERS = ("netlink", "pyudev")


def _check(key: str, value: Any, where: str) -> Any:
    kind = _FILE_KEYS[key]
    bad = f"{where}: {key} must be "
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(bad + f"an integer, not {value!r}")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(bad + f"a number of seconds, not {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise SettingsError(bad + f"true or false, not {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise SettingsError(bad + f"a non-empty string, not {value!r}")
        return value
    if kind in ("strlist", "names"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SettingsError(bad + f"a list of strings, not {value!r}")
        if kind == "names":
            return tuple(dict.fromkeys(modname_normalize(v) for v in value))
        return tuple(value)
    raise AssertionError(kind)


def _validate(values: dict[str, Any], where: str) -> dict[str, Any]:
    mw = values.get("max_workers")
    if mw is not None and not 1 <= mw <= MAX_KMOD_CONCURRENT:
        raise SettingsError(f"{where}: max_workers must be between 1 and "
                            f"{MAX_KMOD_CONCURRENT} (the kernel's MAX_KMOD_CONCURRENT), "
                            f"not {mw}")
    for key in ("autoclean_interval", "idle_timeout", "backoff_initial", "backoff_max",
                "runaway_window"):
        if key in values and values[key] < 0:
            raise SettingsError(f"{where}: {key} must not be negative, not {values[key]:g}")
    for key in ("runaway_limit", "queue_limit"):
        if key in values and values[key] < 1:
            raise SettingsError(f"{where}: {key} must be at least 1, not {values[key]}")
    reader = values.get("uevent_reader")
    if reader is not None and reader not in UEVENT_READERS:
        raise SettingsError(f"{where}: uevent_reader must be one of {', '.join(UEVENT_READERS)}, "
                            f"not {reader!r}")
    level = values.get("log_level")
    if level is not None and level.lower() not in _LOG_LEVELS:
        raise SettingsError(f"{where}: log_level must be one of {', '.join(_LOG_LEVELS)}, "
                            f"not {level!r}")
    return values


def read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """The settings a kmodd.conf sets (missing optional file: none)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise SettingsError(f"{path}: no such configuration file") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    import tomllib  # only when there is a file: it costs start-up time
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    # Allow the settings at the top level or under a [kmodd] table.
    if set(data) == {"kmodd"} and isinstance(data["kmodd"], dict):
        data = data["kmodd"]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FILE_KEYS:
            known = ", ".join(sorted(_FILE_KEYS))
            raise SettingsError(f"{path}: unknown setting {key!r} (known: {known})")
        values[key] = _check(key, value, str(path))
    return _validate(values, str(path))


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from kmodd.argparsing import VersionAction

    p = argparse.ArgumentParser(prog="kmodd",
                                description="on-demand kernel module loader daemon")
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--show-config", action="store_true",
                   help="print the effective settings and where each comes from, then exit")
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help=f"settings file (default {DEFAULT_CONFIG} under the root)")
    p.add_argument("--max-workers", type=int, metavar="N",
                   help=f"concurrent loads, 1..{MAX_KMOD_CONCURRENT} (default 8 + 2 x CPUs)")
    p.add_argument("--autoclean-interval", type=float, metavar="SECONDS",
                   help="seconds between autoclean sweeps; 0 disables (default 60)")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="unused time before a module kmodd loaded is unloaded (default 60)")
    p.add_argument("--never-unload", action="append", metavar="MODULES",
                   help="modules autoclean never unloads (repeatable, comma-separated)")
    p.add_argument("--socket", metavar="PATH", help=f"control socket ({DEFAULT_SOCKET})")
    p.add_argument("--state-file", metavar="PATH", help=f"state file ({DEFAULT_STATE})")
    p.add_argument("--request-fifo", metavar="PATH",
                   help=f"kernel request FIFO ({DEFAULT_REQUEST_FIFO})")
    p.add_argument("--root", metavar="DIR", help="filesystem root (tests)")
    p.add_argument("-d", "--dirname", dest="modules_base", metavar="DIR",
                   help="directory holding lib/modules/VERSION")
    p.add_argument("-S", "--set-version", dest="version", metavar="VERSION",
                   help="kernel version (default: running kernel)")
    p.add_argument("-C", "--modprobe-config", dest="modprobe_config", action="append",
                   metavar="PATH", help="modprobe.d file or directory (repeatable)")
    p.add_argument("--no-coldplug", dest="coldplug", action="store_false", default=None,
                   help="do not load drivers for devices already present")
    p.add_argument("--kernel", metavar="real|sim:PATH",
                   help="kernel to drive: the running one, or a simulated one (tests)")
    p.add_argument("--backoff-initial", type=float, metavar="SECONDS",
                   help="first retry delay after a failed load, doubled each time (default 5)")
    p.add_argument("--backoff-max", type=float, metavar="SECONDS",
                   help="longest retry delay (default 600)")
    p.add_argument("--runaway-limit", type=int, metavar="N",
                   help="requests for one key within the window before they are refused "
                        f"as a runaway (default {RUNAWAY_LIMIT})")
    p.add_argument("--runaway-window", type=float, metavar="SECONDS",
                   help=f"runaway detection window (default {RUNAWAY_WINDOW:g})")
    p.add_argument("--queue-limit", type=int, metavar="N",
                   help="distinct requests pending at most (default 16384)")
    p.add_argument("--no-modules-load", dest="modules_load", action="store_false", default=None,
                   help="do not load the modules listed in modules-load.d and /etc/modules")
    p.add_argument("--no-head-start", dest="head_start", action="store_false", default=None,
                   help="do not insert the modules the last boot loaded for devices still "
                        "present before the daemon has started")
    p.add_argument("--deny", action="append", metavar="MODULES",
                   help="modules never to load, whoever asks (repeatable, comma-separated)")
    p.add_argument("--log-level", choices=_LOG_LEVELS)
    p.add_argument("--uevent-reader", choices=UEVENT_READERS,
                   help="read uevents with kmodd's own netlink socket (default) or pyudev")
    journal = p.add_mutually_exclusive_group()
    journal.add_argument("--journal", dest="journal", action="store_true", default=None,
                         help="log to journald")
    journal.add_argument("--no-journal", dest="journal", action="store_false",
                         help="log to stderr")
    return p


# The daemon's usual command lines, read without argparse (0.4 MB of the idle
# daemon with the shutil, bz2 and lzma its help formatter imports, and start-up
# time): option -> (dest, kind).  Must say what build_parser says; help,
# --version, errors and every unusual form (--opt=value, abbreviations, a value
# starting with '-') are left to argparse (test_settings holds them together).
_FAST_VALUES: dict[str, tuple[str, str]] = {
    "--config": ("config_file", "str"), "--max-workers": ("max_workers", "int"),
    "--autoclean-interval": ("autoclean_interval", "float"),
    "--idle-timeout": ("idle_timeout", "float"),
    "--never-unload": ("never_unload", "append"), "--socket": ("socket", "str"),
    "--state-file": ("state_file", "str"), "--request-fifo": ("request_fifo", "str"),
    "--root": ("root", "str"), "-d": ("modules_base", "str"),
    "--dirname": ("modules_base", "str"), "-S": ("version", "str"),
    "--set-version": ("version", "str"), "-C": ("modprobe_config", "append"),
    "--modprobe-config": ("modprobe_config", "append"), "--kernel": ("kernel", "str"),
    "--backoff-initial": ("backoff_initial", "float"),
    "--backoff-max": ("backoff_max", "float"), "--runaway-limit": ("runaway_limit", "int"),
    "--runaway-window": ("runaway_window", "float"), "--queue-limit": ("queue_limit", "int"),
    "--deny": ("deny", "append"), "--log-level": ("log_level", "log_level"),
    "--uevent-reader": ("uevent_reader", "uevent_reader"),
}
_FAST_FLAGS: dict[str, tuple[str, bool]] = {
    "--show-config": ("show_config", True), "--no-coldplug": ("coldplug", False),
    "--no-modules-load": ("modules_load", False), "--no-head-start": ("head_start", False),
    "--journal": ("journal", True),
    "--no-journal": ("journal", False),
}
_FAST_CHOICES = {"log_level": _LOG_LEVELS, "uevent_reader": UEVENT_READERS}


def parse_fast(argv: Sequence[str]) -> SimpleNamespace | None:
    """``argv`` parsed as build_parser() would, or None to leave it to argparse."""
    ns = SimpleNamespace(**{dest: None for dest, _ in _FAST_VALUES.values()})
    ns.show_config = False
    ns.coldplug = ns.modules_load = ns.head_start = ns.journal = None
    journal_flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in _FAST_FLAGS:
            dest, flag = _FAST_FLAGS[arg]
            setattr(ns, dest, flag)
            if dest == "journal":
                journal_flags.add(arg)
            continue
        spec = _FAST_VALUES.get(arg)
        if spec is None or i >= len(argv) or argv[i].startswith("-"):
            return None
        dest, kind = spec
        raw = argv[i]
        i += 1
        value: Any
        if kind in ("int", "float"):
            try:
                value = int(raw) if kind == "int" else float(raw)
            except ValueError:
                return None
        elif kind == "append":
            value = [*(getattr(ns, dest) or ()), raw]
        elif kind in _FAST_CHOICES:
            if raw not in _FAST_CHOICES[kind]:
                return None
            value = raw
        else:
            value = raw
        setattr(ns, dest, value)
    if len(journal_flags) > 1:          # argparse's "not allowed with" error
        return None
    return ns


def _flag_values(ns: argparse.Namespace | SimpleNamespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("max_workers", "autoclean_interval", "idle_timeout", "socket", "state_file",
                "request_fifo", "root", "modules_base", "version", "coldplug", "kernel",
                "log_level", "journal", "config_file", "backoff_initial", "backoff_max",
                "runaway_limit", "runaway_window", "queue_limit", "modules_load",
                "uevent_reader", "head_start"):
        v = getattr(ns, key, None)
        if v is not None:
            out[key] = v
    if ns.never_unload:
        names = [n.strip() for item in ns.never_unload for n in item.split(",") if n.strip()]
        out["never_unload"] = tuple(dict.fromkeys(modname_normalize(n) for n in names))
    if ns.deny:
        names = [n.strip() for item in ns.deny for n in item.split(",") if n.strip()]
        out["deny"] = tuple(dict.fromkeys(modname_normalize(n) for n in names))
    if ns.modprobe_config:
        out["modprobe_config"] = tuple(ns.modprobe_config)
    kernel = out.get("kernel")
    if kernel is not None and kernel != "real" and not (kernel.startswith("sim:")
                                                        and len(kernel) > 4):
        raise SettingsError(f"--kernel must be 'real' or 'sim:PATH', not {kernel!r}")
    return _validate(out, "command line")


@dataclass(frozen=True)
class SettingsSource:
    """What is needed to rebuild the settings on SIGHUP: the flags, kept as given."""

    flags: dict[str, Any]
    show: bool = False          # --show-config: print the settings instead of running

    def load(self) -> Settings:
        return merge(self.flags)

    def describe(self) -> str:
        return show_config(*merge_with_sources(self.flags))


def _under_root(root: str, path: str) -> str:
    if root in ("", "/"):
        return path
    return str(Path(root) / path.lstrip("/"))


def config_files(root: str, config_file: str | None = None) -> list[Path]:
    """The settings files in the order they apply: the main file, then the drop-ins.

    An explicit ``--config`` file is read alone (no drop-ins)."""
    if config_file is not None:
        return [Path(config_file)]
    chosen: dict[str, Path] = {}
    for directory in CONFIG_DROPIN_DIRS:
        try:
            entries = list(Path(_under_root(root, directory)).iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".conf") and entry.name not in chosen:
                chosen[entry.name] = entry
    return [Path(_under_root(root, DEFAULT_CONFIG))] + [chosen[n] for n in sorted(chosen)]


def merge_with_sources(flags: dict[str, Any]) -> tuple[Settings, dict[str, str]]:
    """The settings, and for every file setting where its value came from:
    a file's path, "command line" or "default"."""
    root = flags.get("root", "/")
    explicit = flags.get("config_file")
    files = config_files(root, explicit)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for path in files:
        for key, value in read_config_file(path, required=explicit is not None).items():
            values[key] = value
            sources[key] = str(path)
    for key, value in flags.items():
        if key != "config_file":
            values[key] = value
            sources[key] = "command line"
    # Default run-time paths follow the root so tests never touch /run.
    for key, default in (("socket", DEFAULT_SOCKET), ("state_file", DEFAULT_STATE),
                         ("request_fifo", DEFAULT_REQUEST_FIFO)):
        values.setdefault(key, _under_root(root, default))
    values["config_file"] = str(files[0])
    settings = Settings(**values)
    for key in _FILE_KEYS:
        sources.setdefault(key, "default")
    return settings, sources


def merge(flags: dict[str, Any]) -> Settings:
    return merge_with_sources(flags)[0]


def show_config(settings: Settings, sources: dict[str, str]) -> str:
    """The effective file settings as kmodd.conf lines, each with its origin."""
    import json

    lines = []
    for key in _FILE_KEYS:
        value = getattr(settings, key)
        if value is None:
            lines.append(f"# {key} is unset  # {sources[key]}")
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = json.dumps(list(value))
        else:
            text = json.dumps(value)
        lines.append(f"{key} = {text}  # {sources[key]}")
    return "\n".join(lines)


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, SettingsSource]:
    """Parse flags and the file; raises SettingsError (argparse exits on bad flags)."""
    if argv is None:
        import sys
        argv = sys.argv[1:]
    ns: argparse.Namespace | SimpleNamespace | None = parse_fast(argv)
    if ns is None:
        ns = build_parser().parse_args(argv)
    source = SettingsSource(_flag_values(ns), show=bool(ns.show_config))
    return source.load(), source


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)
