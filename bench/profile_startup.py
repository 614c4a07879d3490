#!/usr/bin/env python3
"""What happens between kmodd's exec and its first ``finit_module``, in the VM.

Boots a fresh guest with the coldplug benchmark's devices, prepares it like
the benchmarks (kmodd in tmpfs with its byte code, files read once, empty
index cache), then, with the guest's clock:

* starts kmodd and records READY=1, the start of its first load (the load
  log's ``start``, on CLOCK_MONOTONIC like the driver's clock), the
  coldplug-start mark and ``kmodctl settle``'s return;
* runs kmodd once more under ``-X importtime`` (its log lines carry
  timestamps, so the imports show between which steps they happen);
* times ``kmodctl settle/status/why/list`` against ``udevadm settle`` (each
  with its daemon idle), and a bare interpreter start;
* lists the slowest imports of the daemon's and kmodctl's entry points.

Not a benchmark (one run, importtime slows what it measures): a map of
where the start-up goes.  ``--layout`` picks how kmodd is installed in the
guest (bench/common.py; default: as the Debian package installs it).

Usage: bench/profile_startup.py [--devices 20] [--layout installed|generated|venv]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def _timed(argv: list[str], env: dict[str, str], reps: int = 3) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.monotonic()
        subprocess.run(argv, env=env, capture_output=True, check=False)
        out.append(time.monotonic() - t0)
    return out


def _loads(sock: str) -> dict[str, Any]:
    from kmodd.daemon.control import Client
    try:
        with Client(sock, timeout=120) as c:
            return c.call("loads")
    except (OSError, ValueError) as exc:
        print(f"no load log from the daemon: {exc!r}", file=sys.stderr)
        return {}


def _importtime(argv: list[str]) -> list[str]:
    """``argv`` run under ``-X importtime``."""
    if argv[0].endswith(("python", "python3")):
        return [argv[0], "-X", "importtime", *argv[1:]]
    return ["/usr/bin/python3", "-X", "importtime", *argv]


def _run_kmodd(argv: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    listener = common.NotifyListener()
    with log_path.open("wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env={**env, **listener.env()}, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        t_ready = listener.wait_for("READY", 900)
        settle = subprocess.run(common.kmodctl_argv("settle", "--timeout", "900"), env=env,
                                capture_output=True, text=True, check=False)
        t_settled = time.monotonic()
        loads = _loads("/run/kmodd/control")
        time.sleep(1.0)
        rss = common.proc_status(proc.pid)
        res: dict[str, Any] = {"t0": t0, "pid": proc.pid, "proc": proc, "rss": rss,
                               "ready": None if t_ready is None else t_ready - t0,
                               "settled": t_settled - t0, "settle_rc": settle.returncode,
                               "settle_out": settle.stdout + settle.stderr}
    starts = [r["start"] for r in loads.get("records", [])]
    res["first_load"] = min(starts) - t0 if starts else None
    res["marks"] = {k: v - t0 for k, v in (loads.get("marks") or {}).items()}
    res["loads"] = len(starts)
    return res


def guest_main() -> int:
    env = common.guest_env()
    Path("/proc/sys/kernel/modprobe").write_text(f"{common.GUEST_PREFIX}/kmodd-request\n")
    kmodd = common.kmodd_argv()
    out: dict[str, Any] = {"layout": common.guest_layout(), "argv": kmodd}
    run = _run_kmodd(kmodd, env, Path("/tmp/kmodd-run1.log"))
    proc = run.pop("proc")
    out["kmodctl"] = {c: _timed(common.kmodctl_argv(*c.split()), env)
                      for c in ("settle", "status", "why e1000", "list")}
    common.stop_process(proc)
    out["run"] = run
    out["log1"] = Path("/tmp/kmodd-run1.log").read_text(errors="replace")[-20000:]
    # Second daemon: nothing left to load (every module is in), so this shows
    # the start alone under importtime, interleaved with the log's timestamps.
    run2 = _run_kmodd(_importtime(kmodd), env, Path("/tmp/kmodd-run2.log"))
    common.stop_process(run2.pop("proc"))
    out["log2"] = Path("/tmp/kmodd-run2.log").read_text(errors="replace")
    out["interp"] = {"python3 -c pass": _timed(["/usr/bin/python3", "-c", "pass"], env),
                     "python3 -I -c pass": _timed(["/usr/bin/python3", "-I", "-c", "pass"], env),
                     "python3 -I -S -c pass": _timed(["/usr/bin/python3", "-I", "-S", "-c",
                                                      "pass"], env)}
    imp = subprocess.run(_importtime(common.kmodctl_argv("status")), env=env,
                         capture_output=True, text=True, check=False)
    out["importtime_kmodctl_status"] = imp.stderr
    Path("/proc/sys/kernel/modprobe").write_text("/sbin/modprobe\n")
    subprocess.run(["/lib/systemd/systemd-udevd", "--daemon"], env=env, check=False)
    time.sleep(1.0)
    out["udevadm_settle"] = _timed(["udevadm", "settle"], env)
    subprocess.run(["udevadm", "control", "--exit"], capture_output=True, check=False)
    common.emit_json(out)
    return 0


def _importtime_top(text: str, n: int) -> list[str]:
    from bench_startup import importtime_top
    return importtime_top(text, n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--layout", default="installed", choices=common.LAYOUTS)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if args.guest:
        return guest_main()
    common.set_layout(args.layout)
    common.precompile()
    with common.booted(common.devices(args.devices), kernel_modprobe=None) as vm:
        common.prepare_guest(vm)
        res = common.run_guest(vm, [str(common.VENV_PY), str(Path(__file__).resolve()),
                                    "--guest"], timeout=1800)
    run = res["run"]
    print(f"# kmodd start-up profile, {common.today()}, {args.devices} devices, "
          f"{common.machine()}, layout {res['layout']}")
    print(f"first finit_module {run['first_load']}, READY {run['ready']}, settled "
          f"{run['settled']} (rc {run['settle_rc']}), marks {run['marks']}, {run['loads']} "
          f"loads, RSS {run['rss'].get('VmRSS')} kB")
    for k, v in res["kmodctl"].items():
        print(f"kmodctl {k}: {' '.join(f'{x * 1000:.0f}' for x in v)} ms")
    print(f"udevadm settle: {' '.join(f'{x * 1000:.0f}' for x in res['udevadm_settle'])} ms")
    for k, v in res["interp"].items():
        print(f"{k} -c pass: {' '.join(f'{x * 1000:.0f}' for x in v)} ms")
    print("kmodd log of the importtime run (timestamps) with its imports:")
    print("\n".join(_importtime_top(res["log2"], args.top)))
    print("kmodctl status imports:")
    print("\n".join(_importtime_top(res["importtime_kmodctl_status"], 15)))
    os.makedirs(common.ROOT / "build", exist_ok=True)
    (common.ROOT / "build/profile_startup.json").write_text(json.dumps(res, indent=1))
    print("raw: build/profile_startup.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
