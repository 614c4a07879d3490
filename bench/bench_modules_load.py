#!/usr/bin/env python3
"""modules-load.d: kmodd against systemd-modules-load, 30 listed modules, on
Debian's kernel in the QEMU test bed.

One boot.  A file in /run/modules-load.d lists 30 network, block and file
system modules (several with dependencies) that the guest has not loaded.
Each repetition, timed with the guest's clock, in alternating order:

* ``systemd-modules-load``: ``/lib/systemd/systemd-modules-load`` run to its
  exit (it loads the list one module at a time);
* ``kmodd``: the daemon started (``--no-coldplug``, no autoclean) until
  ``kmodctl settle`` says every listed load is done (READY=1 comes then too,
  unless the loads take longer than its limit); also reported is the part
  after its own start-up, from the first listed request to the last load's
  end, from its load log (``kmodctl blame`` reads the same).

After each run the modules are unloaded (``rmmod``) and /proc/modules
must be back to where it was; both methods must load the same modules.

Usage: bench/bench_modules_load.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

LISTED = ("dummy", "veth", "tun", "vxlan", "geneve", "bonding", "macvlan", "ipvlan", "nlmon",
          "ifb", "8021q", "bridge", "team", "wireguard", "sit", "ipip", "ip_gre", "l2tp_eth",
          "vcan", "nbd", "zram", "brd", "loop", "squashfs", "isofs", "udf", "minix", "nilfs2",
          "jfs", "hfsplus")
# Not sctp: once loaded it keeps a reference to itself and cannot be unloaded.
LIST_FILE = "/run/modules-load.d/kmodd-bench.conf"
MODULES_LOAD = "/lib/systemd/systemd-modules-load"
COMMAND_TIMEOUT = 600.0


# ------------------------------------------------------------------ guest side

def sh(cmd: str, check: bool = True) -> str:
    res = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True,
                         check=False, timeout=COMMAND_TIMEOUT)
    if check and res.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


def unload_all(listed: list[str], baseline: set[str]) -> None:
    """rmmod whatever the run added, users before what they use, until nothing is left."""
    for _ in range(20):
        extra = common.modules_loaded() - baseline
        if not extra:
            return
        for line in Path("/proc/modules").read_text().splitlines():
            name, _size, refs = line.split()[:3]
            if name in extra and refs == "0":
                sh(f"rmmod {name}", check=False)
    left = [line for line in Path("/proc/modules").read_text().splitlines()
            if line.split()[0] in common.modules_loaded() - baseline]
    raise RuntimeError("still loaded after rmmod:\n" + "\n".join(left))


def run_systemd(listed: list[str], baseline: set[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = subprocess.run([MODULES_LOAD], capture_output=True, text=True, check=False,
                         timeout=COMMAND_TIMEOUT)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"systemd-modules-load failed ({res.returncode}): {res.stderr}")
    return {"seconds": elapsed, "loaded": sorted(common.modules_loaded() - baseline)}


def run_kmodd(listed: list[str], baseline: set[str]) -> dict[str, Any]:
    from kmodd.daemon.control import Client
    # As after a boot: no load log of an earlier daemon to carry on from.
    Path("/run/kmodd/loads.json").unlink(missing_ok=True)
    listener = common.NotifyListener()
    log = open("/tmp/kmodd-modules-load-bench.log", "wb")  # noqa: SIM115
    t0 = time.perf_counter()
    daemon = subprocess.Popen(common.kmodd_argv("--no-coldplug", "--autoclean-interval", "0"),
                              env={**common.guest_env(), **listener.env()}, stdout=log,
                              stderr=log, stdin=subprocess.DEVNULL)
    try:
        if listener.wait_for("READY", COMMAND_TIMEOUT) is None:
            raise RuntimeError("kmodd did not become ready: "
                               + Path("/tmp/kmodd-modules-load-bench.log").read_text()[-2000:])
        ready = time.perf_counter() - t0
        with Client("/run/kmodd/control", timeout=COMMAND_TIMEOUT) as client:
            # READY=1 waits for the listed loads, up to a limit: settle is certain.
            if not client.settle(COMMAND_TIMEOUT - 10).get("settled"):
                raise RuntimeError("kmodd did not settle")
            elapsed = time.perf_counter() - t0
            loads = client.call("loads")
    finally:
        common.stop_process(daemon)
        log.close()
        listener.close()
    mine = [r for r in loads["records"] if r["kind"] == "modules-load"]
    failed = [r["module"] for r in mine if r["status"] == "failed"]
    if failed:
        raise RuntimeError(f"kmodd failed to load {failed}")
    first = min(r["requested_at"] for r in mine)
    last = max(r["end"] for r in mine)
    spans = sorted((r["start"], r["end"]) for r in mine)
    # Most loads inside the kernel at one instant (a sweep over starts and ends).
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    inside = most = 0
    for _, step in events:
        inside += step
        most = max(most, inside)
    return {"seconds": elapsed, "ready_seconds": ready, "loads_seconds": last - first,
            "kernel_seconds": sum(e - s for s, e in spans), "max_parallel": most,
            "records": len(mine), "loaded": sorted(common.modules_loaded() - baseline)}


def guest_main(reps: int) -> int:
    modules_dep = Path(f"/lib/modules/{os.uname().release}/modules.dep").read_text()
    present = {Path(line.split(":", 1)[0]).name.split(".ko")[0].replace("-", "_")
               for line in modules_dep.splitlines()}
    listed = [m for m in LISTED if m.replace("-", "_") in present]
    baseline = common.modules_loaded()
    already = baseline & set(listed)
    if already:
        raise RuntimeError(f"listed modules already loaded: {sorted(already)}")
    Path(LIST_FILE).parent.mkdir(parents=True, exist_ok=True)
    Path(LIST_FILE).write_text("# kmodd benchmark\n" + "".join(f"{m}\n" for m in listed))
    runs: dict[str, list[dict[str, Any]]] = {"systemd-modules-load": [], "kmodd": []}
    methods = {"systemd-modules-load": run_systemd, "kmodd": run_kmodd}
    try:
        # Warm-up: page cache for the module files and both programs.
        for name, fn in methods.items():
            fn(listed, baseline)
            unload_all(listed, baseline)
            print(f"warm-up {name} done", file=sys.stderr, flush=True)
        for i in range(reps):
            order = list(methods) if i % 2 == 0 else list(reversed(methods))
            for name in order:
                runs[name].append(methods[name](listed, baseline))
                unload_all(listed, baseline)
                print(f"rep {i} {name} {runs[name][-1]['seconds']:.3f} s", file=sys.stderr,
                      flush=True)
    finally:
        Path(LIST_FILE).unlink(missing_ok=True)
    common.emit_json({"listed": listed, "runs": runs})
    return 0


# ------------------------------------------------------------------- host side

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.guest:
        return guest_main(args.reps)
    common.precompile()
    started = common.today()
    host = common.machine()
    print(f"# modules-load.d: kmodd vs systemd-modules-load, {started}\n# host: {host}\n"
          f"# guest: test bed, 2 vCPUs TCG, Debian kernel {common.device_kernel().version}",
          flush=True)
    with common.booted([], kernel_modprobe=None) as vm:
        common.prepare_guest(vm)
        res = common.run_guest(vm, [str(common.VENV_PY), str(Path(__file__).resolve()),
                                    "--guest", "--reps", str(args.reps)], timeout=7200)
    runs = res["runs"]
    sm = runs["systemd-modules-load"]
    km = runs["kmodd"]
    same = {tuple(r["loaded"]) for r in sm + km}
    if len(same) != 1:
        union = set().union(*same)
        for name, rs in (("systemd-modules-load", sm), ("kmodd", km)):
            for i, r in enumerate(rs):
                print(f"{name} run {i}: missing {sorted(union - set(r['loaded']))}")
        return 1
    sm_t = common.median(r["seconds"] for r in sm)
    km_t = common.median(r["seconds"] for r in km)
    km_loads = common.median(r["loads_seconds"] for r in km)
    km_kernel = common.median(r["kernel_seconds"] for r in km)
    parallel = max(r["max_parallel"] for r in km)
    loaded = len(next(iter(same)))
    print(f"{len(res['listed'])} listed modules, {loaded} loaded with their dependencies; "
          f"{args.reps} repetitions, medians")
    print(f"systemd-modules-load, start to exit:          {common.fmt_s(sm_t):>10s}")
    print(f"kmodd, start to settled (loads included):     {common.fmt_s(km_t):>10s}  "
          f"{km_t / sm_t:.2f}x")
    print(f"kmodd, first listed request to last load end: {common.fmt_s(km_loads):>10s}  "
          f"{km_loads / sm_t:.2f}x  (sum of times in the kernel {common.fmt_s(km_kernel)}, "
          f"up to {parallel} loads at once)")
    path = common.save_results("modules-load", {
        "benchmark": "modules-load", "date": started, "host": host,
        "command": "bench/bench_modules_load.py " + " ".join(sys.argv[1:]), "reps": args.reps,
        "listed": res["listed"], "loaded": loaded, "systemd_modules_load": sm_t,
        "kmodd_ready": km_t, "kmodd_loads": km_loads, "kmodd_kernel_sum": km_kernel,
        "max_parallel": parallel, "runs": runs})
    print(f"results: {os.path.relpath(path, common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
