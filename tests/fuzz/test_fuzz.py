"""Short fixed-time fuzzing of every parser (CI), and the replay of every input
a campaign ever crashed kmodd with (tests/fuzz/crashers/TARGET/*).

Each target runs ``KMODD_FUZZ_SECONDS`` (default 6) under atheris from its
seeds; together well under three minutes on two cores.  Long campaigns:
``tests/fuzz/campaign.py`` (figures in docs/security.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz import targets as fuzz_targets
from tests.fuzz.seeds import make_seeds

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("KMODD_FUZZ_SECONDS", "6"))
NAMES = sorted(fuzz_targets.targets())
CRASHERS = sorted(p for p in (HERE / "crashers").glob("*/*") if p.is_file())


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    fuzz_targets.cleanup()


@pytest.mark.parametrize("name", NAMES)
def test_short_fuzz_run_finds_no_crash(name: str, seeds: dict[str, Path],
                                       tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), name, "--seconds", str(SECONDS),
         "--seeds", str(seeds[name]), "--corpus", str(tmp_path / "corpus"),
         "--artifacts", str(tmp_path / "crashes")],
        capture_output=True, text=True, timeout=SECONDS + 120)
    crashes = sorted((tmp_path / "crashes").glob("*"))
    assert proc.returncode == 0 and not crashes, (
        f"{name}: exit {proc.returncode}, crashes {[c.name for c in crashes]}\n"
        + proc.stdout[-3000:] + proc.stderr[-6000:])
    assert "DONE" in proc.stderr          # it really fuzzed for its time


@pytest.mark.parametrize("name", NAMES)
def test_every_seed_passes(name: str, seeds: dict[str, Path]) -> None:
    target = fuzz_targets.targets()[name]
    for seed in sorted(seeds[name].iterdir()):
        fuzz_targets.check(target, seed.read_bytes())


@pytest.mark.parametrize("crasher", CRASHERS, ids=[f"{p.parent.name}/{p.name}" for p in CRASHERS])
def test_known_crashers_are_fixed(crasher: Path) -> None:
    """Inputs that once crashed a parser (found by fuzzing): each must pass now."""
    fuzz_targets.check(fuzz_targets.targets()[crasher.parent.name], crasher.read_bytes())
