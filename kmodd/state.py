"""What kmodd loaded, when and why: the record autoclean and ``kmodctl why`` rely on.

Persisted as JSON under ``/run/kmodd/state.json`` so a restarted daemon
still knows which modules are its own (and so still never touches anyone
else's).  Written atomically: temporary file, fsync, rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("kmodd.state")

STATE_VERSION = 1


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

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies and is slow for every save.
        return {"name": self.name, "loaded_at": self.loaded_at, "kind": self.kind,
                "key": self.key, "devpath": self.devpath, "requested_by": self.requested_by,
                "role": self.role, "via": list(self.via), "idle_since": self.idle_since,
                "idle_sweeps": self.idle_sweeps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleRecord:
        if not isinstance(data, dict):
            raise ValueError("record is not an object")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for required in ("name", "loaded_at", "kind", "key"):
            if required not in kwargs:
                raise ValueError(f"record lacks {required!r}")
        if not isinstance(kwargs["name"], str) or not isinstance(kwargs["loaded_at"],
                                                                 (int, float)):
            raise ValueError("bad name or loaded_at")
        kwargs["via"] = tuple(str(v) for v in kwargs.get("via") or ())
        return cls(**kwargs)


class StateStore:
    """Thread-safe: workers record loads, the event loop reads and sweeps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._records: dict[str, ModuleRecord] = {}

    # --- persistence ---------------------------------------------------------

    def load(self, live: Iterable[str] | None = None) -> None:
        """Read the file; keep only records of modules still loaded (``live``).

        A missing file is a first start; a corrupt one is logged and ignored:
        forgetting our records only makes autoclean more conservative.
        """
        records: dict[str, ModuleRecord] = {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            log.warning("cannot read state file %s: %s; starting fresh", self.path, exc)
            raw = None
        if raw is not None:
            try:
                data = json.loads(raw)      # bytes: bad UTF-8 is a ValueError here
                if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
                    raise ValueError("expected an object with a 'modules' list")
                for item in data["modules"]:
                    rec = ModuleRecord.from_dict(item)
                    records[rec.name] = rec
            except (ValueError, TypeError, RecursionError) as exc:
                # RecursionError: json's scanner on deeply nested arrays.
                log.warning("corrupt state file %s (%s); starting fresh", self.path, exc)
                records = {}
        if live is not None:
            alive = set(live)
            dropped = sorted(set(records) - alive)
            if dropped:
                log.info("forgetting modules no longer loaded: %s", " ".join(dropped))
            records = {k: v for k, v in records.items() if k in alive}
        with self._lock:
            self._records = records

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
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename is only durable once the directory is synced.
        try:
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

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
