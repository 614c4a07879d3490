#!/usr/bin/env python3
"""Burst benchmark: 10,000 uevents over 500 distinct modaliases arriving at once.

The whole daemon runs in this process on the simulated kernel: kmodd's
``Service`` (event loop, scheduler, worker pool, loader, state) with its real
``UeventSource``, whose netlink monitor is replaced by a fake one holding every
event at once behind a readable socket -- the source drains it exactly as it
drains the kernel's socket (``DRAIN_BATCH`` events per wake-up).  Resolution
uses Debian's real module tree and configuration-free modprobe.d; the loader
opens and hands each real ``.ko`` to the simulated ``finit_module``.

Each round injects the 10,000 events (every one with its own DEVPATH, 20 per
modalias), waits until every request has its outcome, then unloads what it
loaded so the next round does the same work.  Reported: events/s per round
(first injection to last outcome), peak RSS (sampled, and VmHWM) and RSS after
each round (flat memory: later rounds must not grow), the outcome counts and
that every request got one.

The simulated kernel is kmodd.kernel.sim.SimKernel with one change made here:
it rewrites only the sysfs files of modules whose state changed (the stock
simulator rewrites every module's files on each change, which with hundreds
of modules would measure the simulator; /proc/modules is written when it is
read), and it does not keep a copy of every
module image it was given nor reads whole images into this process (the
kernel reads the file itself; only the ELF magic matters to the simulator).

Usage: bench/bench_burst.py [--events 10000] [--aliases 500] [--rounds 3] [-S VERSION]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from kmodd.daemon.requests import Outcome, Request
from kmodd.daemon.settings import Settings
from kmodd.kernel.sim import SimKernel, _rmtree

TARGET_EPS = 5000.0


class BenchSimKernel(SimKernel):
    """SimKernel whose state files are updated incrementally, keeping no images."""

    def __init__(self, tree_root: Path) -> None:
        self._written: dict[str, tuple[str, int, tuple[str, ...]]] = {}
        super().__init__(tree_root, keep_images=False)

    def _write_proc_modules(self) -> None:
        lines = []
        for i, m in enumerate(reversed(list(self._mods.values()))):
            holders = "".join(f"{h}," for h in sorted(m.holders))
            state = {"coming": "Loading", "live": "Live", "going": "Unloading"}[m.state]
            lines.append(f"{m.name} {m.size} {m.refcount} {holders or '-'} {state} "
                         f"0xffffffffc{i:07x}000\n")
        self._atomic_write(self.tree_root / "proc/modules", "".join(lines))

    def modules(self) -> Any:
        # /proc/modules is written when read, not on every change (O(n) each).
        with self._cond:
            self._write_proc_modules()
        return super().modules()

    def _write_state(self) -> None:
        sysmod = self.tree_root / "sys/module"
        for name in [n for n in self._written if n not in self._mods]:
            gone = sysmod / f".{name}.gone"
            os.rename(sysmod / name, gone)
            _rmtree(gone)
            del self._written[name]
        for m in self._mods.values():
            sig = (m.state, m.refcount, tuple(sorted(m.holders)))
            if self._written.get(m.name) == sig:
                continue
            d = sysmod / m.name
            if not d.exists():
                fresh = sysmod / f".{m.name}.new"
                fresh.mkdir()
                (fresh / "initstate").write_text(m.state + "\n")
                os.rename(fresh, d)
            self._atomic_write(d / "initstate", m.state + "\n")
            self._atomic_write(d / "refcnt", f"{m.refcount}\n")
            self._sync_links(d / "holders", {h: f"../../{h}" for h in m.holders})
            self._written[m.name] = sig


class FakeMonitor:
    """What UeventSource needs of pyudev's monitor: fileno() and poll(timeout)."""

    def __init__(self) -> None:
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.events: deque[Any] = deque()
        self.lock = threading.Lock()

    def inject(self, events: list[Any]) -> None:
        with self.lock:
            self.events.extend(events)
        self.wsock.send(b"!")

    def fileno(self) -> int:
        return self.rsock.fileno()

    def poll(self, timeout: float | None = None) -> Any:
        with self.lock:
            if self.events:
                return self.events.popleft()
            try:
                while self.rsock.recv(4096):
                    pass
            except BlockingIOError:
                pass
            return None

    def close(self) -> None:
        self.rsock.close()
        self.wsock.close()


