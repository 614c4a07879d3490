"""Boot time on the real Debian boot: stock (udev + /sbin/modprobe) against kmodd.

    .venv/bin/python bench/bench_boot.py [--rounds 3] [--plots docs/]

kmodd's package is built from this checkout and taken over in a chroot of the
image's tree (``testbed.takeover``: ``dpkg -i``, ``kmodd-takeover enable
--no-start`` with the real ``update-initramfs``), cached.  Then boots
alternate, stock (the image) and kmodd (the takeover image), same devices,
``--rounds`` of each after ``--warmup`` unmeasured ones; each machine keeps
its disk from one boot to its next (powered off cleanly, the disk saved), as
a real machine does: kmodd's learned order and head start
(``/var/lib/kmodd/learned.json``) and the stock boot's caches come from the
previous boot.  ``--fresh`` measures first boots after install instead.  Per boot, from the
kernel's start:

  (a) the last coldplug driver bound: the latest ``driver_bound`` line in the
      kernel log (``dyndbg="func driver_bound +p"`` on the command line: the
      driver core's own debug line, in the ring buffer only);
  (b) ``multi-user.target`` reached: its ActiveEnterTimestampMonotonic
      (``systemd-analyze time`` is printed too).

Medians and the kmodd/stock ratios are printed and written to
``bench/results/boot.json``; with ``--plots DIR``, ``systemd-analyze plot`` of
the first boot of each kind goes to ``DIR/boot-stock.svg`` and
``DIR/boot-kmodd.svg``, and ``kmodctl plot`` of that kmodd boot to
``DIR/boot-kmodd-loads.svg``.

In the last kmodd boot, the kernel-request round trip through the installed
helper (``/usr/libexec/kmodd/kmodd-request``, kmodd running as the unit) is
timed against ``/sbin/modprobe`` as ``kernel.modprobe``: ``ip link add ... type
dummy`` and ``type bridge`` (``--request-reps`` times each, alternating which
helper goes first, the module unloaded after each; warm: one untimed round
first), and the same command with the module already loaded (the floor).
Needs root (the image build, the chroot) and the packaging tools of
scripts/install-deps.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.boot import BootVM
from testbed.image import DUMMY_LINK, ImageArtifacts, build_image
from testbed.takeover import build_deb, derived_images

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "boot.json"
CMDLINE = 'dyndbg="func driver_bound +p" log_buf_len=4M'
_BOUND = re.compile(r"^\[\s*([0-9.]+)\] driver: '([^']+)': driver_bound: bound to device '([^']+)'")


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


# Runs in the booted kmodd machine (python3 -): the request round trip, per
# trigger and helper, in seconds of the guest's monotonic clock.
_REQUEST_DRIVER = r"""
import json, subprocess, sys, time
REPS = int(sys.argv[1])
HELPERS = {"modprobe": "/sbin/modprobe", "kmodd": "/usr/libexec/kmodd/kmodd-request"}
TRIGGERS = {"dummy": ("ip link add kbx0 type dummy", "ip link del kbx0", ["dummy"]),
            "bridge": ("ip link add kbb0 type bridge", "ip link del kbb0",
                       ["bridge", "stp", "llc"])}

def sh(cmd):
    subprocess.run(["/bin/sh", "-c", cmd], check=True, capture_output=True)

def loaded():
    return {line.split()[0] for line in open("/proc/modules")}

def helper(path):
    with open("/proc/sys/kernel/modprobe", "w") as fh:
        fh.write(path + "\n")

def timed(cmd):
    t0 = time.monotonic()
    sh(cmd)
    return time.monotonic() - t0

def undo(name):
    run, undo_cmd, mods = TRIGGERS[name]
    sh(undo_cmd)
    for m in mods:
        sh("rmmod " + m)
    assert not loaded() & set(mods), mods

times = {t: {"modprobe": [], "kmodd": [], "floor": []} for t in TRIGGERS}
assert not loaded() & {m for t in TRIGGERS.values() for m in t[2]}
try:
    for rep in range(REPS + 1):
        order = ("modprobe", "kmodd") if rep % 2 == 0 else ("kmodd", "modprobe")
        for name, (run, _, mods) in TRIGGERS.items():
            for h in order:
                helper(HELPERS[h])
                took = timed(run)
                assert set(mods) <= loaded(), (h, name)
                undo(name)
                if rep:  # round 0 warms the page cache and both helpers
                    times[name][h].append(took)
            helper("/bin/false")
            sh("modprobe " + mods[0])
            took = timed(run)
            undo(name)
            if rep:
                times[name]["floor"].append(took)
finally:
    helper(HELPERS["kmodd"])
