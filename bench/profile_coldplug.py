#!/usr/bin/env python3
"""Where kmodd's coldplug time goes, in the VM: threads, hot frames, module loads.

Boots a fresh guest with the coldplug benchmark's devices, prepares it the
same way (kmodd in tmpfs, files read once, empty index cache) and runs kmodd
until ``kmodctl settle`` returns, sampled by py-spy (``pip install -e
'.[bench]'``; without it only the load timeline is printed).  Prints:

* start, READY and settle times;
* per thread, the share of samples spent running (not waiting in a lock,
  ``select`` or the load syscall) and its hottest frames;
* every module load from kmodd's log (``loaded X ... in N ms``), in order of
  completion, with the time spent inside the syscall, and the loads that
  ended together (module inits finishing while another module's
  asynchronous probing runs wait for it in the kernel).

Not a benchmark (py-spy slows the daemon down): a map of where to look.

Usage: bench/profile_coldplug.py [--devices 20] [--rate 50] [-- KMODD-OPTIONS...]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

WAITING = ("Condition.wait", "select (", "RealKernel._call", "Event.wait", "poll (")
LOAD_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \S+: (?:INFO|WARNING): "
                       r"(?:loaded|cannot load) (\S+?):? .*?(?: in (\d+) ms)?(?: \[|$)")


def _pyspy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def guest_main(rate: int, extra: list[str]) -> int:
    Path("/proc/sys/kernel/modprobe").write_text(f"{common.GUEST_PREFIX}/kmodd-request\n")
    listener = common.NotifyListener()
    env = {**common.guest_env(), **listener.env()}
    log_path = Path("/tmp/kmodd-profile.log")
    spy_out = Path("/tmp/kmodd-profile.txt")
    with log_path.open("wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(common.kmodd_argv(*extra), env=env, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        pyspy = _pyspy()
        spy = None if pyspy is None else subprocess.Popen(
            [pyspy, "record", "--pid", str(proc.pid), "--rate", str(rate), "--threads",
             "--idle", "--nonblocking", "--format", "raw", "--output", str(spy_out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_ready = listener.wait_for("READY", 900)
        settle = subprocess.run(common.kmodctl_argv("settle", "--timeout", "900"),
                                env=common.guest_env(), capture_output=True, check=False)
        t_settled = time.monotonic()
        if spy is not None:
            spy.send_signal(signal.SIGINT)      # py-spy writes its samples on SIGINT
            spy.wait(120)
        common.stop_process(proc)
        listener.close()
    samples = spy_out.read_text().splitlines() if spy_out.exists() else []
    common.emit_json({"ready": None if t_ready is None else t_ready - t0,
                      "settled": t_settled - t0, "settle_rc": settle.returncode,
                      "start_wall": time.time() - (time.monotonic() - t0),
                      "log": log_path.read_text(errors="replace"), "samples": samples,
                      "pyspy": pyspy is not None})
    return 0


def summarize_samples(lines: list[str], top: int) -> list[str]:
    running: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    frames: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = re.sub(r"^thread \(\d+\):? ?", "", parts[0]) or parts[0]
        n = int(count)
        total[thread] += n
        if any(w in parts[-1] for w in WAITING):
            continue
        running[thread] += n
        for frame in set(parts[1:]):
            frames[thread][frame] += n
    out = []
    for thread, n in total.most_common():
        out.append(f"{thread}: running {running[thread]}/{n} samples")
        # Frames in every running sample (thread bootstrap, the worker loop) say nothing.
        telling = [(f, k) for f, k in frames[thread].most_common()
                   if k < running[thread] and "threading.py" not in f and "<frozen runpy>" not in f]
        for frame, k in telling[:top]:
            out.append(f"    {k:5d}  {frame[:110]}")
    return out


def summarize_loads(log: str, start_wall: float) -> list[str]:
    loads: list[tuple[float, str, int | None]] = []
    day = time.strftime("%Y-%m-%d ", time.localtime(start_wall))
    for line in log.splitlines():
        m = LOAD_LINE.match(line)
        if not m:
            continue
        end = time.mktime(time.strptime(day + m.group(1)[:8], "%Y-%m-%d %H:%M:%S")) + \
            float("0" + m.group(1)[8:])
        loads.append((end - start_wall, m.group(2), int(m.group(3)) if m.group(3) else None))
    loads.sort()
    out = ["  ends at   in syscall  module (seconds from kmodd's start)"]
    for end, name, ms in loads:
        took = f"{ms / 1000:8.3f} s" if ms is not None else "  failed  "
        out.append(f"  {end:7.3f}  {took}  {name}")
    # Loads of a second or more that ended within 50 ms of each other.
    long = [(e, n) for e, n, ms in loads if ms is not None and ms >= 1000]
    groups: list[list[tuple[float, str]]] = []
    for e, n in long:
        if groups and e - groups[-1][-1][0] <= 0.05:
            groups[-1].append((e, n))
        else:
            groups.append([(e, n)])
    for g in groups:
        if len(g) > 1:
            out.append(f"  ended together at {g[0][0]:.3f} s: {' '.join(n for _, n in g)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=12, help="hot frames shown per thread")
    ap.add_argument("kmodd_options", nargs="*", help="extra kmodd options (after --)")
    args = ap.parse_args()
    if args.guest:
        return guest_main(args.rate, args.kmodd_options)
    common.precompile()
    if _pyspy() is None:
        print("py-spy not installed (pip install -e '.[bench]'): load timeline only",
              flush=True)
    with common.booted(common.devices(args.devices), kernel_modprobe=None) as vm:
        common.prepare_guest(vm)
        res: dict[str, Any] = common.run_guest(
            vm, [str(common.VENV_PY), str(Path(__file__).resolve()), "--guest",
                 "--rate", str(args.rate), "--", *args.kmodd_options], timeout=1800)
    ready = res["ready"]
    print(f"# kmodd coldplug profile, {common.today()}, {args.devices} devices, "
          f"{common.machine()}\n"
          f"READY {'never' if ready is None else common.fmt_s(ready)}, settled "
          f"{common.fmt_s(res['settled'])} (settle exit {res['settle_rc']})"
          f"{', profiled with py-spy' if res['pyspy'] else ''}")
    if res["samples"]:
        print("\n".join(summarize_samples(res["samples"], args.top)))
    print("\n".join(summarize_loads(res["log"], res["start_wall"])))
    os.makedirs(common.ROOT / "build", exist_ok=True)
    (common.ROOT / "build/profile_coldplug.log").write_text(res["log"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
