"""Link kinds in every network namespace, on the host's real kernel.

Needs root (as the journald test does): it makes network namespaces with
unshare(1), links in them with ip(8), and a namespace kept only by a bind
mount, then reads them all from the test's own namespace without entering any.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.kernel.netlink import _kinds_in, _Rtnl, link_kinds, namespaces

PROC = Path("/proc")


@pytest.fixture
def container(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in a namespace of its own with a bridge, as a container has."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c",
                             f"ip link add kmt0 type bridge && touch {ready} && exec sleep 60"])
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "unshare -n failed"
        time.sleep(0.02)
    yield proc
    proc.kill()
    proc.wait()


def test_links_in_a_process_namespace_are_seen(container: subprocess.Popen[bytes],
                                               tmp_path: Path) -> None:
    own, others = namespaces(PROC, tmp_path / "no-run-netns")
    theirs = [ns for ns in others if container.pid in ns.pids]
    assert len(theirs) == 1 and all(ns.key != own for ns in others)
    rtnl = _Rtnl(2.0)
    try:
        assert _kinds_in(rtnl, theirs[0]) == {"bridge"}     # lo has no kind
    finally:
        rtnl.close()
    assert "bridge" in link_kinds(proc=PROC, run_netns=tmp_path / "no-run-netns")


def test_links_in_a_namespace_only_a_bind_mount_keeps(tmp_path: Path) -> None:
    """``ip netns add``: no process inside, only a mount of its nsfs inode."""
    anchor = tmp_path / "ns1"
    anchor.touch()
    subprocess.run(["unshare", "-n", "sh", "-c",
                    f"ip link add kmv0 type veth peer name kmv1 && "
                    f"mount --bind /proc/self/ns/net {anchor}"], check=True)
    try:
        _own, others = namespaces(PROC, tmp_path / "no-run-netns")
        held = [ns for ns in others if str(anchor) in ns.paths]
        assert len(held) == 1 and not held[0].pids
        rtnl = _Rtnl(2.0)
        try:
            assert _kinds_in(rtnl, held[0]) == {"veth"}
        finally:
            rtnl.close()
        assert "veth" in link_kinds(proc=PROC, run_netns=tmp_path / "no-run-netns")
    finally:
        subprocess.run(["umount", str(anchor)], check=True)