print(json.dumps(times))
"""


def request_round_trip(vm: BootVM, reps: int) -> dict[str, dict[str, float]]:
    # The boot's own dummy link (a kernel request at boot) goes first.
    vm.run(f"ip link del {DUMMY_LINK} && rmmod dummy", check=True)
    r = vm.run(["python3", "-c", _REQUEST_DRIVER, str(reps)], timeout=1800, check=True)
    times = json.loads(r.stdout)
    out: dict[str, dict[str, float]] = {}
    for trig, by in times.items():
        med = {k: statistics.median(v) for k, v in by.items()}
        out[trig] = {**med, "ratio": med["kmodd"] / med["modprobe"],
                     "n": float(len(by["kmodd"]))}
        print(f"  request {trig:6}: floor {med['floor'] * 1000:6.1f} ms, /sbin/modprobe "
              f"{med['modprobe'] * 1000:6.1f} ms, kmodd-request {med['kmodd'] * 1000:6.1f} ms, "
              f"ratio {out[trig]['ratio']:.2f}x", flush=True)
    return out


Disk = tuple[Path, Path, Path]


def one_boot(kind: str, image: ImageArtifacts | None, plots: Path | None,
             request_reps: int = 0, *, disk: Disk | None = None,
             save_to: Path | None = None) -> tuple[dict[str, object], Disk | None]:
    """One boot, from *disk* (a previous boot's saved state) or the image; with
    *save_to*, powered off cleanly and its disk saved there for the next boot."""
    vm = BootVM(cmdline_extra=CMDLINE, image=image,
                disk=disk[0] if disk else None, boot_files=disk[1:] if disk else None)
    saved: Disk | None = None
    try:
        vm.boot()
        result = measure(vm)
        if kind == "kmodd":
            active = vm.run("systemctl is-active kmodd.service").stdout.strip()
            if active != "active":
                raise SystemExit(f"kmodd is {active} in a kmodd boot")
            # When kmodd was ready (sysinit.target waits for it) and what its
            # head start did, or why there was none.
            ready = vm.run("systemctl show -p ActiveEnterTimestampMonotonic --value "
                           "kmodd.service", check=True).stdout.strip()
            result["kmodd_ready"] = int(ready) / 1e6
            journal = vm.run("journalctl -b -u kmodd.service -o cat --no-pager",
                             check=True).stdout
            result["head_start"] = [line for line in journal.splitlines()
                                    if "head start" in line][:3]
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
            (plots / f"boot-{kind}.svg").write_text(
                vm.run("systemd-analyze plot", check=True).stdout)
            if kind == "kmodd":
                (plots / "boot-kmodd-loads.svg").write_text(
                    vm.run("kmodctl plot", check=True).stdout)
        if request_reps:
            result["request"] = request_round_trip(vm, request_reps)
        if save_to is not None:
            vm.poweroff()
            saved = vm.save_disk(save_to)
    finally:
        vm.shutdown()
    result["kind"] = kind
    print(f"  {kind:5} (a) last driver bound {result['last_bound']:6.2f} s "
          f"[{result['last_driver']}]  (b) multi-user.target {result['multi_user']:6.2f} s  "
          f"{result['state']}", flush=True)
    if kind == "kmodd":
        print(f"        kmodd ready {result['kmodd_ready']:6.2f} s; "
              + "; ".join(result["head_start"]), flush=True)   # type: ignore[arg-type]
    return result, saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plots", type=Path, default=None, help="directory for the SVG timelines")
    ap.add_argument("--request-reps", type=int, default=7,
                    help="kernel-request round trips per helper and trigger (0: none)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured boots of each kind first (default 1): every measured "
                         "boot then starts from its machine's previous boot, as a "
                         "machine does (0: the first boot after install is measured too)")
    ap.add_argument("--fresh", action="store_true",
                    help="boot every round from the image (first boot after install)")
    args = ap.parse_args()
    base = build_image()
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        takeover = derived_images(build_deb(Path(tmp) / "deb"), base).takeover
        runs: list[dict[str, object]] = []
        disks: dict[str, Disk | None] = {"stock": None, "kmodd": None}
        warmup = 0 if args.fresh else args.warmup
        for i in range(-warmup, args.rounds):
            print(f"warm-up boot {i + warmup + 1}/{warmup}" if i < 0
                  else f"round {i + 1}/{args.rounds}", flush=True)
            for kind in ("stock", "kmodd"):
                last = i == args.rounds - 1 and kind == "kmodd"
                keep = not args.fresh and not last
                result, saved = one_boot(
                    kind, takeover if kind == "kmodd" else None,
                    args.plots if i == 0 else None, args.request_reps if last else 0,
                    disk=disks[kind], save_to=Path(tmp) / f"{kind}-{i + warmup}" if keep else None)
                disks[kind] = saved
                if i >= 0:
                    runs.append(result)
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
        "runs": runs, "summary": summary,
        "request": next((r["request"] for r in runs if "request" in r), {})}, indent=2) + "\n")
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
