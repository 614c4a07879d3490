#!/usr/bin/env python3
"""Start to READY and idle memory: kmodd on the host (simulated kernel) and
kmodd against systemd-udevd in the QEMU test bed.

READY is the moment the daemon's ``READY=1`` reaches a NOTIFY_SOCKET bound
here (for kmodd: coldplug's first walk queued); idle memory is VmRSS from
/proc/PID/status once ``kmodctl settle`` has returned and the daemon has sat
idle for a second.

Host: ``kmodd --kernel sim:TMP --root TMP -d / -S VERSION`` on Debian's module
tree, with TMP/sys/devices holding ``--devices`` fake devices whose modalias
files come from the tree's own alias patterns.  The first run starts with an
empty index cache (``KMODD_CACHE_DIR``, as after a reboot or a depmod), the
others with the cache kmodd wrote.  One extra run under ``-X importtime``
lists the slowest imports.

VM (``--vm``): one fresh boot of the 20-device machine; kmodd (coldplug on,
empty cache, tmpfs install as in bench_coldplug) started, READY, settle, RSS,
stopped; then ``systemd-udevd`` (foreground, no trigger) started, READY, RSS.

Usage: bench/bench_startup.py [--runs 5] [--devices 20] [--vm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

READY_TARGET = 0.150
RSS_TARGET_MB = 30.0


def start_and_measure(argv: list[str], env: dict[str, str], *, settle: list[str] | None,
                      idle: float = 1.0, timeout: float = 600,
                      keep_log: bool = False) -> dict[str, Any]:
    """Spawn ``argv``; time READY=1 and optional settle; RSS when idle; stop it."""
    listener = common.NotifyListener()
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the daemon writes it until stopped)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env={**env, **listener.env()}, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        t_ready = listener.wait_for("READY", timeout)
        if t_ready is None:
            log.seek(0)
            raise RuntimeError(f"{argv[0]} never reported READY=1:\n"
                               + log.read().decode(errors="replace")[-3000:])
        out: dict[str, Any] = {"ready_seconds": t_ready - t0}
        if settle is not None:
            res = subprocess.run(settle, env=env, capture_output=True, check=False,
                                 timeout=timeout + 30)
            out["settle_seconds"] = time.monotonic() - t0
            out["settled"] = res.returncode == 0
        time.sleep(idle)
        st = common.proc_status(proc.pid)
        out.update(rss_kb=st.get("VmRSS"), hwm_kb=st.get("VmHWM"), anon_kb=st.get("RssAnon"),
                   file_kb=st.get("RssFile"), threads=st.get("Threads"))
    finally:
        common.stop_process(proc)
        listener.close()
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    out["log_tail"] = text if keep_log else text[-1500:]
    return out


# ------------------------------------------------------------------- host

def make_sim_root(moddir: Path, devices: int) -> Path:
    from modaliases import make_modaliases

    from kmodd.daemon.uevents import check_modalias
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None   # sysfs is in memory too
    root = Path(tempfile.mkdtemp(prefix="kmodd-startup-", dir=shm))
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("quiet\n")
    aliases = [a for a in make_modaliases(moddir, devices * 4, seed=3, mutate_share=0.0)
               if check_modalias(a) is None][:devices]
    for i, alias in enumerate(aliases):
        d = root / f"sys/devices/pci0000:00/0000:00:{i:02x}.0"
        d.mkdir(parents=True)
        (d / "modalias").write_text(alias + "\n")
    return root


def host_runs(runs: int, devices: int, version: str) -> dict[str, Any]:
    moddir = Path("/lib/modules") / version
    cache = Path(tempfile.mkdtemp(prefix="kmodd-startup-cache-"))
    env = {**os.environ, "KMODD_CACHE_DIR": str(cache), "PYTHONPATH": str(common.ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    results: list[dict[str, Any]] = []
    for i in range(runs):
        root = make_sim_root(moddir, devices)
        sock = str(root / "run/kmodd/control")
        argv = common.kmodd_argv("--kernel", f"sim:{root}", "--root", str(root), "-d", "/",
                                 "-S", version, "--autoclean-interval", "0")
        res = start_and_measure(argv, env, settle=common.kmodctl_argv(
            "settle", "--socket", sock, "--timeout", "300"), timeout=300)
        res["cache"] = "empty" if i == 0 else "warm"
        results.append(res)
        print(f"host run {i} ({res['cache']} cache): READY {common.fmt_s(res['ready_seconds'])}"
              f", settled {common.fmt_s(res['settle_seconds'])}, idle RSS "
              f"{res['rss_kb'] / 1024:.1f} MB (anon {res['anon_kb'] / 1024:.1f}, file "
              f"{res['file_kb'] / 1024:.1f}), {res['threads']} threads", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    # Which imports cost the most, on a warm cache.
    root = make_sim_root(moddir, devices)
    argv = common.kmodd_argv("--kernel", f"sim:{root}", "--root", str(root), "-d", "/",
                             "-S", version, "--autoclean-interval", "0")
    argv.insert(1, "-X")
    argv.insert(2, "importtime")
    imp = start_and_measure(argv, env, settle=None, idle=0.5, keep_log=True)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {"runs": results, "importtime_tail": imp["log_tail"]}


# ------------------------------------------------------------------- guest

def guest_main() -> int:
    env = common.guest_env()
    Path("/proc/sys/kernel/modprobe").write_text(f"{common.GUEST_PREFIX}/kmodd-request\n")
    kmodd = start_and_measure(common.kmodd_argv(), env,
                              settle=common.kmodctl_argv("settle", "--timeout", "900"))
    Path("/proc/sys/kernel/modprobe").write_text("/sbin/modprobe\n")
    udevd = start_and_measure(["/lib/systemd/systemd-udevd"], env, settle=None)
    common.emit_json({"kmodd": kmodd, "udevd": udevd})
    return 0


def importtime_top(text: str, n: int = 12) -> list[str]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line.split("|")
        if len(parts) != 3:
            continue
        try:
            cumulative = int(parts[1].strip())
        except ValueError:
            continue
        rows.append((cumulative, parts[2].rstrip()))
    rows.sort(reverse=True)
    return [f"{c / 1000:7.1f} ms {name}" for c, name in rows[:n]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--vm", action="store_true", help="also kmodd against udevd in the VM")
    ap.add_argument("--no-host", action="store_true", help="only the VM part (with --vm)")
    ap.add_argument("--out", default="startup", help="results name under bench/results")
    ap.add_argument("-S", "--set-version", dest="version", default=None)
    args = ap.parse_args()
    if args.guest:
        return guest_main()
    version = args.version or common.device_kernel().version
    started = common.today()
    host = common.machine()
    print(f"# start-up benchmark, {started}\n# host: {host}", flush=True)
    common.precompile()
    data: dict[str, Any] = {"benchmark": "startup", "date": started, "host": host,
                            "command": "bench/bench_startup.py " + " ".join(sys.argv[1:]),
                            "devices": args.devices}
    ok = True
    if not args.no_host:
        hostres = host_runs(args.runs, args.devices, version)
        warm = [r for r in hostres["runs"] if r["cache"] == "warm"] or hostres["runs"]
        ready = common.median(r["ready_seconds"] for r in warm)
        rss = common.median(r["rss_kb"] for r in warm) / 1024
        cold = hostres["runs"][0]
        print(f"host, simulated kernel, {args.devices} devices: READY median "
              f"{common.fmt_s(ready)} with a warm index cache (target <= 150 ms: "
              f"{'met' if ready <= READY_TARGET else 'MISSED'}), "
              f"{common.fmt_s(cold['ready_seconds'])} with an empty one; idle RSS median "
              f"{rss:.1f} MB (target <= 30 MB: {'met' if rss <= RSS_TARGET_MB else 'MISSED'})")
        print("slowest imports (cumulative, one warm run under -X importtime):")
        imports = importtime_top(hostres["importtime_tail"])
        for line in imports:
            print("  " + line)
        data.update(host_runs=hostres["runs"], host_ready_median_warm=ready,
                    host_rss_mb_median=rss, importtime_top=imports)
        ok = ready <= READY_TARGET and rss <= RSS_TARGET_MB
    if args.vm:
        with common.booted(common.devices(20), kernel_modprobe=None) as vm:
            common.prepare_guest(vm)
            vmres = common.run_guest(vm, [str(common.VENV_PY), str(Path(__file__).resolve()),
                                          "--guest"], timeout=1800)
        k, u = vmres["kmodd"], vmres["udevd"]
        print(f"VM (TCG, 20 devices): kmodd READY {common.fmt_s(k['ready_seconds'])} "
              f"(settled {common.fmt_s(k['settle_seconds'])}), idle RSS "
              f"{k['rss_kb'] / 1024:.1f} MB; systemd-udevd READY "
              f"{common.fmt_s(u['ready_seconds'])}, idle RSS {u['rss_kb'] / 1024:.1f} MB; "
              f"READY kmodd/udevd = {common.ratio(k['ready_seconds'], u['ready_seconds'])}, "
              f"RSS kmodd/udevd = {common.ratio(k['rss_kb'], u['rss_kb'])}")
        data["vm"] = vmres
    path = common.save_results(args.out, data)
    print(f"results: {os.path.relpath(path, common.ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
