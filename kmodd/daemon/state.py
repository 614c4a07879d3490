"""What kmodd loaded, when and why: the record autoclean and ``kmodctl why`` rely on.

Persisted as JSON under ``/run/kmodd/state.json`` so a restarted daemon
still knows which modules are its own (and so still never touches anyone
else's).  Written atomically: temporary file, fsync, rename.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from kmodd.journal import log
from kmodd.record import dataclass, replace

LOG = logging.getLogger(__name__)

STATE_VERSION = 1
_TMP_PREFIX = ".state."     # name prefix of a save in progress

# Temporary names: prefix + pid + a counter.  Not tempfile.mkstemp: it imports
# shutil, random, bz2 and lzma (about 1 MB of the idle daemon) for a name.
_tmp_counter = itertools.count()
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_TMP_TRIES = 100


def _create_temporary(directory: Path, prefix: str) -> tuple[int, str]:
    """A new file, mode 0600, beside the target: O_EXCL as mkstemp does, so a
    name left by an earlier process of the same pid is skipped, never reused."""
    for _ in range(_TMP_TRIES):
        tmp = f"{directory}/{prefix}{os.getpid()}.{next(_tmp_counter)}"
        try:
            return os.open(tmp, _TMP_FLAGS, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name after {_TMP_TRIES} tries")


def write_atomically(path: Path, data: bytes, *, mode: int, prefix: str,
                     durable: bool = True) -> None:
    """Temporary file beside ``path``, then rename: a crash leaves the old file
    or the new one, never half of one.  ``durable``: fsync the file before the
    rename and the directory after it (the rename is only durable then)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)      # whatever the umask, as before
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


@dataclass
class ModuleRecord:
    name: str
    loaded_at: float                 # wall clock (survives a restart, unlike monotonic)
    kind: str                        # request kind: modalias | kernel | admin | coldplug
    key: str                         # the modalias / request name that caused it
    devpath: str | None = None
    requested_by: str = ""
    role: str = "target"             # plan role: target, dependency, softdep-pre/post
    via: tuple[str, ...] = ()        # the targets it was loaded for
    idle_since: float | None = None  # first sweep that saw it unused (wall clock)
    idle_sweeps: int = 0             # consecutive sweeps that saw it unused
    # Kernel.instance() right after kmodd loaded it: a module of the same name
    # with another identity was loaded again by someone else and is not ours.
    instance: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies and is slow for every save.
        return {"name": self.name, "loaded_at": self.loaded_at, "kind": self.kind,
                "key": self.key, "devpath": self.devpath, "requested_by": self.requested_by,
                "role": self.role, "via": list(self.via), "idle_since": self.idle_since,
                "idle_sweeps": self.idle_sweeps, "instance": self.instance}

    @classmethod
    def from_dict(cls, data: Any) -> ModuleRecord:
        """A record from its JSON form; ValueError saying what is wrong with it.

        Every field's type is checked here, once, so nothing downstream (the
        sweep, ``kmodctl why``) ever meets a number where it expects text."""
        if not isinstance(data, dict):
            raise ValueError("record is not an object")
        for required in ("name", "loaded_at", "kind", "key"):
            if required not in data:
                raise ValueError(f"record lacks {required!r}")
        kwargs: dict[str, Any] = {}
        for key, check in _FIELD_CHECKS.items():
            if key in data:
                value = data[key]
                if not check(value):
                    raise ValueError(f"{key!r} has a bad value {str(value)[:40]!r}")
                kwargs[key] = value
        if not kwargs["name"] or "/" in kwargs["name"]:
            raise ValueError(f"bad module name {kwargs['name'][:40]!r}")
        kwargs["via"] = tuple(kwargs.get("via") or ())
        return cls(**kwargs)


def _is_number(value: object) -> bool:
    # bool is an int to Python, never a time to us; NaN and infinities neither.
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


_FIELD_CHECKS: dict[str, Callable[[object], bool]] = {
    "name": lambda v: isinstance(v, str),
    "loaded_at": _is_number,
    "kind": lambda v: isinstance(v, str),
    "key": lambda v: isinstance(v, str),
    "devpath": lambda v: v is None or isinstance(v, str),
    "requested_by": lambda v: isinstance(v, str),
    "role": lambda v: isinstance(v, str),
    "via": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "idle_since": lambda v: v is None or _is_number(v),
    "idle_sweeps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "instance": lambda v: v is None or (isinstance(v, str) and len(v) < 256),
}


