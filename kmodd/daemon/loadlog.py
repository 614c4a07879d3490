"""Every module load since the daemon started, with its timeline, and what can be
read from it: ``kmodctl blame``, ``kmodctl critical-chain``, ``kmodctl plot``,
``kmodctl status --prometheus``.

A :class:`LoadRecord` keeps the four instants of one load on the monotonic
clock (``CLOCK_MONOTONIC``: seconds since boot, what ``systemd-analyze`` counts
from too): the request arrived, its dependencies were live, the load syscall
started, it returned.  One wall-clock anchor taken with a monotonic reading
converts them to dates.  Records are kept in memory, bounded; totals and the
init-time histogram count every load even once old records were dropped.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kmodd.record import dataclass, field

MAX_RECORDS = 4096     # a reply stays well under the control socket's 4 MiB

# Request kind -> the source an administrator knows it by.
SOURCE_NAMES = {"coldplug": "coldplug", "modalias": "hotplug", "kernel": "kernel request",
                "admin": "admin", "modules-load": "modules-load.d"}

# Upper bounds of the init-time histogram, in seconds: most inits take a few
# milliseconds, a driver probing hardware or waiting for a bus scan seconds.
INIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Two loads whose syscalls return within this many seconds of each other,
# the later-started one overlapping the earlier, are taken as one waiting for
# the other's asynchronous probes (do_init_module ends with
# async_synchronize_full(), which waits for every async job in the system).
ASYNC_SLACK = 0.010


def source_name(kind: str) -> str:
    return SOURCE_NAMES.get(kind, kind)


@dataclass(frozen=True)
class LoadRecord:
    module: str
    kind: str                     # the request kind that caused the load
    key: str                      # the modalias / name / request that caused it
    status: str                   # loaded | failed | install-command
    requested_at: float           # monotonic: the request reached the daemon
    deps_ready_at: float          # monotonic: every dependency it waited for was live
    start: float                  # monotonic: the load syscall (or install command) began
    end: float                    # monotonic: it returned
    requested_by: str = ""
    planned_at: float | None = None   # monotonic: resolved, its load scheduled
    devpath: str | None = None
    role: str = "target"
    via: tuple[str, ...] = ()
    waited_for: tuple[str, ...] = ()  # dependencies still loading when it was scheduled
    error: str | None = None
    errno: int | None = None

    @property
    def source(self) -> str:
        return source_name(self.kind)

    @property
    def in_kernel(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def planned(self) -> float:
        return self.requested_at if self.planned_at is None else self.planned_at

    @property
    def resolving(self) -> float:
        """Time from the request to its plan (the resolver's queue and work)."""
        return max(0.0, self.planned - self.requested_at)

    @property
    def dep_wait(self) -> float:
        """Time its load was scheduled but waited for dependencies still loading."""
        return max(0.0, self.deps_ready_at - self.planned)

    @property
    def queued(self) -> float:
        """Time between its dependencies being live and a worker starting it."""
        return max(0.0, self.start - self.deps_ready_at)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "source": self.source,
                "key": self.key, "status": self.status, "requested_at": self.requested_at,
                "planned_at": self.planned, "deps_ready_at": self.deps_ready_at,
                "start": self.start, "end": self.end,
                "in_kernel": self.in_kernel, "dep_wait": self.dep_wait,
                "resolving": self.resolving, "queued": self.queued,
                "requested_by": self.requested_by, "devpath": self.devpath, "role": self.role,
                "via": list(self.via), "waited_for": list(self.waited_for),
                "error": self.error, "errno": self.errno}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadRecord:
        return cls(module=str(d["module"]), kind=str(d["kind"]), key=str(d.get("key", "")),
                   status=str(d["status"]), requested_at=float(d["requested_at"]),
                   planned_at=float(d["planned_at"]) if d.get("planned_at") is not None
                   else None,
                   deps_ready_at=float(d["deps_ready_at"]), start=float(d["start"]),
                   end=float(d["end"]), requested_by=str(d.get("requested_by") or ""),
                   devpath=d.get("devpath"), role=str(d.get("role") or "target"),
                   via=tuple(d.get("via") or ()), waited_for=tuple(d.get("waited_for") or ()),
                   error=d.get("error"), errno=d.get("errno"))


@dataclass
class Histogram:
    bounds: tuple[float, ...] = INIT_BUCKETS
    counts: list[int] = field(default_factory=list)   # per bucket, not cumulative; last: +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*[f"{b:g}" for b in self.bounds], "+Inf"), self.counts,
                            strict=True):
            running += n
            out.append((bound, running))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": [[b, n] for b, n in self.cumulative()], "sum": self.total,
                "count": self.count}


