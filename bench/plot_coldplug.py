#!/usr/bin/env python3
"""Plot coldplug time per device count for kmodd, udevd and the serial modprobe loop.

Reads every bench/results/coldplug*.json written by bench_coldplug.py (median
of the runs for each method and device count) and writes docs/coldplug.png.
Needs matplotlib (``pip install matplotlib``, or the project's ``bench`` extra);
it is not a runtime dependency of kmodd.

Usage: bench/plot_coldplug.py [--out docs/coldplug.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

STYLE = {
    "kmodd": ("kmodd (start to kmodctl settle)", "tab:blue", "-"),
    "kmodd-warm": ("kmodd, index cache made before start", "tab:blue", ":"),
    "udevd": ("systemd-udevd + trigger + settle", "tab:orange", "-"),
    "modprobe": ("serial modprobe -b loop", "tab:gray", "--"),
}


def collect() -> tuple[dict[str, dict[int, list[float]]], list[str]]:
    data: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    dates: list[str] = []
    for path in sorted(common.RESULTS.glob("coldplug*.json")):
        obj = json.loads(path.read_text())
        if obj.get("benchmark") != "coldplug":
            continue
        dates.append(obj.get("date", "?"))
        for run in obj["runs"]:
            data[run["method"]][int(run["count"])].append(float(run["seconds"]))
    return data, dates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(common.ROOT / "docs" / "coldplug.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, dates = collect()
    if not data:
        raise SystemExit("no bench/results/coldplug*.json: run bench/bench_coldplug.py first")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, (label, color, style) in STYLE.items():
        if method not in data:
            continue
        counts = sorted(data[method])
        medians = [common.median(data[method][c]) for c in counts]
        ax.plot(counts, medians, style, color=color, marker="o", label=label)
        for c, m in zip(counts, medians, strict=True):
            ax.annotate(f"{m:.0f} s", (c, m), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    ax.set_xlabel("emulated devices (besides the test bed's own)")
    ax.set_ylabel("coldplug time, s (median, fresh boot each)")
    ax.set_title("Coldplug on Debian 6.1 under QEMU/TCG (2 vCPUs)\n"
                 f"measured {', '.join(sorted(set(dates)))}", fontsize=9)
    ax.set_xticks(sorted({c for per in data.values() for c in per}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
