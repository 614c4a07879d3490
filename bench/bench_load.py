#!/usr/bin/env python3
"""Load under attack: 10,000 uevents, 1,000 kernel requests and 32 hostile
control clients at once, on the simulated kernel.

The whole daemon runs in this process as in bench_burst.py (real Service,
UeventSource fed by a fake netlink monitor, Debian's real module tree for
resolution, the simulated kernel) plus its real kernel-request source: the
1,000 kernel requests go through the unmodified ``contrib/kmodd-request``
helper, at most 50 at once (the kernel's own cap on concurrent
request_module() helpers), for names drawn from the tree's modules.  A
helper falling back to a direct load would exit 3 (a stand-in kmodctl): none
may.  32 peers, uid 65534 when run as root, pipeline ``list`` on the control
socket the whole time, half of them never reading a reply (tests/hostile.py).

Phases: (1) quiet: kernel-request round trip and ``ping`` with nothing else
going on; (2) the storm: flood, uevents and kernel requests together.
Reported: every uevent and kernel request answered; kernel-request round trip
(median, p95, max) quiet vs storm; ``ping`` during the storm; RSS before,
peak, after.

Usage: bench/bench_load.py [--events 10000] [--requests 1000] [--clients 32] [-S VERSION]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_burst import BenchSimKernel, FakeMonitor, RssSampler, choose_modaliases, uevent

from kmodd.daemon.requests import Outcome, Request
from kmodd.daemon.settings import Settings
from tests.hostile import Flood

FALLBACK_EXIT = 3
HELPER_CONCURRENCY = 50


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--aliases", type=int, default=500)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("-S", "--set-version", dest="version", default=None)
    args = ap.parse_args()

    # tmpfs when there is one: /sys and /proc are in memory on a real machine too.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="kmodd-load-", dir=shm))
    os.chmod(tmp, 0o755)          # the hostile peers (nobody) must reach the socket
    run = tmp / "run"
    run.mkdir(mode=0o755)
    sock = run / "control"
    # Forked first, while this process has no other thread.
    flood = Flood(sock, args.clients)

    from kmodd.cli.daemon import resolver_factory
    from kmodd.daemon.kernelreq import KernelRequestSource
    from kmodd.daemon.service import Service
    from kmodd.daemon.uevents import UeventSource
    from kmodd.resolution.index import ModuleTree
    from kmodd.root import Root

    version = args.version or os.uname().release
    if not (Path("/lib/modules") / version / "modules.dep").exists():
        version = common.device_kernel().version
    moddir = Path("/lib/modules") / version
    started = common.today()
    print(f"# load benchmark, {started}\n# host: {common.machine()}\n# tree: {moddir}",
          flush=True)
    (tmp / "proc").mkdir()
    (tmp / "proc/cmdline").write_text("quiet\n")
    kernel = BenchSimKernel(tmp)
    settings = Settings(root=str(tmp), modules_base="/", version=version,
                        kernel=f"sim:{tmp}", socket=str(sock),
                        state_file=str(run / "state.json"), request_fifo=str(run / "request"),
                        coldplug=False, autoclean_interval=0, journal=False,
                        log_level="warning", config_file=str(tmp / "kmodd.conf"))
    resolver = resolver_factory(settings)
    aliases, resolvable = choose_modaliases(moddir, args.aliases, resolver)
    events = [uevent(aliases[i % len(aliases)], f"/devices/load/dev{i}")
              for i in range(args.events)]
    names = [n for n in ModuleTree(moddir, use_cache=False).module_names()
             if not n.startswith(("snd", "drm"))][::37][:200]
    requests = [names[i % len(names)] for i in range(args.requests)]
    print(f"# {args.events} uevents over {len(aliases)} modaliases ({resolvable} resolve), "
          f"{args.requests} kernel requests over {len(names)} modules, "
          f"{args.clients} hostile peers", flush=True)

    monitor = FakeMonitor()
    futures: list[Future[Outcome]] = []

    def uevents(submit: Any) -> UeventSource:
        def recording(request: Request) -> Future[Outcome]:
            fut = submit(request)
            futures.append(fut)
            return fut
        return UeventSource(recording, Root(base=tmp), monitor=monitor)

    def kernel_requests(submit: Any) -> KernelRequestSource:
        return KernelRequestSource(submit, run / "request")

    service = Service(settings, kernel, lambda s: resolver, sources=[uevents, kernel_requests],
                      coldplug=None, watcher=None, notify=lambda **_: True,
                      install_signals=False)
    loop = threading.Thread(target=service.run, name="kmodd-loop", daemon=True)
    loop.start()
    while not service.ready:
        time.sleep(0.01)

    fallback = tmp / "kmodctl"
    fallback.write_text(f"#!/bin/sh\nexit {FALLBACK_EXIT}\n")
    fallback.chmod(0o755)
    env = {"PATH": "/sbin:/usr/sbin:/bin:/usr/bin", "KMODD_RUN_DIR": str(run),
           "KMODD_KMODCTL": str(fallback), "KMODD_FALLBACK": "kmodctl"}

    def helper(name: str) -> tuple[float, int]:
        start = time.perf_counter()
        rc = subprocess.run([str(common.REQUEST_HELPER), "-q", "--", name], env=env,
                            timeout=300).returncode
        return time.perf_counter() - start, rc

    def ping_times(count: int, stop: threading.Event | None = None) -> list[float]:
        from kmodd.daemon.control import Client
        out = []
        with Client(sock, timeout=60) as client:
            for _ in range(count):
                if stop is not None and stop.is_set():
                    break
                t0 = time.perf_counter()
                client.request({"op": "ping"})
                out.append(time.perf_counter() - t0)
                time.sleep(0.02)
        return out

    # (1) quiet: modules loaded once first so both phases measure the same path.
    for name in names[:20]:
        helper(name)
    quiet = [helper(names[i % 20])[0] for i in range(40)]
    quiet_ping = ping_times(40)
    base_rss = common.proc_status(os.getpid()).get("VmRSS", 0)
    print(f"quiet: kernel request median {statistics.median(quiet) * 1000:.1f} ms, "
          f"ping median {statistics.median(quiet_ping) * 1000:.2f} ms, "
          f"RSS {base_rss / 1024:.1f} MB", flush=True)

    # (2) the storm
    sampler = RssSampler()
    sampler.start()
    flood.start()
    time.sleep(1.0)
    peers = len(service.control.connections)
    t0 = time.perf_counter()
    monitor.inject(events)
    stop_ping = threading.Event()
    pings: list[float] = []
    pinger = threading.Thread(target=lambda: pings.extend(ping_times(10**6, stop_ping)),
                              daemon=True)
    pinger.start()
    with ThreadPoolExecutor(HELPER_CONCURRENCY) as pool:
        results = list(pool.map(helper, requests))
    t_requests = time.perf_counter() - t0
    while len(futures) < args.events and time.perf_counter() - t0 < 600:
        time.sleep(0.01)
    done, not_done = wait(list(futures), timeout=600)
    t_all = time.perf_counter() - t0
    stop_ping.set()
    pinger.join(60)
    peak = sampler.peak
    sampler.stop.set()
    flood.stop()
    time.sleep(0.5)
    after_rss = common.proc_status(os.getpid()).get("VmRSS", 0)
    service.request_stop()
    loop.join(120)

    trips = [t for t, _ in results]
    codes = Counter(rc for _, rc in results)
    statuses = Counter(f.result().status for f in done)
    answered_uevents = len(done) == args.events and not not_done
    answered_requests = codes.get(FALLBACK_EXIT, 0) == 0 and len(results) == args.requests
    print(f"storm: {peers} hostile peers connected; {len(done)}/{args.events} uevents answered "
          f"{dict(sorted(statuses.items()))}; {len(results)} kernel requests, exit codes "
          f"{dict(sorted(codes.items()))} ({codes.get(FALLBACK_EXIT, 0)} fell back); "
          f"kernel requests done in {common.fmt_s(t_requests)}, everything in "
          f"{common.fmt_s(t_all)}", flush=True)
    print(f"kernel request round trip: quiet median {statistics.median(quiet) * 1000:.1f} ms; "
          f"storm median {statistics.median(trips) * 1000:.1f} ms, "
          f"p95 {pct(trips, 0.95) * 1000:.1f} ms, max {max(trips) * 1000:.1f} ms "
          f"({HELPER_CONCURRENCY} helpers at once)", flush=True)
    print(f"ping: quiet median {statistics.median(quiet_ping) * 1000:.2f} ms; storm median "
          f"{statistics.median(pings) * 1000:.2f} ms, p95 {pct(pings, 0.95) * 1000:.1f} ms, "
          f"max {max(pings) * 1000:.1f} ms ({len(pings)} pings)", flush=True)
    print(f"RSS: before {base_rss / 1024:.1f} MB, peak {peak / 1024:.1f} MB "
          f"(+{(peak - base_rss) / 1024:.1f}), after {after_rss / 1024:.1f} MB", flush=True)
    ok = answered_uevents and answered_requests
    print(f"every request answered: {'yes' if ok else 'NO'}")
    common.save_results("load", {
        "benchmark": "load", "date": started, "host": common.machine(),
        "command": "bench/bench_load.py " + " ".join(sys.argv[1:]), "tree": str(moddir),
        "events": args.events, "requests": args.requests, "clients": args.clients,
        "peers_connected": peers, "uevent_statuses": dict(statuses),
        "request_exit_codes": {str(k): v for k, v in codes.items()},
        "quiet_request_ms": {"median": statistics.median(quiet) * 1000},
        "storm_request_ms": {"median": statistics.median(trips) * 1000,
                             "p95": pct(trips, 0.95) * 1000, "max": max(trips) * 1000},
        "quiet_ping_ms": statistics.median(quiet_ping) * 1000,
        "storm_ping_ms": {"median": statistics.median(pings) * 1000,
                          "p95": pct(pings, 0.95) * 1000, "max": max(pings) * 1000},
        "rss_kb": {"before": base_rss, "peak": peak, "after": after_rss},
        "seconds": {"requests": t_requests, "all": t_all}, "all_answered": ok})
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