class LoadLog:
    """Thread-safe: workers add records, the event loop reads them."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.anchor_monotonic = time.monotonic()
        self.anchor_wall = time.time()
        self._lock = threading.Lock()
        self._records: deque[LoadRecord] = deque(maxlen=max_records)
        self.dropped = 0
        self.loads: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.histogram = Histogram()
        self.marks: dict[str, float] = {}

    def add(self, rec: LoadRecord) -> None:
        with self._lock:
            if len(self._records) == self._records.maxlen:
                self.dropped += 1
            self._records.append(rec)
            counter = self.failures if rec.failed else self.loads
            counter[rec.source] = counter.get(rec.source, 0) + 1
            if rec.status == "loaded":
                self.histogram.observe(rec.in_kernel)

    def mark(self, name: str, when: float | None = None) -> None:
        """A named instant (coldplug-start, coldplug-end) on the same clock."""
        with self._lock:
            self.marks[name] = time.monotonic() if when is None else when

    def records(self) -> list[LoadRecord]:
        with self._lock:
            return list(self._records)

    # A restarted daemon (Restart=always, an upgrade) keeps the boot's log:
    # /run is cleared at boot and CLOCK_MONOTONIC runs on across processes.

    def save(self, path: Path) -> None:
        data = self.to_dict()
        data.pop("now", None)
        data["boot_id"] = boot_id()
        # The daemon saves; kmodctl only reads (its start-up stays light).
        from kmodd.daemon.state import write_atomically

        # Only this boot's next daemon reads it: no fsync needed.
        write_atomically(path, json.dumps(data, separators=(",", ":")).encode(), mode=0o644,
                         prefix=".loads.", durable=False)

    def restore(self, path: Path) -> int:
        """Records and totals a previous daemon of this boot saved; how many
        records (0 for a missing file or another boot; ValueError if corrupt)."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return 0
        if not isinstance(data, dict) or data.get("boot_id") != boot_id():
            return 0
        records = [LoadRecord.from_dict(r) for r in data.get("records") or ()]
        hist = data.get("init_seconds") or {}
        cumulative = [int(n) for _, n in hist.get("buckets") or ()]
        with self._lock:
            self._records.extend(records)
            self.dropped += int(data.get("dropped") or 0)
            for mine, theirs in ((self.loads, data.get("loads")),
                                 (self.failures, data.get("failures"))):
                for source, n in (theirs or {}).items():
                    mine[source] = mine.get(source, 0) + int(n)
            if len(cumulative) == len(self.histogram.counts):
                previous = 0
                for i, n in enumerate(cumulative):
                    self.histogram.counts[i] += n - previous
                    previous = n
                self.histogram.total += float(hist.get("sum") or 0.0)
                self.histogram.count += int(hist.get("count") or 0)
            for name, when in (data.get("marks") or {}).items():
                self.marks.setdefault(name, float(when))
        return len(records)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"anchor": {"monotonic": self.anchor_monotonic, "wall": self.anchor_wall},
                    "now": time.monotonic(), "marks": dict(self.marks),
                    "records": [r.to_dict() for r in self._records], "dropped": self.dropped,
                    "loads": dict(self.loads), "failures": dict(self.failures),
                    "init_seconds": self.histogram.to_dict()}


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# --- reading the records -----------------------------------------------------------------

def blame(records: Iterable[LoadRecord]) -> list[LoadRecord]:
    """Slowest first, like systemd-analyze blame: time in the kernel, then the wait."""
    return sorted(records, key=lambda r: (-r.in_kernel, -r.dep_wait, r.module))


@dataclass(frozen=True)
class ChainLink:
    record: LoadRecord
    reason: str          # how the link above waited for this one: "" for the top
    # "dependency": the link above could not start before this one was live;
    # "async": the link above's syscall returned only once this one's async
    # probes were done (async_synchronize_full at the end of do_init_module).


def held_by_async(node: LoadRecord, records: Sequence[LoadRecord],
                  slack: float = ASYNC_SLACK) -> LoadRecord | None:
    """The load whose asynchronous probes ``node``'s syscall waited for, if any.

    Modelled simply: another load that started before ``node``, was still in
    the kernel when ``node`` started, and returned within ``slack`` of it.
    The earliest-started such load is taken: it holds up every later one.
    """
    if node.in_kernel < slack:
        return None
    best: LoadRecord | None = None
    for other in records:
        if other is node or other.module == node.module:
            continue
        if other.start < node.start < other.end and abs(node.end - other.end) <= slack \
                and (best is None or other.start < best.start):
            best = other
    return best


def dependency_blocker(node: LoadRecord, records: Sequence[LoadRecord],
                       slack: float = ASYNC_SLACK) -> LoadRecord | None:
    """The dependency whose load ending let ``node`` start (the last one live)."""
    if not node.waited_for:
        return None
    best: LoadRecord | None = None
    for other in records:
        if other.module in node.waited_for and other.end <= node.deps_ready_at + slack \
                and other.end >= node.planned - slack \
                and (best is None or other.end > best.end):
            best = other
    return best


def chain_end(records: Sequence[LoadRecord], module: str | None = None) -> LoadRecord | None:
    """Where the chain starts from: MODULE's last load, or coldplug's last load to end."""
    if module is not None:
        mine = [r for r in records if r.module == module]
        return max(mine, key=lambda r: r.end) if mine else None
    cold = [r for r in records if r.kind == "coldplug"]
    return max(cold, key=lambda r: r.end) if cold else None


def critical_chain(records: Sequence[LoadRecord], module: str | None = None,
                   slack: float = ASYNC_SLACK) -> list[ChainLink]:
    """The chain of waits that decided when coldplug (or ``module``) was done,
    from the last load back to the first, like systemd-analyze critical-chain."""
    node = chain_end(records, module)
    chain: list[ChainLink] = []
    reason = ""
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        chain.append(ChainLink(node, reason))
        nxt = held_by_async(node, records, slack)
        if nxt is not None:
            node, reason = nxt, "async"
            continue
        nxt = dependency_blocker(node, records, slack)
        node, reason = (nxt, "dependency") if nxt is not None else (None, "")
    return chain


def fmt_seconds(seconds: float) -> str:
    """systemd-analyze's style: 850ms, 1.234s, 1min 2.345s."""
    if seconds < 1.0:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60.0:
        return f"{seconds:.3f}s"
    minutes, rest = divmod(seconds, 60.0)
    return f"{minutes:.0f}min {rest:.3f}s"