class StateStore:
    """Thread-safe: workers record loads, the event loop reads and sweeps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._records: dict[str, ModuleRecord] = {}

    # --- persistence ---------------------------------------------------------

    def load(self, live: Iterable[str] | None = None,
             instance: Callable[[str], str | None] | None = None) -> None:
        """Read the file; keep only records of modules still loaded (``live``)
        and, with ``instance`` (Kernel.instance), still the very load kmodd made.

        A missing file is a first start; a corrupt one is logged and ignored:
        forgetting our records only makes autoclean more conservative.
        """
        records: dict[str, ModuleRecord] = {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            LOG.warning("cannot read state file %s: %s; starting fresh", self.path, exc)
            raw = None
        if raw is not None:
            try:
                data = json.loads(raw)      # bytes: bad UTF-8 is a ValueError here
                if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
                    raise ValueError("expected an object with a 'modules' list")
            except (ValueError, TypeError, RecursionError) as exc:
                # RecursionError: json's scanner on deeply nested arrays.
                LOG.warning("corrupt state file %s (%s); starting fresh", self.path, exc)
                data = {"modules": []}
            for i, item in enumerate(data["modules"]):
                # One bad record costs that record only: autoclean then leaves
                # its module alone, which is the safe side.
                try:
                    rec = ModuleRecord.from_dict(item)
                except (ValueError, TypeError) as exc:
                    name = item.get("name") if isinstance(item, dict) else None
                    label = repr(name[:80]) if isinstance(name, str) else f"#{i}"
                    log(LOG, logging.WARNING, "state file %s: dropping record %s: %s",
                         self.path, label, exc,
                         module=name[:80] if isinstance(name, str) else None)
                    continue
                records[rec.name] = rec
        if live is not None:
            alive = set(live)
            dropped = sorted(set(records) - alive)
            if dropped:
                LOG.info("forgetting modules no longer loaded: %s", " ".join(dropped))
            records = {k: v for k, v in records.items() if k in alive}
        if instance is not None:
            for name, rec in list(records.items()):
                now = instance(name)
                if rec.instance is not None and now is not None and now != rec.instance:
                    # rmmod + modprobe by someone else while we were down.
                    LOG.info("forgetting %s: loaded again by someone else since kmodd "
                             "loaded it", name)
                    del records[name]
        with self._lock:
            self._records = records

    def remove_leftovers(self) -> list[str]:
        """Remove ``.state.*`` temporaries a killed daemon left next to the file.

        Call only once this daemon is known to be the only one (it holds the
        control socket): another's save in progress uses such a file."""
        removed: list[str] = []
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return removed
        for entry in entries:
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError as exc:
                LOG.warning("cannot remove %s: %s", entry.path, exc)
        if removed:
            LOG.info("removed %d temporary state file(s) left by a killed daemon: %s",
                     len(removed), " ".join(sorted(removed)))
        return removed

    def save(self) -> None:
        # One writer at a time, each writing a snapshot taken after the last
        # write: an older snapshot can never replace a newer file.
        with self._save_lock:
            self._save()

    def _save(self) -> None:
        with self._lock:
            payload = {"version": STATE_VERSION,
                       "modules": [r.to_dict() for r in self._records.values()]}
        data = json.dumps(payload, indent=1, sort_keys=True).encode()
        # Root only: records name who asked (uid, pid), which the control
        # socket hides from other users too.
        write_atomically(self.path, data, mode=0o600, prefix=_TMP_PREFIX)

    # --- records -------------------------------------------------------------

    def record(self, rec: ModuleRecord) -> None:
        with self._lock:
            self._records[rec.name] = rec

    def forget(self, name: str) -> ModuleRecord | None:
        with self._lock:
            return self._records.pop(name, None)

    def get(self, name: str) -> ModuleRecord | None:
        with self._lock:
            return self._records.get(name)

    def records(self) -> dict[str, ModuleRecord]:
        """A copy: callers may change the values without racing the workers."""
        with self._lock:
            return {k: replace(v) for k, v in self._records.items()}

    def set_idle(self, name: str, loaded_at: float, idle_since: float | None,
                 idle_sweeps: int) -> None:
        """Autoclean's bookkeeping; ignored when the module was reloaded since the
        sweep read its record (``loaded_at`` differs)."""
        with self._lock:
            rec = self._records.get(name)
            if rec is not None and rec.loaded_at == loaded_at:
                rec.idle_since = idle_since
                rec.idle_sweeps = idle_sweeps

    def forget_if(self, name: str, loaded_at: float) -> bool:
        with self._lock:
            rec = self._records.get(name)
            if rec is not None and rec.loaded_at == loaded_at:
                del self._records[name]
                return True
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._records


class Scheduling(Protocol):
    """The event loop's timer call, all :class:`StateSaver` needs of it."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> Cancellable: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class StateSaver:
    """Batches the writes of a :class:`StateStore`: the loop marks it dirty,
    one write follows a burst (a coldplug storm is one fsync, not hundreds),
    and the fsync runs on a writer thread so uevent intake never waits on it.

    :meth:`mark_dirty` and :meth:`save_now` are for the loop thread.
    """

    DELAY = 0.5

    def __init__(self, store: StateStore, loop: Scheduling, *,
                 logger: logging.Logger = LOG) -> None:
        self.store = store
        self._loop = loop
        self._log = logger
        self._timer: Cancellable | None = None
        self._thread: threading.Thread | None = None
        self._wanted = threading.Event()

    def mark_dirty(self) -> None:
        if self._timer is None:
            # Coalesce the writes of a coldplug burst into one.
            self._timer = self._loop.call_later(self.DELAY, self._save_in_background)

    def _save_in_background(self) -> None:
        self._timer = None
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="kmodd-state",
                                            daemon=True)
            self._thread.start()
        self._wanted.set()

    def _writer(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self._save_logged()

    def save_now(self) -> None:
        """Write at once (exit, autoclean's unloads), cancelling a batched write."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._save_logged()

    def _save_logged(self) -> None:
        try:
            self.store.save()
        except OSError as exc:
            log(self._log, logging.ERROR, "cannot save state to %s: %s", self.store.path, exc)