def uevent(modalias: str, devpath: str) -> Any:
    return SimpleNamespace(action="add", properties={
        "ACTION": "add", "MODALIAS": modalias, "DEVPATH": devpath, "SUBSYSTEM": "pci"})


class RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        pid = os.getpid()
        while not self.stop.is_set():
            self.peak = max(self.peak, common.proc_status(pid).get("VmRSS", 0))
            time.sleep(self.interval)


def choose_modaliases(moddir: Path, count: int, resolver: Any) -> tuple[list[str], int]:
    """``count`` distinct modaliases from the tree's own patterns (the resolution
    benchmark's generator); returns them and how many resolve to a module."""
    from modaliases import make_modaliases

    from kmodd.daemon.uevents import check_modalias
    seen: dict[str, None] = {}
    seed = 7
    while len(seen) < count:
        for alias in make_modaliases(moddir, count * 2, seed=seed, mutate_share=0.1):
            if check_modalias(alias) is None:     # device aliases only (BUS:...)
                seen.setdefault(alias, None)
            if len(seen) == count:
                break
        seed += 1
    aliases = list(seen)
    resolved = sum(1 for a in aliases if resolver.lookup(a))
    return aliases, resolved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--aliases", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-S", "--set-version", dest="version", default=None)
    ap.add_argument("--workers", type=int, default=None, help="max_workers (default: kmodd's)")
    args = ap.parse_args()

    from kmodd.cli.daemon import resolver_factory
    from kmodd.daemon.service import Service
    from kmodd.daemon.uevents import UeventSource
    from kmodd.root import Root

    version = args.version or os.uname().release
    if not (Path("/lib/modules") / version / "modules.dep").exists():
        version = common.device_kernel().version
    moddir = Path("/lib/modules") / version
    started = common.today()
    print(f"# burst benchmark, {started}\n# host: {common.machine()}\n# tree: {moddir}",
          flush=True)

    # tmpfs when there is one: /sys and /proc are in memory on a real machine too.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="kmodd-burst-", dir=shm))
    (tmp / "proc").mkdir()
    (tmp / "proc/cmdline").write_text("quiet\n")
    kernel = BenchSimKernel(tmp)
    kw: dict[str, Any] = {}
    if args.workers:
        kw["max_workers"] = args.workers
    settings = Settings(root=str(tmp), modules_base="/", version=version,
                        kernel=f"sim:{tmp}", socket=str(tmp / "run/control"),
                        state_file=str(tmp / "run/state.json"),
                        request_fifo=str(tmp / "run/request"), coldplug=False,
                        autoclean_interval=0, journal=False, log_level="warning",
                        config_file=str(tmp / "kmodd.conf"), **kw)
    resolver = resolver_factory(settings)
    aliases, resolvable = choose_modaliases(moddir, args.aliases, resolver)
    per = args.events // len(aliases)
    print(f"# {args.events} events over {len(aliases)} distinct modaliases "
          f"({resolvable} resolve to a module), {per} events each", flush=True)
    events = [uevent(aliases[i % len(aliases)], f"/devices/bench/dev{i}")
              for i in range(args.events)]

    monitor = FakeMonitor()
    futures: list[Future[Outcome]] = []

    def source(submit: Callable[[Request], Future[Outcome]]) -> UeventSource:
        def recording_submit(request: Request) -> Future[Outcome]:
            fut = submit(request)
            futures.append(fut)
            return fut
        return UeventSource(recording_submit, Root(base=tmp), monitor=monitor)

    service = Service(settings, kernel, lambda s: resolver, sources=[source], coldplug=None,
                      watcher=None, notify=lambda **_: True, install_signals=False)
    loop = threading.Thread(target=service.run, name="kmodd-loop", daemon=True)
    loop.start()
    while not service.ready:
        time.sleep(0.01)
    base_rss = common.proc_status(os.getpid()).get("VmRSS", 0)
    print(f"service ready, {service.scheduler.max_workers} workers, RSS {base_rss / 1024:.1f} MB",
          flush=True)

    sampler = RssSampler()
    sampler.start()
    rounds: list[dict[str, Any]] = []
    all_ok = True
    for r in range(args.rounds):
        futures.clear()
        t0 = time.perf_counter()
        monitor.inject(events)
        while len(futures) < args.events:       # every event taken in by the source
            time.sleep(0.001)
            if not loop.is_alive():
                raise SystemExit("the service stopped")
        t_intake = time.perf_counter() - t0
        done, not_done = wait(list(futures), timeout=600)
        elapsed = time.perf_counter() - t0
        statuses = Counter(f.result().status for f in done)
        answered = len(done)
        loaded = len(kernel.loaded())
        rss = common.proc_status(os.getpid())
        ok = answered == args.events and not not_done
        all_ok &= ok
        rounds.append({"round": r, "seconds": elapsed, "intake_seconds": t_intake,
                       "events_per_s": args.events / elapsed, "answered": answered,
                       "statuses": dict(statuses), "modules_loaded": loaded,
                       "rss_kb_after": rss.get("VmRSS", 0), "peak_rss_kb": sampler.peak})
        print(f"round {r}: {args.events} events in {common.fmt_s(elapsed)} "
              f"= {args.events / elapsed:,.0f} events/s (intake {common.fmt_s(t_intake)}); "
              f"{answered}/{args.events} answered; {loaded} modules loaded; "
              f"{dict(sorted(statuses.items()))}; RSS after {rss.get('VmRSS', 0) / 1024:.1f} MB, "
              f"peak so far {sampler.peak / 1024:.1f} MB", flush=True)
        for name in reversed(kernel.load_order):
            with contextlib.suppress(Exception):
                kernel.unload_module(name)
        kernel.load_order.clear()
        service.scheduler.set_resolver(resolver)   # forget failures/backoff between rounds
    sampler.stop.set()
    service.request_stop()
    loop.join(60)
    hwm = common.proc_status(os.getpid()).get("VmHWM", 0)
    eps = common.median(r["events_per_s"] for r in rounds)
    growth = (rounds[-1]["rss_kb_after"] - rounds[0]["rss_kb_after"]) / 1024
    later = (rounds[-1]["rss_kb_after"] - rounds[min(1, len(rounds) - 1)]["rss_kb_after"]) / 1024
    print(f"\nmedian {eps:,.0f} events/s = {eps / TARGET_EPS:.2f}x the 5,000 events/s target"
          f" ({'met' if eps >= TARGET_EPS else 'MISSED'}); RSS before {base_rss / 1024:.1f} MB, "
          f"peak {sampler.peak / 1024:.1f} MB (VmHWM {hwm / 1024:.1f} MB), "
          f"RSS growth round 0->last {growth:+.1f} MB, round 1->last {later:+.1f} MB; "
          f"every request answered: "
          f"{'yes' if all_ok else 'NO'}")
    common.save_results("burst", {
        "benchmark": "burst", "date": started, "host": common.machine(),
        "command": "bench/bench_burst.py " + " ".join(sys.argv[1:]), "tree": str(moddir),
        "events": args.events, "aliases": len(aliases), "resolvable": resolvable,
        "base_rss_kb": base_rss, "hwm_kb": hwm, "rounds": rounds,
        "median_events_per_s": eps, "all_answered": all_ok})
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
