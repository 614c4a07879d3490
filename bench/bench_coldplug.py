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
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

METHODS = ("kmodd", "udevd", "modprobe", "kmodd-warm")

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


def guest_kmodd(warm: bool = False) -> dict[str, Any]:
    if warm:
        # What a persistent index cache would give: the prepared alias index
        # exists before the daemon starts (here: made by one lookup).
        subprocess.run(common.kmodctl_argv("resolve", "pci:v00008086d0000100Esv0sd0bc02sc00i00"),
                       env=common.guest_env(), capture_output=True, check=False)
    before = common.modules_loaded()
    _set_helper(f"{common.GUEST_PREFIX}/kmodd-request")
    listener = common.NotifyListener()
    env = {**common.guest_env(), **listener.env()}
    log = open("/tmp/kmodd-bench.log", "wb")  # noqa: SIM115 (kept open for the daemon)
    t0 = time.monotonic()
    proc = subprocess.Popen(common.kmodd_argv(), env=env, stdout=log, stderr=log,
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
    rss = common.proc_status(proc.pid)
    final = common.wait_quiet_modules(limit=30.0, quiet=4.0)
    st = subprocess.run(common.kmodctl_argv("status", "--json"), env=common.guest_env(),
                        capture_output=True, text=True, check=False)
    status = st.stdout + st.stderr
    common.stop_process(proc)
    log.close()
    listener.close()
    return {"seconds": t_end - t0, "ready_seconds": t_ready - t0,
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
    subprocess.run(["udevadm", "control", "--exit"], capture_output=True, check=False)
    return {"seconds": seconds, "rc": res.returncode, "output": (res.stdout + res.stderr)[-2000:],
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
        out = guest_kmodd(warm=method == "kmodd-warm")
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
        for k in ("kmodd", "kmodd-warm"):
            if k in med and "udevd" in med:
                lines.append(f"  {k} / udevd = {common.ratio(med[k], med['udevd'])} "
                             "(target <= 0.70x)")
        if "modprobe" in med and "udevd" in med:
            lines.append(f"  serial modprobe loop / udevd = "
                         f"{common.ratio(med['modprobe'], med['udevd'])}")
        sets = {m: [loaded_by(r) for r in here if r["method"] == m] for m in methods}
        for m in methods:
            if sets[m]:
                lines.append(f"  {m}: {len(sets[m][0])} modules loaded")
        for k in ("kmodd", "kmodd-warm"):
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
                    help="kmodd, udevd, modprobe, kmodd-warm (index cache made before start)")
    ap.add_argument("--out", default="coldplug", help="results name under bench/results")
    args = ap.parse_args()
    if args.guest:
        return guest_main(args.guest)
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
