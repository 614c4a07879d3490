"""Coverage-guided fuzzing of one target with atheris (libFuzzer for Python).

    python tests/fuzz/run.py TARGET [--seconds N] [--corpus DIR] [--seeds DIR]
                                    [--artifacts DIR] [-- libFuzzer options...]

kmodd's modules (and pyelftools for the ELF target) are instrumented for
coverage.  New inputs go to ``--corpus`` (default build/fuzz/corpus/TARGET),
crashing ones to ``--artifacts`` (default build/fuzz/crashes/TARGET).  A
crash is what tests/fuzz/targets.py says; inputs are at most 64 KiB.  The
exit status is libFuzzer's: 0 when the time ran out without a crash.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


INSTRUMENT = {
    "index_bin": ["kmodd.resolution.index_bin", "kmodd.resolution.aliasmatch"],
    "index_text": ["kmodd.resolution.index", "kmodd.resolution.index_bin",
                   "kmodd.resolution.aliasmatch"],
    "modprobe_d": ["kmodd.resolution.config"],
    "cmdline": ["kmodd.resolution.config"],
    "kmodd_conf": ["kmodd.daemon.settings", "tomllib"],
    "control": ["kmodd.daemon.control", "kmodd.daemon.service", "kmodd.resolution.names"],
    "fifo": ["kmodd.daemon.kernelreq"],
    "uevent": ["kmodd.daemon.uevents"],
    "state": ["kmodd.daemon.state"],
    "learned": ["kmodd.daemon.learned"],
    "elf": ["kmodd.modfile.elf", "kmodd.modfile", "kmodd.modfile.signature", "elftools.elf.elffile",
            "elftools.elf.sections", "elftools.common.utils"],
    "signature": ["kmodd.modfile.signature"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--seeds", type=Path)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("libfuzzer", nargs="*")
    args = ap.parse_args()

    import atheris

    # Only what the target exercises is instrumented: instrumenting costs
    # seconds of start-up per module tree, and coverage elsewhere is noise.
    modules = INSTRUMENT[args.target]
    with atheris.instrument_imports(include=modules):
        for name in modules:
            importlib.import_module(name)
    from tests.fuzz import targets as fuzz_targets

    target = fuzz_targets.targets()[args.target]
    corpus = args.corpus or ROOT / "build/fuzz/corpus" / args.target
    artifacts = args.artifacts or ROOT / "build/fuzz/crashes" / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    dirs = [str(corpus)] + ([str(args.seeds)] if args.seeds else [])

    def one(data: bytes) -> None:
        fuzz_targets.check(target, data)

    argv = [sys.argv[0], f"-max_total_time={args.seconds}",
            f"-max_len={fuzz_targets.MAX_LEN}", "-timeout=10", "-rss_limit_mb=2048",
            f"-artifact_prefix={artifacts}{os.sep}", "-print_final_stats=1",
            *args.libfuzzer, *dirs]
    atheris.Setup(argv, one)
    try:
        atheris.Fuzz()
    finally:
        fuzz_targets.cleanup()


if __name__ == "__main__":
    main()
