#!/usr/bin/env python3
"""Resolution benchmark: ``kmodctl resolve -`` against libkmod, on the same modaliases.

Builds N modaliases from the module tree's own alias patterns (realistic field
values, a share mutated into misses; fixed seed), then alternately

* times libkmod in this process through ctypes: ``kmod_new`` +
  ``kmod_load_resources`` + one ``kmod_module_new_from_lookup`` per alias
  (the list released each time), as udev's kmod builtin does;
* times one whole ``kmodctl resolve -`` process fed the same list on standard
  input: interpreter start-up, configuration, index loading, every lookup and
  the output included.

Both use the default configuration.  Every answer kmodctl prints is checked
against libkmod's (module names, in order).  kmod's tools never call
setlocale, so libkmod runs in the C locale here too (its fnmatch is slower in
a UTF-8 locale, which would flatter kmodd).  The first kmodctl run uses an
empty cache directory, to show the cost of preparing the index once.

Usage: bench/bench_resolve.py [--count 20000] [--runs 5] [-d ROOT] [-S VERSION]
"""

from __future__ import annotations

import argparse
import locale
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libkmod import LibKmod
from modaliases import make_modaliases


def _kmodctl() -> str:
    here = Path(__file__).resolve().parent.parent / ".venv/bin/kmodctl"
    return str(here) if here.exists() else (shutil.which("kmodctl") or "kmodctl")


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} CPUs, load {load:.2f}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def run_kmodctl(cmd: list[str], infile: str, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, output) of one kmodctl process.

    Standard input and output are files, not pipes, so the time does not
    depend on when this process gets scheduled to feed or drain a pipe.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(infile, "rb") as stdin, tempfile.TemporaryFile() as stdout:
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                              env=env, check=False)
        elapsed = time.perf_counter() - start
        stdout.seek(0)
        out = stdout.read().decode()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"kmodctl failed ({proc.returncode}): {proc.stderr.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, out


def run_libkmod(moddir: str, aliases: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of kmod_new, kmod_load_resources and every lookup."""
    start, cpu = time.perf_counter(), time.process_time()
    kmod = LibKmod(moddir)
    kmod.lookup_only(aliases)
    kmod.close()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-d", "--dirname", default=None, help="root holding lib/modules")
    ap.add_argument("-S", "--set-version", dest="version", default=None)
    ap.add_argument("--kmodctl", default=_kmodctl())
    args = ap.parse_args()

    base = Path(args.dirname or "/")
    version = args.version or os.uname().release
    if args.version is None and not (base / "lib/modules" / version / "modules.alias").exists():
        # e.g. a container or VM host running another kernel: the one tree installed
        trees = [d.name for d in (base / "lib/modules").glob("*") if (d / "modules.alias").exists()]
        if len(trees) == 1:
            version = trees[0]
            print(f"note: no module tree for the running kernel; using {version}")
    moddir = base / "lib/modules" / version
    if not (moddir / "modules.alias").exists():
        raise SystemExit(f"{moddir}: no modules.alias (install the kernel's modules, run depmod)")
    aliases = make_modaliases(moddir, args.count, args.seed)
    text = "".join(a + "\n" for a in aliases)
    cmd = [args.kmodctl, "resolve", "-S", version]
    if args.dirname:
        cmd += ["-d", args.dirname]
    cmd.append("-")

    locale.setlocale(locale.LC_CTYPE, "C")
    env = dict(os.environ)

    # Answers first (untimed): libkmod's names for every alias, kmodctl's output.
    kmod = LibKmod(str(moddir))
    expected = [kmod.lookup(a) for a in aliases]
    kmod.close()

    with tempfile.TemporaryDirectory(prefix="kmodd-bench-") as work:
        cache = os.path.join(work, "cache")
        infile = os.path.join(work, "modaliases")
        Path(infile).write_text(text)
        cold, cold_cpu, out = run_kmodctl(cmd, infile, {**env, "KMODD_CACHE_DIR": cache})
        lines = out.split("\n")[:-1]
        if len(lines) != len(aliases):
            raise SystemExit(f"kmodctl printed {len(lines)} lines for {len(aliases)} aliases")
        wrong = []
        for alias, line, want in zip(aliases, lines, expected, strict=True):
            got_alias, _, names = line.partition("\t")
            if got_alias != alias or names.split() != want:
                wrong.append((alias, names.split(), want))
        for alias, got, want in wrong[:10]:
            print(f"MISMATCH {alias}: kmodctl {got} libkmod {want}")

        kmodctl_runs: list[tuple[float, float]] = []
        libkmod_runs: list[tuple[float, float]] = []
        for _ in range(args.runs):
            libkmod_runs.append(run_libkmod(str(moddir), aliases))
            kmodctl_runs.append(run_kmodctl(cmd, infile, {**env, "KMODD_CACHE_DIR": cache})[:2])

    resolved = sum(1 for w in expected if w)
    lk = statistics.median(w for w, _ in libkmod_runs)
    kc = statistics.median(w for w, _ in kmodctl_runs)
    lk_cpu = statistics.median(c for _, c in libkmod_runs)
    kc_cpu = statistics.median(c for _, c in kmodctl_runs)
    print(f"machine:   {_machine()}")
    print(f"tree:      {moddir} ({len(aliases)} modaliases, seed {args.seed}, "
          f"{resolved} resolve, {len(aliases) - resolved} miss)")
    print(f"answers:   {len(aliases) - len(wrong)}/{len(aliases)} identical to libkmod")
    print(f"libkmod:   wall median {lk:.3f} s  min {min(w for w, _ in libkmod_runs):.3f} s  "
          f"CPU median {lk_cpu:.3f} s  (in-process, ctypes, {args.runs} runs)")
    print(f"kmodctl:   wall median {kc:.3f} s  min {min(w for w, _ in kmodctl_runs):.3f} s  "
          f"CPU median {kc_cpu:.3f} s  (whole process, prepared index cached, {args.runs} runs)")
    print(f"kmodctl cold (empty cache, index prepared and stored): wall {cold:.3f} s  "
          f"CPU {cold_cpu:.3f} s")
    lk_min = min(w for w, _ in libkmod_runs)
    kc_min = min(w for w, _ in kmodctl_runs)
    print(f"ratio:     wall {kc / lk:.2f}  CPU {kc_cpu / lk_cpu:.2f}  "
          f"(median kmodctl / median libkmod; target <= 0.5); "
          f"best wall {kc_min / lk_min:.2f}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
