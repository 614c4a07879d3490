#!/usr/bin/env python3
"""Kernel request round trip: ``kmodd-request`` against ``/sbin/modprobe`` as the
kernel's request_module() helper, on Debian's kernel in the QEMU test bed.

One boot.  kmodd runs (no coldplug, no autoclean) from a tmpfs install; the
guest driver times, with the guest's clock, commands that make the kernel ask
for a module that is not loaded:

* ``dummy``:  ``ip link add x0 type dummy``   (request_module("rtnl-link-dummy"))
* ``bridge``: ``ip link add b0 type bridge``  (rtnl-link-bridge: llc, stp, bridge)
* ``minix``:  ``mount -t minix /dev/loopN /mnt`` of a small minix image
              (request_module("fs-minix"); the loop device is set up before)

Each repetition runs every trigger once with /sbin/modprobe as
/proc/sys/kernel/modprobe and once with contrib/kmodd-request (order
alternating), undoing it after (``ip link del``/``umount``, then ``rmmod`` of
what the trigger loaded, checked against /proc/modules).  The same command
with the module already loaded is timed too: the floor that no helper can go
below.  Reported: medians, kmodd-request / modprobe, and the helper's own cost
(median minus floor) for both.

Usage: bench/bench_request.py [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

TARGET = 1.5


@dataclass(frozen=True)
class Trigger:
    name: str
    run: str          # shell command that makes the kernel request the module
    undo: str         # shell command that releases it (before rmmod)
    modules: tuple[str, ...]   # what ends up loaded, unloaded in this order


TRIGGERS = (
    Trigger("dummy", "ip link add x0 type dummy", "ip link del x0", ("dummy",)),
    Trigger("bridge", "ip link add b0 type bridge", "ip link del b0",
            ("bridge", "stp", "llc")),
    Trigger("minix", "mount -t minix $LOOP /tmp/bench-mnt", "umount /tmp/bench-mnt",
            ("minix",)),
)


# ------------------------------------------------------------------ guest side

COMMAND_TIMEOUT = 300.0
PROGRESS = common.ROOT / "build" / "bench-request-progress.log"


def progress(text: str) -> None:
    """A line the host can follow while the guest works (the checkout is shared)."""
    with open(PROGRESS, "a") as fh:
        fh.write(f"{time.strftime('%H:%M:%S')} {text}\n")


def sh(cmd: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    res = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, env=env,
                         check=False, timeout=COMMAND_TIMEOUT)
    if check and res.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


def set_helper(path: str) -> None:
    Path("/proc/sys/kernel/modprobe").write_text(path + "\n")


# A command slower than this is a stall: the daemon's threads and descriptors
# and the helpers' states are written to the daemon's log while it hangs.
STALL = 10.0
DAEMON_PID: list[int] = []
STALLS: list[str] = []


def stall_snapshot(cmd: str) -> None:
    """What a stalled request looks like from outside: the daemon's threads'
    stacks (SIGUSR2), its descriptors, the run directory, every helper's state."""
    pid = DAEMON_PID[0] if DAEMON_PID else 0
    STALLS.append(f"{time.strftime('%H:%M:%S')} {cmd}")
    progress(f"STALL > {STALL:g} s: {cmd}; snapshot in the daemon log")
    script = f"""
echo "=== stall snapshot: {cmd}"
kill -USR2 {pid}; sleep 1
echo "--- daemon fds"; ls -l /proc/{pid}/fd
echo "--- daemon threads (state, wchan)"
for t in /proc/{pid}/task/*; do echo "$(cat $t/comm) $(cut -d' ' -f3 $t/stat) \
$(cat $t/wchan)"; done
echo "--- run dir"; ls -l /run/kmodd; cat /run/kmodd/request.pid
echo "--- helpers"
for p in /proc/[0-9]*; do case $(tr '\0' ' ' <$p/cmdline 2>/dev/null) in
*kmodd-request*|*kmodctl*) echo "${{p#/proc/}} $(tr '\0' ' ' <$p/cmdline) \
$(cut -d' ' -f3 $p/stat) $(cat $p/wchan)"; ls -l $p/fd;; esac; done
"""
    with open("/tmp/kmodd-request-bench.log", "a") as log:
        subprocess.run(["/bin/sh", "-c", script], stdout=log, stderr=log, check=False,
                       timeout=60)


