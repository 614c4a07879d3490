"""A fuzzing campaign: every target (or those named) for a fixed time, at most
``--jobs`` at once, each under ``nice``; prints a Markdown table of executions,
coverage, corpus size and crashes, and saves it to build/fuzz/campaign.json.

    python tests/fuzz/campaign.py [--seconds 600] [--jobs 2] [TARGET...]

Seeds are made first (tests/fuzz/seeds.py); the corpus of each target
(build/fuzz/corpus/TARGET) is kept between campaigns, crashes go to
build/fuzz/crashes/TARGET.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
STAT = re.compile(r"stat::(\w+):\s+(\d+)")


def summary(target: str, seconds: int, rc: int, output: str, crashes: Path) -> dict[str, object]:
    done = DONE.search(output)
    stats = {k: int(v) for k, v in STAT.findall(output)}
    last_cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)/", output)
    cov, ft, corp = (done.group(2), done.group(3), done.group(4)) if done else (
        last_cov[-1] if last_cov else ("?", "?", "?"))
    return {"target": target, "seconds": seconds, "exit": rc,
            "executions": stats.get("number_of_executed_units"),
            "exec_per_s": stats.get("average_exec_per_sec"),
            "coverage_edges": cov, "features": ft, "corpus": corp,
            "peak_rss_mb": stats.get("peak_rss_mb"),
            "slowest_unit_s": stats.get("slowest_unit_time_sec"),
            "crash_files": sorted(p.name for p in crashes.glob("*") if p.is_file())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("targets", nargs="*")
    args = ap.parse_args()
    from tests.fuzz.seeds import make_seeds
    from tests.fuzz.targets import targets
    names = args.targets or list(targets())
    base = ROOT / "build/fuzz"
    seeds = make_seeds(base / "seeds")
    queue = list(names)
    running: list[tuple[str, subprocess.Popen[str], Path, Path]] = []
    results = []
    while queue or running:
        while queue and len(running) < args.jobs:
            name = queue.pop(0)
            log = base / f"{name}.log"
            crashes = base / "crashes" / name
            cmd = ["nice", "-n", "10", sys.executable, str(ROOT / "tests/fuzz/run.py"), name,
                   "--seconds", str(args.seconds), "--seeds", str(seeds[name])]
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                        cwd=ROOT)
            running.append((name, proc, log, crashes))
        time.sleep(1)
        for item in list(running):
            name, proc, log, crashes = item
            if proc.poll() is None:
                continue
            running.remove(item)
            result = summary(name, args.seconds, proc.returncode, log.read_text(), crashes)
            results.append(result)
            print(json.dumps(result), flush=True)
    (base / "campaign.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n| target | seconds | executions | exec/s | coverage (edges) | features | corpus "
          "| crashes |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: str(r["target"])):
        print(f"| {r['target']} | {r['seconds']} | {r['executions']} | {r['exec_per_s']} "
              f"| {r['coverage_edges']} | {r['features']} | {r['corpus']} "
              f"| {len(r['crash_files'])} (exit {r['exit']}) |")   # type: ignore[arg-type]
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
