"""The started daemon's idle memory is mostly code: what it must not import.

kmodd runs in a fresh interpreter against the simulated kernel with a device
to coldplug, on the usual command line; once coldplug is done, settled and
the memory released, its ``sys.modules`` must hold none of the modules below
(each measured in docs/performance.md, issue 14).  A new import of one of
them anywhere in the daemon's path fails here, with the chain that did it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import VERSION, FakeModule, build_tree

ROOT = Path(__file__).resolve().parents[2]

# argparse (with gettext, and the shutil its help formatter imports), tempfile
# (shutil, random, bz2, lzma): about 1.4 MB of the idle daemon together; dataclasses
# (inspect, ast, dis: kmodd.record instead) 1.1 MB.
HEAVY = ("argparse", "gettext", "tempfile", "shutil", "random", "bz2", "lzma", "dataclasses",
         "inspect", "ast", "dis",
         "pyudev", "elftools", "subprocess")

HARNESS = r"""
import json, os, signal, sys, threading, time
out, sock = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
sys.path.insert(0, os.environ["KMODD_TEST_SOURCE"])

def watch():
    from kmodd.daemon.client import Client
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(sock, timeout=60) as c:
                c.call("settle", timeout=60.0)
                status = c.call("status")
            break
        except OSError:
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.05)
    while any(t.name == "kmodd-after-coldplug" for t in threading.enumerate()):
        time.sleep(0.05)
    with open(out, "w") as f:
        json.dump({"modules": sorted(sys.modules), "status": status}, f)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
from kmodd.cli.daemon import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def sim_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kmodd-imp-", dir="/tmp"))    # short socket path
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_started_daemon_holds_none_of_the_heavy_modules(sim_root: Path) -> None:
    tree = sim_root / "tree"
    build_tree(tree, [FakeModule("nic", aliases=["pci:v00008086d0000100Esv*sd*bc*sc*i*"])])
    root = sim_root / "root"
    dev = root / "sys/devices/pci0000:00/0000:00:03.0"
    dev.mkdir(parents=True)
    (dev / "modalias").write_text("pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00\n")
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("quiet\n")
    out = sim_root / "out.json"
    env = {**os.environ, "KMODD_TEST_SOURCE": str(ROOT),
           "KMODD_CACHE_DIR": str(sim_root / "cache")}
    env.pop("NOTIFY_SOCKET", None)
    res = subprocess.run(
        [sys.executable, "-c", HARNESS, str(out), str(root / "run/kmodd/control"),
         "--kernel", f"sim:{root}", "--root", str(root), "-d", str(tree), "-S", VERSION,
         "--no-journal", "--autoclean-interval", "0"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.exists(), f"rc {res.returncode}:\n{res.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert data["status"]["coldplug"] == "done"
    assert data["status"]["outcomes"].get("loaded") == 1       # nic, for the device
    modules = set(data["modules"])
    assert "kmodd.daemon.service" in modules                  # the daemon really ran
    heavy = sorted(m for m in modules for h in HEAVY if m == h or m.startswith(h + "."))
    assert not heavy, f"the idle daemon imported {heavy}"
