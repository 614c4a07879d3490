#!/usr/bin/env python3
"""Coldplug benchmark: kmodd against udevd and a serial ``modprobe -b`` loop.

Every run boots a fresh guest of the QEMU test bed (Debian's kernel under
TCG) with the same emulated machine, prepares it (kmodd installed into tmpfs,
every program's files read once) and then times, with the guest's clock, one
of:

* ``kmodd``:    ``kmodd`` started (``contrib/kmodd-request`` as the kernel's
                request_module() helper) until ``kmodctl settle`` returns; the
                settle client is started when the daemon reports READY=1 on
                the NOTIFY_SOCKET the driver listens on.
* ``udevd``:    ``systemd-udevd --daemon; udevadm trigger --type=subsystems
                --action=add; udevadm trigger --type=devices --action=add;
                udevadm settle`` with the host's udev and /lib/udev/rules.d
                (kmod builtin), /sbin/modprobe as the kernel's helper.
* ``modprobe``: a shell loop running ``modprobe -bq`` once per distinct
                modalias found under /sys/devices, repeated while loads make
                new devices appear (a USB root hub after its controller).

Each run records the modules loaded at the end (``/proc/modules``, and again
once it has stopped changing); the summary checks that kmodd loaded at least
every module udevd did.

Usage: bench/bench_coldplug.py [--counts 20] [--runs 1] [--methods kmodd,udevd,modprobe]
Results are written to bench/results/coldplug.json (read by plot_coldplug.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

METHODS = ("kmodd", "udevd", "modprobe", "kmodd-warm", "kmodd-no-head-start")

UDEV_SCRIPT = ("/lib/systemd/systemd-udevd --daemon; "
               "udevadm trigger --type=subsystems --action=add; "
               "udevadm trigger --type=devices --action=add; "
               "udevadm settle --timeout=900")

MODPROBE_LOOP = r"""
tried=" "
while :; do
    new=0
    for f in $(find /sys/devices -name modalias); do
        read -r a <"$f" 2>/dev/null || continue
        [ -n "$a" ] || continue
        case $tried in *" $a "*) continue ;; esac
        tried="$tried$a "
        new=1
        modprobe -bq "$a"
    done
    [ $new = 1 ] || break
