#!/usr/bin/env python3
"""exec -> first finit_module, READY and idle RSS on the host, simulated kernel.

kmodd is started on Debian's module tree with the simulated kernel and a
``/sys`` of ``--devices`` fake devices (bench_startup.make_sim_root), as
``/usr/bin/python3 -m kmodd.cli.daemon`` with PYTHONPATH naming the source;
the first load's start comes from the daemon's load log (CLOCK_MONOTONIC,
like this script's clock), READY from a NOTIFY_SOCKET, RSS from
/proc/PID/status 1.5 s after ``kmodctl settle``.  With ``--before DIR`` (a
``git archive`` of an older commit's kmodd/ under DIR) both are run,
alternated, each round.

The daemon's ``/var/lib/kmodd/learned.json`` is carried from one start to the
next (after one unmeasured start per variant), as a machine's disk keeps it
between boots, so the head start is measured; ``--fresh`` starts every run
without one.

Usage: bench/bench_first_load.py [--rounds 5] [--devices 20] [--before build/baseline] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_startup import make_sim_root

TARGET = 0.050


def one(src: str, moddir: Path, version: str, devices: int, cache: str,
        learned: Path | None = None) -> dict[str, Any]:
    """One start; with *learned*, the daemon's learned.json is carried in from and
    back out to that file, as a disk keeps it from one boot to the next."""
    from kmodd.daemon.control import Client
    root = make_sim_root(moddir, devices)
    state = root / "var/lib/kmodd"
    if learned is not None and learned.exists():
        state.mkdir(parents=True)
        shutil.copyfile(learned, state / "learned.json")
    env = {**os.environ, "KMODD_CACHE_DIR": cache, "PYTHONPATH": src}
    listener = common.NotifyListener()
    argv = ["/usr/bin/python3", "-m", "kmodd.cli.daemon", "--no-journal", "--kernel",
            f"sim:{root}", "--root", str(root), "-d", "/", "-S", version,
            "--autoclean-interval", "0"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env={**env, **listener.env()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd="/")
    try:
        ready = listener.wait_for("READY", 120)
        sock = f"{root}/run/kmodd/control"
        subprocess.run(["/usr/bin/python3", "-m", "kmodd.cli.kmodctl", "settle", "--socket",
                        sock, "--timeout", "120"], env=env, cwd="/", check=True)
        with Client(sock, timeout=30) as c:
            records = c.call("loads")["records"]
        time.sleep(1.5)
        rss = common.proc_status(proc.pid)["VmRSS"] / 1024
    finally:
        common.stop_process(proc)
        listener.close()
        if learned is not None and (state / "learned.json").exists():
            shutil.copyfile(state / "learned.json", learned)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return {"first_load": min(r["start"] for r in records) - t0,
            "ready": None if ready is None else ready - t0, "rss_mb": rss,
            "loads": len(records)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--before", default=None, help="directory holding an older kmodd/")
    ap.add_argument("--out", default="first-load")
    ap.add_argument("--fresh", action="store_true",
                    help="no learned.json carried between starts (no head start)")
    args = ap.parse_args()
    version = common.device_kernel().version
    moddir = Path("/lib/modules") / version
    sources = {"after": str(common.ROOT)}
    if args.before:
        sources = {"before": str(Path(args.before).resolve()), **sources}
    for src in sources.values():
        subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", f"{src}/kmodd"],
                       check=True)
    cache = tempfile.mkdtemp(prefix="kmodd-first-load-cache-")
    carry = {name: None if args.fresh else Path(cache) / f"learned-{name}.json"
             for name in sources}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sources}
    started, host = common.today(), common.machine()
    if not args.fresh:
        # One unmeasured start each: what the previous boot learned (head start).
        for name, src in sources.items():
            one(src, moddir, version, args.devices, cache, carry[name])
    for _ in range(args.rounds):
        for name, src in sources.items():
            runs[name].append(one(src, moddir, version, args.devices, cache, carry[name]))
    lines = []
    for name, rs in runs.items():
        first = statistics.median(r["first_load"] for r in rs)
        lines.append(f"{name}: exec -> first finit_module median {common.fmt_s(first)} "
                     f"({', '.join(common.fmt_s(r['first_load']) for r in rs)}; target "
                     f"<= 50 ms: {'met' if first <= TARGET else 'MISSED'}), READY median "
                     f"{common.fmt_s(statistics.median(r['ready'] for r in rs))}, idle RSS "
                     f"median {statistics.median(r['rss_mb'] for r in rs):.1f} MB")
    print(f"# {started}, {host}, {args.devices} devices")
    print("\n".join(lines))
    common.save_results(args.out, {"benchmark": "first-load", "date": started, "host": host,
                                   "command": "bench/bench_first_load.py "
                                   + " ".join(sys.argv[1:]),
                                   "runs": runs, "summary": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