def timed(cmd: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", "exec " + cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            proc.wait(STALL)
        except subprocess.TimeoutExpired:
            stall_snapshot(cmd)
        try:
            out, err = proc.communicate(timeout=max(1.0, COMMAND_TIMEOUT -
                                                    (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        log = Path("/tmp/kmodd-request-bench.log")
        raise RuntimeError(f"{cmd!r} did not finish in {COMMAND_TIMEOUT:g} s; helper "
                           f"{Path('/proc/sys/kernel/modprobe').read_text().strip()}; "
                           f"kmodd log:\n{log.read_text()[-3000:] if log.exists() else ''}"
                           ) from None
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({res.returncode}): {res.stderr}")
    return elapsed


def unload(trigger: Trigger, env: dict[str, str]) -> None:
    sh(trigger.undo, env)
    for mod in trigger.modules:
        sh(f"rmmod {mod}", env)
    left = common.modules_loaded() & set(trigger.modules)
    if left:
        raise RuntimeError(f"still loaded after rmmod: {left}")


# kmodd logs (at debug level) when it answered a kernel request.
ANSWERED = re.compile(r"kernel request (\S+) answered ([0-9.]+) ms after its line was read")


def daemon_spans(log: str) -> dict[str, list[float]]:
    """The daemon's read -> reply time per request name, warm-up (the first) left out."""
    spans: dict[str, list[float]] = {}
    for name, ms in ANSWERED.findall(log):
        spans.setdefault(name, []).append(float(ms) / 1000)
    return {name: values[1:] for name, values in spans.items()}


def guest_main(reps: int) -> int:
    helper_kmodd = f"{common.GUEST_PREFIX}/kmodd-request"
    env = dict(os.environ)
    progress("guest driver started")
    sh("modprobe loop; dd if=/dev/zero of=/tmp/minix.img bs=1k count=1024 2>/dev/null; "
       "mkfs.minix /tmp/minix.img >/dev/null; mkdir -p /tmp/bench-mnt")
    env["LOOP"] = sh("losetup -f --show /tmp/minix.img").strip()
    already = common.modules_loaded() & {m for t in TRIGGERS for m in t.modules}
    if already:
        raise RuntimeError(f"modules already loaded before the benchmark: {already}")
    listener = common.NotifyListener()
    log = open("/tmp/kmodd-request-bench.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(common.kmodd_argv("--no-coldplug", "--autoclean-interval", "0",
                                                "--log-level", "debug"),
                              env={**common.guest_env(), **listener.env()}, stdout=log,
                              stderr=log, stdin=subprocess.DEVNULL)
    DAEMON_PID[:] = [daemon.pid]
    if listener.wait_for("READY", 600) is None:
        raise RuntimeError("kmodd did not become ready")
    progress("kmodd ready")
    helpers = {"modprobe": "/sbin/modprobe", "kmodd": helper_kmodd}
    times: dict[str, dict[str, list[float]]] = {t.name: {"modprobe": [], "kmodd": [],
                                                          "floor": []} for t in TRIGGERS}
    try:
        # Warm-up: page cache for the module files, ip, mount and both helpers.
        for trig in TRIGGERS:
            for helper in ("modprobe", "kmodd"):
                set_helper(helpers[helper])
                progress(f"warm-up {trig.name} {helper}")
                timed(trig.run, env)
                unload(trig, env)
        for i in range(reps):
            order = ("modprobe", "kmodd") if i % 2 == 0 else ("kmodd", "modprobe")
            for trig in TRIGGERS:
                for helper in order:
                    set_helper(helpers[helper])
                    times[trig.name][helper].append(timed(trig.run, env))
                    progress(f"rep {i} {trig.name} {helper} "
                             f"{times[trig.name][helper][-1] * 1000:.0f} ms")
                    loaded = common.modules_loaded()
                    if not set(trig.modules) <= loaded:
                        raise RuntimeError(f"{helper}: {trig.name} did not load "
                                           f"{set(trig.modules) - loaded}")
                    unload(trig, env)
                # The floor: same command, modules already there (helper unused).
                set_helper("/bin/false")
                sh(f"modprobe {trig.modules[0]}")
                times[trig.name]["floor"].append(timed(trig.run, env))
                unload(trig, env)
        status = sh(" ".join(common.kmodctl_argv("status", "--json")), common.guest_env(),
                    check=False)
    finally:
        set_helper("/sbin/modprobe")
        common.stop_process(daemon)
        log.close()
        listener.close()
        # The whole daemon log (stall snapshots included) where the host sees it.
        (common.ROOT / "build" / "bench-request-daemon.log").write_bytes(
            Path("/tmp/kmodd-request-bench.log").read_bytes())
    daemon_log = Path("/tmp/kmodd-request-bench.log").read_text(errors="replace")
    common.emit_json({"times": times, "status": status[-3000:], "stalls": STALLS,
                      "daemon": daemon_spans(daemon_log),
                      "log_tail": Path("/tmp/kmodd-request-bench.log").read_text()[-2000:]})
    return 0


# ------------------------------------------------------------------- host side

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if args.guest:
        return guest_main(args.reps)
    common.precompile()
    started = common.today()
    host = common.machine()
    print(f"# kernel request round trip, {started}\n# host: {host}\n# guest: test bed, "
          f"2 vCPUs TCG, Debian kernel {common.device_kernel().version}", flush=True)
    with common.booted([], kernel_modprobe=None) as vm:
        common.prepare_guest(vm)
        res = common.run_guest(vm, [str(common.VENV_PY), str(Path(__file__).resolve()),
                                    "--guest", "--reps", str(args.reps)], timeout=3600)
    rows: list[dict[str, Any]] = []
    worst = 0.0
    print(f"{'trigger':8s} {'floor':>10s} {'modprobe':>10s} {'kmodd':>10s} "
          f"{'kmodd/modprobe':>15s} {'helper cost: modprobe':>22s} {'kmodd':>9s}")
    for trig in TRIGGERS:
        t = res["times"][trig.name]
        floor, mp, km = (common.median(t[k]) for k in ("floor", "modprobe", "kmodd"))
        r = km / mp
        worst = max(worst, r)
        rows.append({"trigger": trig.name, "command": trig.run, "floor": floor, "modprobe": mp,
                     "kmodd": km, "ratio": r, "samples": t})
        print(f"{trig.name:8s} {common.fmt_s(floor):>10s} {common.fmt_s(mp):>10s} "
              f"{common.fmt_s(km):>10s} {r:>14.2f}x {common.fmt_s(mp - floor):>22s} "
              f"{common.fmt_s(km - floor):>9s}")
    spans = res.get("daemon") or {}
    if spans:
        print("daemon, request line read -> reply written (medians): " + ", ".join(
            f"{name} {common.fmt_s(common.median(v))}" for name, v in sorted(spans.items()) if v))
    for stall in res.get("stalls", []):
        print(f"STALL (> {STALL:g} s): {stall}; see build/bench-request-daemon.log")
    print(f"worst kmodd-request / modprobe = {worst:.2f}x (target <= {TARGET}x: "
          f"{'met' if worst <= TARGET else 'MISSED'}); {args.reps} repetitions, medians")
    path = common.save_results("request", {
        "benchmark": "request", "date": started, "host": host,
        "command": "bench/bench_request.py " + " ".join(sys.argv[1:]), "reps": args.reps,
        "rows": rows, "daemon_spans": spans, "daemon_status": res.get("status")})
    print(f"results: {os.path.relpath(path, common.ROOT)}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
