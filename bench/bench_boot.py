"""Boot time on the real Debian boot: stock (udev + /sbin/modprobe) against kmodd.

    .venv/bin/python bench/bench_boot.py [--rounds 3] [--plots docs/]

One machine of the boot test bed installs kmodd's package and takes over
(``kmodd-takeover enable``, as an administrator does), boots once that way and
is powered off; its disk is kept.  Then fresh boots alternate, stock (an
overlay of the image) and kmodd (an overlay of the kept disk), same devices,
``--rounds`` of each.  Per boot, from the kernel's start:

  (a) the last coldplug driver bound: the latest ``driver_bound`` line in the
      kernel log (``dyndbg="func driver_bound +p"`` on the command line: the
      driver core's own debug line, in the ring buffer only);
  (b) ``multi-user.target`` reached: its ActiveEnterTimestampMonotonic
      (``systemd-analyze time`` is printed too).

Medians and the kmodd/stock ratios are printed and written to
``bench/results/boot.json``; with ``--plots DIR``, ``systemd-analyze plot`` of
the first boot of each kind goes to ``DIR/boot-stock.svg`` and
``DIR/boot-kmodd.svg``.  Needs root (the image build) and the packaging tools
of scripts/install-deps.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.boot import BootVM
from testbed.image import build_image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "boot.json"
CMDLINE = 'dyndbg="func driver_bound +p" log_buf_len=4M'
_BOUND = re.compile(r"^\[\s*([0-9.]+)\] driver: '([^']+)': driver_bound: bound to device '([^']+)'")


def build_deb(outdir: Path) -> Path:
    subprocess.run(["bash", str(ROOT / "contrib" / "build-deb.sh"), str(outdir)], check=True,
                   stdout=subprocess.DEVNULL)
    return next(outdir.glob("kmodd_*_all.deb"))


def measure(vm: BootVM) -> dict[str, object]:
    state = vm.run("systemctl is-system-running --wait", timeout=900).stdout.strip()
    dmesg = vm.run("dmesg", check=True).stdout
    bound = [(float(m.group(1)), m.group(2), m.group(3))
             for m in map(_BOUND.match, dmesg.splitlines()) if m]
    if not bound:
        raise SystemExit("no driver_bound lines in the kernel log: dynamic debug is off?")
    mono = vm.run("systemctl show -p ActiveEnterTimestampMonotonic --value multi-user.target",
                  check=True).stdout.strip()
    analyze = vm.run("systemd-analyze time", check=True).stdout.strip()
    last = max(bound)
    return {"state": state, "last_bound": last[0], "last_driver": f"{last[1]} {last[2]}",
            "bound": len(bound), "multi_user": int(mono) / 1e6,
            "systemd_analyze": analyze.splitlines()[0] if analyze else ""}


def one_boot(kind: str, disk: tuple[Path, Path, Path] | None,
             plot: Path | None) -> dict[str, object]:
    vm = BootVM(cmdline_extra=CMDLINE, disk=disk[0] if disk else None,
                boot_files=(disk[1], disk[2]) if disk else None)
    try:
        vm.boot()
        result = measure(vm)
        if kind == "kmodd":
            active = vm.run("systemctl is-active kmodd.service").stdout.strip()
            if active != "active":
                raise SystemExit(f"kmodd is {active} in a kmodd boot")
        if plot is not None:
            plot.write_text(vm.run("systemd-analyze plot", check=True).stdout)
    finally:
        vm.shutdown()
    result["kind"] = kind
    print(f"  {kind:5} (a) last driver bound {result['last_bound']:6.2f} s "
          f"[{result['last_driver']}]  (b) multi-user.target {result['multi_user']:6.2f} s  "
          f"{result['state']}", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plots", type=Path, default=None, help="directory for the SVG timelines")
    args = ap.parse_args()
    build_image()
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        deb = build_deb(Path(tmp) / "deb")
        print("preparing the kmodd disk (dpkg -i, kmodd-takeover enable, one boot)", flush=True)
        prep = BootVM()
        try:
            prep.boot()
            path = prep.put_file(deb.name, deb.read_bytes())
            # update-initramfs under emulation takes minutes, many on a busy host
            prep.run(f"dpkg -i {path} && kmodd-takeover enable && umount /run/testbed-xfer",
                     timeout=3600, check=True)
            prep.reboot(poweroff=True)
            prep.run("systemctl is-system-running --wait", timeout=900)
            prep.poweroff()
            disk = prep.save_disk(Path(tmp) / "kmodd")
        finally:
            prep.shutdown()
        runs: list[dict[str, object]] = []
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", flush=True)
            for kind in ("stock", "kmodd"):
                plot = args.plots / f"boot-{kind}.svg" if args.plots and i == 0 else None
                runs.append(one_boot(kind, disk if kind == "kmodd" else None, plot))
    summary: dict[str, dict[str, float]] = {}
    for key in ("last_bound", "multi_user"):
        med = {k: statistics.median(float(str(r[key])) for r in runs if r["kind"] == k)
               for k in ("stock", "kmodd")}
        summary[key] = {**med, "ratio": med["kmodd"] / med["stock"]}
    labels = {"last_bound": "(a) kernel start -> last coldplug driver bound",
              "multi_user": "(b) kernel start -> multi-user.target          "}
    for key, label in labels.items():
        s = summary[key]
        print(f"{label}: stock {s['stock']:.2f} s, kmodd {s['kmodd']:.2f} s, "
              f"ratio {s['ratio']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus, "
                   f"load {os.getloadavg()[0]:.1f} at the end, QEMU TCG",
        "command": "bench/bench_boot.py " + " ".join(sys.argv[1:]),
        "runs": runs, "summary": summary}, indent=2) + "\n")
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