done
"""


# ------------------------------------------------------------------ guest side

def _set_helper(path: str) -> None:
    Path("/proc/sys/kernel/modprobe").write_text(path + "\n")


# The guest's /var/lib/kmodd/learned.json, carried from one boot to the next.
LEARNED_CARRY = common.ROOT / "build" / "bench-learned.json"
GUEST_LEARNED = Path("/var/lib/kmodd/learned.json")
CLI_REPS = 3


def _time_commands(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, list[float]]:
    """Each command CLI_REPS times, alternated; wall seconds of each run."""
    out: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(CLI_REPS):
        for name, argv in commands.items():
            t0 = time.monotonic()
            subprocess.run(argv, env=env, capture_output=True, check=False)
            out[name].append(time.monotonic() - t0)
    return out


def _first_load(t0: float) -> tuple[float | None, int]:
    """Seconds from exec to the first load syscall (the load log's start
    instants are CLOCK_MONOTONIC, like time.monotonic here); records."""
    from kmodd.daemon.control import Client
    try:
        with Client("/run/kmodd/control", timeout=60) as c:
            records = c.call("loads").get("records") or []
    except (OSError, ValueError) as exc:
        print(f"no load log: {exc}", file=sys.stderr)
        return None, 0
    starts = [r["start"] for r in records if r.get("kind") == "coldplug"]
    return (min(starts) - t0 if starts else None), len(records)


def guest_kmodd(warm: bool = False, *extra: str) -> dict[str, Any]:
    if warm:
        # What a persistent index cache would give: the prepared alias index
        # exists before the daemon starts (here: made by one lookup).
        subprocess.run(common.kmodctl_argv("resolve", "pci:v00008086d0000100Esv0sd0bc02sc00i00"),
                       env=common.guest_env(), capture_output=True, check=False)
    # What the last kmodd run of this benchmark learned, as if on a disk.
    learned_devices = 0
    if LEARNED_CARRY.exists():
        GUEST_LEARNED.parent.mkdir(parents=True, exist_ok=True)
        GUEST_LEARNED.write_bytes(LEARNED_CARRY.read_bytes())
        with contextlib.suppress(ValueError, KeyError):
            learned_devices = len(json.loads(LEARNED_CARRY.read_text())["devices"])
    before = common.modules_loaded()
    _set_helper(f"{common.GUEST_PREFIX}/kmodd-request")
    listener = common.NotifyListener()
    env = {**common.guest_env(), **listener.env()}
    log = open("/tmp/kmodd-bench.log", "wb")  # noqa: SIM115 (kept open for the daemon)
    t0 = time.monotonic()
    proc = subprocess.Popen(common.kmodd_argv(*extra), env=env, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    t_ready = listener.wait_for("READY", 900)
    if t_ready is None:
        common.stop_process(proc)
        raise SystemExit("kmodd never reported READY=1:\n"
                         + Path("/tmp/kmodd-bench.log").read_text()[-3000:])
    settle = subprocess.run(common.kmodctl_argv("settle", "--timeout", "900"),
                            env=common.guest_env(), capture_output=True, text=True,
                            check=False)
    t_end = time.monotonic()
    after = common.modules_loaded()
    first_load, records = _first_load(t0)
    final = common.wait_quiet_modules(limit=30.0, quiet=4.0)
    rss = common.proc_status(proc.pid)      # idle, after coldplug
    st = subprocess.run(common.kmodctl_argv("status", "--json"), env=common.guest_env(),
                        capture_output=True, text=True, check=False)
    status = st.stdout + st.stderr
    cli = _time_commands({"kmodctl settle": common.kmodctl_argv("settle"),
                          "kmodctl status": common.kmodctl_argv("status"),
                          "kmodctl why": common.kmodctl_argv("why", "e1000"),
                          # The floor under every figure above: the interpreter
                          # the entry points use, doing nothing.
                          "python3 -c pass": [
                              "/usr/bin/python3" if common.guest_layout() != "venv"
                              else str(common.VENV_PY), "-c", "pass"]},
                         common.guest_env())
    common.stop_process(proc)
    log.close()
    listener.close()
    if GUEST_LEARNED.exists():
        LEARNED_CARRY.parent.mkdir(parents=True, exist_ok=True)
        LEARNED_CARRY.write_bytes(GUEST_LEARNED.read_bytes())
    return {"seconds": t_end - t0, "ready_seconds": t_ready - t0,
            "first_load_seconds": first_load, "records": records, "cli": cli,
            "learned_devices": learned_devices, "layout": common.guest_layout(),
            "settle_rc": settle.returncode, "settle_out": settle.stdout + settle.stderr,
            "before": sorted(before), "after": sorted(after), "final": sorted(final),
            "rss_kb": rss.get("VmRSS"), "hwm_kb": rss.get("VmHWM"),
            "status": status[-6000:],
            "log": Path("/tmp/kmodd-bench.log").read_text(errors="replace")[-60000:]}


def _timed_shell(script: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    res = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                         check=False)
    return time.monotonic() - t0, res


def guest_udevd() -> dict[str, Any]:
    before = common.modules_loaded()
    _set_helper("/sbin/modprobe")
    seconds, res = _timed_shell(UDEV_SCRIPT)
    after = common.modules_loaded()
    final = common.wait_quiet_modules(limit=30.0, quiet=4.0)
    udevd_pid = subprocess.run(["pidof", "systemd-udevd"], capture_output=True, text=True,
                               check=False).stdout.split()
    rss = common.proc_status(int(udevd_pid[0])) if udevd_pid else {}
    cli = _time_commands({"udevadm settle": ["udevadm", "settle"]}, common.guest_env())
    subprocess.run(["udevadm", "control", "--exit"], capture_output=True, check=False)
    return {"seconds": seconds, "rc": res.returncode, "output": (res.stdout + res.stderr)[-2000:],
            "cli": cli, "rss_kb": rss.get("VmRSS"),
            "before": sorted(before), "after": sorted(after), "final": sorted(final)}


def guest_modprobe() -> dict[str, Any]:
    before = common.modules_loaded()
    _set_helper("/sbin/modprobe")
    seconds, res = _timed_shell(MODPROBE_LOOP)
    after = common.modules_loaded()
    final = common.wait_quiet_modules(limit=30.0, quiet=4.0)
    return {"seconds": seconds, "rc": res.returncode, "output": (res.stdout + res.stderr)[-2000:],
            "before": sorted(before), "after": sorted(after), "final": sorted(final)}


def guest_main(method: str) -> int:
    if method.startswith("kmodd"):
        out = guest_kmodd(method == "kmodd-warm",
                          *(["--no-head-start"] if method == "kmodd-no-head-start" else []))
    else:
        out = {"udevd": guest_udevd, "modprobe": guest_modprobe}[method]()
    out["method"] = method
    out["modalias_files"] = sum(1 for _ in Path("/sys/devices").rglob("modalias"))
    common.emit_json(out)
    return 0


# ------------------------------------------------------------------- host side

def run_one(method: str, count: int) -> dict[str, Any]:
    with common.booted(common.devices(count), kernel_modprobe=None) as vm:
        prep = common.prepare_guest(vm)
        res = common.run_guest(vm, [str(common.VENV_PY), str(Path(__file__).resolve()),
                                    "--guest", method], timeout=1800)
        res.update(count=count, boot_seconds=vm.boot_seconds, prepare_seconds=prep)
    return res


def loaded_by(run: dict[str, Any], key: str = "final") -> set[str]:
    return set(run[key]) - set(run["before"])


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> tuple[list[str], bool]:
    lines: list[str] = []
    ok = True
    counts = sorted({r["count"] for r in runs})
    for count in counts:
        here = [r for r in runs if r["count"] == count]
        med = {m: common.median(r["seconds"] for r in here if r["method"] == m)
               for m in methods}
        lines.append(f"{count} devices: " + ", ".join(
            f"{m} {common.fmt_s(med[m])}" for m in methods))
        for k in ("kmodd", "kmodd-warm", "kmodd-no-head-start"):
            if k in med and "udevd" in med:
                lines.append(f"  {k} / udevd = {common.ratio(med[k], med['udevd'])} "
                             "(target <= 0.85x)")
            learned = [r["seconds"] for r in here
                       if r["method"] == k and r.get("learned_devices")]
            if learned and "udevd" in med:
                lines.append(f"  {k} with a learned order ({len(learned)} runs): "
                             f"{common.fmt_s(common.median(learned))} = "
                             f"{common.ratio(common.median(learned), med['udevd'])} udevd")
            firsts = [r["first_load_seconds"] for r in here
                      if r["method"] == k and r.get("first_load_seconds") is not None]
            if firsts:
                lines.append(f"  {k} exec -> first finit_module: median "
                             f"{common.fmt_s(common.median(firsts))} (target <= 0.5 s)")
        rss = {m: common.median(r["rss_kb"] / 1024 for r in here
                                if r["method"] == m and r.get("rss_kb"))
               for m in methods}
        lines.append("  idle RSS after coldplug: " + ", ".join(
            f"{m} {v:.1f} MB" for m, v in rss.items() if v == v))
        cli: dict[str, list[float]] = {}
        for r in here:
            for name, times in r.get("cli", {}).items():
                cli.setdefault(name, []).extend(times)
        if cli:
            lines.append("  commands (best / median of all runs): " + ", ".join(
                f"{n} {common.fmt_s(min(t))} / {common.fmt_s(common.median(t))}"
                for n, t in cli.items()))
        if "modprobe" in med and "udevd" in med:
            lines.append(f"  serial modprobe loop / udevd = "
                         f"{common.ratio(med['modprobe'], med['udevd'])}")
        sets = {m: [loaded_by(r) for r in here if r["method"] == m] for m in methods}
        for m in methods:
            if sets[m]:
                lines.append(f"  {m}: {len(sets[m][0])} modules loaded")
        for k in ("kmodd", "kmodd-warm", "kmodd-no-head-start"):
            if not (sets.get(k) and sets.get("udevd")):
                continue
            union_udev = set().union(*sets["udevd"])
            for s in sets[k]:
                missing = union_udev - s
                extra = s - union_udev
                if missing:
                    ok = False
                    lines.append(f"  MISSING in {k} (udevd loaded them): {sorted(missing)}")
                if extra:
                    lines.append(f"  {k} loaded more than udevd: {sorted(extra)}")
            if all(not (union_udev - s) for s in sets[k]):
                lines.append(f"  {k} loaded every module udevd loaded")
        if sets.get("modprobe") and sets.get("udevd"):
            union_udev = set().union(*sets["udevd"])
            for s in sets["modprobe"]:
                if s != union_udev:
                    lines.append(f"  modprobe loop differs from udevd: only loop "
                                 f"{sorted(s - union_udev)}, only udevd {sorted(union_udev - s)}")
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--counts", default="20",
                    help="device counts, comma-separated (default 20; the plot uses 5,10,20)")
    ap.add_argument("--runs", type=int, default=1, help="fresh boots per method and count")
    ap.add_argument("--methods", default="kmodd,udevd,modprobe",
                    help="kmodd, udevd, modprobe, kmodd-warm (index cache made before start), "
                         "kmodd-no-head-start")
    ap.add_argument("--out", default="coldplug", help="results name under bench/results")
    ap.add_argument("--layout", default="installed", choices=common.LAYOUTS,
                    help="how kmodd is installed in the guest (bench/common.py)")
    ap.add_argument("--keep-learned", action="store_true",
                    help="start with the learned order the last benchmark left "
                         "(default: the first kmodd run learns from scratch)")
    args = ap.parse_args()
    if args.guest:
        return guest_main(args.guest)
    common.set_layout(args.layout)
    if not args.keep_learned:
        LEARNED_CARRY.unlink(missing_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}")
    counts = [int(c) for c in args.counts.split(",")]
    problems = common.check_catalogue(common.devices(max(counts)))
    if problems:
        raise SystemExit("device catalogue problems:\n  " + "\n  ".join(problems))
    common.precompile()
    started = common.today()
    host = common.machine()
    print(f"# coldplug benchmark, {started}\n# host: {host}\n# guest: test bed, 2 vCPUs "
          f"TCG, 1 GiB, Debian kernel {common.device_kernel().version}", flush=True)
    runs: list[dict[str, Any]] = []
    for count in counts:
        for i in range(args.runs):
            for method in methods:
                res = run_one(method, count)
                res["run"] = i
                runs.append(res)
                extra = f", READY {common.fmt_s(res['ready_seconds'])}" \
                    if "ready_seconds" in res else ""
                if res.get("first_load_seconds") is not None:
                    extra += (f", first finit_module {common.fmt_s(res['first_load_seconds'])}"
                              f", {res['learned_devices']} devices learned")
                if res.get("rss_kb"):
                    extra += f", RSS {res['rss_kb'] / 1024:.1f} MB"
                extra += "".join(f", {k} {common.fmt_s(min(v))}"
                                 for k, v in res.get("cli", {}).items())
                common.save_results(args.out, {   # after every run: partial results survive
                    "benchmark": "coldplug", "date": started, "host": host,
                    "command": "bench/bench_coldplug.py " + " ".join(sys.argv[1:]),
                    "devices": [d.qemu for d in common.devices(max(counts))],
                    "methods": methods, "runs": runs, "summary": ["(incomplete)"]})
                print(f"{count:3d} devices  {method:8s} run {i}: "
                      f"{common.fmt_s(res['seconds'])}{extra}, "
                      f"{len(loaded_by(res))} modules (boot {res['boot_seconds']:.0f} s)",
                      flush=True)
    lines, ok = summarize(runs, methods)
    print("\n".join(lines))
    path = common.save_results(args.out, {
        "benchmark": "coldplug", "date": started, "host": host,
        "command": "bench/bench_coldplug.py " + " ".join(sys.argv[1:]),
        "devices": [d.qemu for d in common.devices(max(counts))],
        "methods": methods, "runs": runs, "summary": lines})
    print(f"results: {os.path.relpath(path, common.ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
