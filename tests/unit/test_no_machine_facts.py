"""Nothing the tests, the test bed, the benchmarks, the scripts or the engine run may
name the machine they were written on: not the checkout's absolute path (CI and the
next session clone elsewhere) and not a Debian kernel version (linux-image-amd64
moves every few weeks).  The kernel under test is discovered (tests.fixtures,
testbed.initramfs.find_kernel); fixtures that need a fake version use one that
cannot exist, like 9.9.9-other.

bench/results/ is left out: it records what was measured, on which kernel.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUARDED = ("tests", "testbed", "bench", "scripts", "kmodd", "contrib", "systemd", ".ci")
RECORDS = ("bench/results/",)
KERNEL_VERSION = re.compile(r"\b\d+\.\d+\.\d+-\d+-amd64\b")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--", *GUARDED],
                         capture_output=True, check=False)
    if out.returncode != 0:
        pytest.fail(f"git ls-files failed in {REPO}: {out.stderr.decode(errors='replace')}")
    names = [n for n in out.stdout.decode().split("\0") if n]
    if not names:
        pytest.fail(f"git ls-files listed nothing under {GUARDED} in {REPO}")
    return [REPO / n for n in names if not n.startswith(RECORDS)]


def offences(text: str, checkout_paths: set[str]) -> list[str]:
    found = [f"kernel version {m.group(0)!r}" for m in KERNEL_VERSION.finditer(text)]
    # The whole path, not a prefix of a longer name (a clone at /srv/k is not
    # named by "/srv/kz-test").
    found += [f"checkout path {p!r}" for p in sorted(checkout_paths)
              if re.search(re.escape(p) + r"(?![\w.-])", text)]
    return found


def test_the_rule_catches_what_it_is_meant_to() -> None:
    version = "-".join(("6.1.0", "56", "amd64"))   # spelled apart: this file is guarded too
    assert offences(f"REAL = '/lib/modules/{version}'", set()) == [f"kernel version {version!r}"]
    assert offences("VERSION = '9.9.9-other'; tree = '6.1.0-fixture'", set()) == []
    assert offences("CHECKOUT = '/srv/x/kmodd'", {"/srv/x/kmodd"}) == \
        ["checkout path '/srv/x/kmodd'"]
    assert offences("junk = '/srv/x/kmodd-other/x.ko'", {"/srv/x/kmodd"}) == []


def test_no_tracked_file_names_this_machine() -> None:
    checkout_paths = {str(REPO), str(REPO.resolve())}
    bad: list[str] = []
    for path in tracked_files():
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        bad += [f"{path.relative_to(REPO)}: {what}" for what in offences(text, checkout_paths)]
    assert not bad, "machine-specific facts in tracked files:\n" + "\n".join(bad)
