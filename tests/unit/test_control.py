"""The control socket: protocol, permissions by SO_PEERCRED, bad messages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd.daemon.control import (
    MAX_MESSAGE,
    Client,
    Connection,
    ControlServer,
    Handler,
    Operation,
    PeerCred,
)
from kmodd.daemon.loop import EventLoop
from kmodd.daemon.operations import OPERATIONS


def every_op(handler: Handler) -> dict[str, Operation]:
    """The daemon's ops with their access rules, all served by ``handler``."""
    return {op: Operation(root, handler) for op, (root, _) in OPERATIONS.items()}


class Harness:
    def __init__(self, path: Path, peercred: Any = None) -> None:
        self.loop = EventLoop()
        self.calls: list[tuple[int, dict[str, Any]]] = []
        kwargs = {"peercred": peercred} if peercred is not None else {}
        self.server = ControlServer(path, self.loop, every_op(self.handle), **kwargs)
        self.server.start()
        self.stop = False
        self.thread = threading.Thread(target=self.loop.run, args=(lambda: self.stop,),
                                       daemon=True)
        self.thread.start()

    def handle(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append((conn.uid, msg))
        if msg["op"] == "why":
            if not isinstance(msg.get("module"), str):
                raise ValueError("'module' must be a module name")
            return {"ok": True, "module": msg["module"]}
        return {"ok": True, "op": msg["op"], "uid": conn.uid}

    def close(self) -> None:
        def halt() -> None:
            self.stop = True
        self.loop.call_soon_threadsafe(halt)
        self.thread.join(5)
        self.server.close()
        self.loop.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Not under pytest's 0700 tmp dir: a child running as nobody must reach it.
    d = Path(tempfile.mkdtemp(prefix="kmodd-ctl-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def harness(sockdir: Path) -> Iterator[Harness]:
    h = Harness(sockdir / "control")
    yield h
    h.close()


def raw(path: Path) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s, s.makefile("rb")


def test_status_round_trip_and_socket_mode(harness: Harness) -> None:
    with Client(harness.server.path, timeout=5) as c:
        assert c.status() == {"ok": True, "op": "status", "uid": 0}
    mode = stat.S_IMODE(os.stat(harness.server.path).st_mode)
    assert mode == 0o666     # anyone may connect; SO_PEERCRED decides the rest


def test_request_id_is_echoed_for_pipelining(harness: Harness) -> None:
    s, f = raw(harness.server.path)
    s.sendall(b'{"op": "status", "id": 1}\n{"op": "list", "id": "two"}\n')
    replies = [json.loads(f.readline()), json.loads(f.readline())]
    assert [(r["op"], r["id"]) for r in replies] == [("status", 1), ("list", "two")]
    s.close()


@pytest.mark.parametrize(("line", "code", "text"), [
    (b"{not json\n", "EINVAL", "malformed JSON"),
    (b"[1, 2]\n", "EINVAL", "must be a JSON object"),
    (b'{"no": "op"}\n', "EINVAL", "missing 'op'"),
    (b'{"op": 7}\n', "EINVAL", "missing 'op'"),
    (b'{"op": "format_disk"}\n', "ENOSYS", "unknown op"),
    (b'{"op": "why", "module": ["x"]}\n', "EINVAL", "bad why request"),
    (b"\xff\xfe\x00garbage\n", "EINVAL", "malformed JSON"),
    (b'{"op": "status"' + b" " * 100 + b"\n", "EINVAL", "malformed JSON"),
])
def test_bad_messages_get_an_error_and_the_connection_survives(
        harness: Harness, line: bytes, code: str, text: str) -> None:
    s, f = raw(harness.server.path)
    s.sendall(line)
    reply = json.loads(f.readline())
    assert reply["ok"] is False and reply["code"] == code and text in reply["error"]
    s.sendall(b'{"op": "status"}\n')
    assert json.loads(f.readline())["ok"] is True
    s.close()


def test_oversized_message_is_refused_and_the_server_lives_on(harness: Harness) -> None:
    s, f = raw(harness.server.path)
    with contextlib.suppress(OSError):    # the server may close while we still send
        s.sendall(b"x" * (MAX_MESSAGE + 10))
    reply = json.loads(f.readline())
    assert reply["code"] == "EMSGSIZE"
    assert f.readline() == b""          # closed after the error
    s.close()
    with Client(harness.server.path, timeout=5) as c:
        assert c.status()["ok"]


def test_non_root_peer_may_read_but_not_load(sockdir: Path) -> None:
    h = Harness(sockdir / "control", peercred=lambda sock: PeerCred(4242, 1000, 1000))
    try:
        with Client(h.server.path, timeout=5) as c:
            for op in ("status", "list", "settle", "monitor"):
                assert c.request({"op": op})["ok"] is True
            for op in ("load", "unload", "reload"):
                reply = c.request({"op": op, "name": "e1000"})
                assert reply["ok"] is False and reply["code"] == "EPERM"
                assert "needs root" in reply["error"]
        assert {m["op"] for _, m in h.calls} == {"status", "list", "settle", "monitor"}
    finally:
        h.close()


def test_real_peer_credentials_of_another_uid(harness: Harness) -> None:
    """A child that drops to uid 65534 is refused by the kernel-reported uid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:           # child: become nobody, ask to load and to read
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            with Client(harness.server.path, timeout=5) as c:
                load = c.request({"op": "load", "name": "dummy"})
                status = c.request({"op": "status"})
            os.write(w, json.dumps([load, status]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    load, status = json.loads(data)
    assert load["ok"] is False and load["code"] == "EPERM"
    assert status["ok"] is True and status["uid"] == 65534
    assert [m["op"] for _, m in harness.calls] == ["status"]
    # And root (this test process) may load.
    with Client(harness.server.path, timeout=5) as c:
        assert c.request({"op": "load", "name": "dummy"})["uid"] == 0


def test_handler_crash_is_an_error_reply(sockdir: Path) -> None:
    h = Harness(sockdir / "control")

    def crash(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    h.server.operations = every_op(crash)
    try:
        with Client(h.server.path, timeout=5) as c:
            reply = c.request({"op": "status"})
            assert reply["ok"] is False and "boom" in reply["error"]
            assert c.request({"op": "status"})["ok"] is False   # still connected
    finally:
        h.close()


def test_try_connect_and_stale_socket(sockdir: Path) -> None:
    path = sockdir / "control"
    assert Client.try_connect(path) is None
    # A socket file left by a crashed daemon is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    h = Harness(path)
    try:
        c = Client.try_connect(path)
        assert c is not None and c.status()["ok"]
        c.close()
        # A live daemon's socket is not stolen.
        other = ControlServer(path, EventLoop(), every_op(h.handle))
        with pytest.raises(RuntimeError, match="already listening"):
            other.start()
    finally:
        h.close()
    assert not path.exists()


def test_peer_that_hangs_up_mid_request(harness: Harness) -> None:
    s, _ = raw(harness.server.path)
    s.sendall(b'{"op": "sta')
    s.close()
    with Client(harness.server.path, timeout=5) as c:
        assert c.status()["ok"]


def test_unprivileged_peers_cannot_crowd_out_root(sockdir: Path) -> None:
    from kmodd.daemon.control import MAX_PER_UID
    uid = {"next": 1000}

    def cred(sock: socket.socket) -> PeerCred:
        return PeerCred(1, uid["next"], uid["next"])

    h = Harness(sockdir / "control", peercred=cred)
    held: list[Client] = []
    try:
        for _ in range(MAX_PER_UID):
            c = Client(h.server.path, timeout=5)
            assert c.status()["ok"]
            held.append(c)
        extra = Client(h.server.path, timeout=5)
        reply = extra.receive()
        assert reply["code"] == "EAGAIN" and "uid 1000" in reply["error"]
        extra.close()
        uid["next"] = 0           # root still gets in
        with Client(h.server.path, timeout=5) as root:
            assert root.status()["uid"] == 0
        held.pop().close()         # a slot frees up for uid 1000 again
        for _ in range(500):       # once the server has seen the hang-up
            if len(h.server.connections) < MAX_PER_UID:
                break
            threading.Event().wait(0.01)
        uid["next"] = 1000
        with Client(h.server.path, timeout=5) as again:
            assert again.status()["uid"] == 1000
    finally:
        for c in held:
            c.close()
        h.close()


def test_deeply_nested_json_is_refused_and_later_lines_still_answered(
        harness: Harness) -> None:
    s, f = raw(harness.server.path)
    # 60,000 levels fit in one message; json's scanner would recurse that deep.
    s.sendall(b"[" * 60000 + b"\n" + b'{"op": "status", "id": 2}\n')
    reply = json.loads(f.readline())
    assert reply["ok"] is False and reply["code"] == "EINVAL"
    assert "nested too deeply" in reply["error"]
    assert json.loads(f.readline()) == {"ok": True, "op": "status", "uid": 0, "id": 2}
    s.close()


def test_a_peer_that_does_not_read_is_paused_not_buffered(sockdir: Path) -> None:
    """Backpressure: the daemon stops reading a peer whose replies pile up,
    keeps at most one window of output for it, and answers everything, in
    order, once the peer reads."""
    from kmodd.daemon.control import OUTPUT_HIGH
    h = Harness(sockdir / "control", peercred=lambda sock: PeerCred(4242, 65534, 65534))
    big = "x" * 8000
    h.server.operations = every_op(lambda conn, msg: {"ok": True, "blob": big})
    count = 2000          # ~16 MB of replies, far beyond any queue the daemon keeps
    s, f = raw(h.server.path)
    s.settimeout(30)
    sender = threading.Thread(target=s.sendall,
                              args=(b"".join(b'{"op":"list","id":%d}\n' % i
                                             for i in range(count)),), daemon=True)
    try:
        sender.start()
        conn = None
        for _ in range(500):
            conn = next(iter(h.server.connections), None)
            if conn is not None and conn.paused:
                break
            threading.Event().wait(0.01)
        assert conn is not None and conn.paused, "never paused"
        threading.Event().wait(0.2)
        assert len(conn.outbuf) <= OUTPUT_HIGH + 8100
        assert not conn.closed
        ids = [json.loads(f.readline())["id"] for _ in range(count)]
        assert ids == list(range(count))
        sender.join(10)
    finally:
        s.close()
        h.close()


def test_priority_readers_first_and_control_work_within_a_budget() -> None:
    """One turn of the loop: the kernel's sources first, then other ready
    handlers only until the turn's budget is spent, in a rotating order."""
    import time as _time
    loop = EventLoop()
    pairs = [socket.socketpair() for _ in range(11)]
    calls: list[str] = []
    try:
        for i, (a, b) in enumerate(pairs[:10]):
            b.send(b"x")          # stays readable: the handler does not read

            def slow(i: int = i) -> None:
                calls.append(f"peer{i}")
                _time.sleep(0.003)
            loop.add_reader(a, slow)
        kernel_a, kernel_b = pairs[10]
        kernel_b.send(b"x")
        loop.add_reader(kernel_a, lambda: calls.append("kernel") or kernel_a.recv(1),
                        priority=True)
        loop.run_once(0)
        assert calls[0] == "kernel"
        assert 2 <= len(calls) <= 4, calls       # 5 ms budget, 3 ms each
        # Saturated: the loop now rests as long as that took, serving only
        # the kernel's sources.
        assert loop._rest_until > _time.monotonic()
        before = len(calls)
        kernel_b.send(b"x")
        loop.run_once(0)
        assert calls[before:] == ["kernel"]
        for _ in range(40):
            loop.run_once(0.05)
        seen = {c for c in calls if c != "kernel"}
        assert seen == {f"peer{i}" for i in range(10)}    # nobody starved
    finally:
        loop.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_root_of_a_user_namespace_is_not_root(harness: Harness) -> None:
    """A container's root (uid 0 inside, 100000 outside) is an unprivileged peer:
    the kernel reports SO_PEERCRED in the daemon's namespace."""
    python = shutil.which("python3", path=os.defpath)
    assert python, "no system python3"
    client = (
        "import json, os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rb')\n"
        "out = {'inside_uid': os.getuid()}\n"
        "for op in ('load', 'status'):\n"
        "    s.sendall(json.dumps({'op': op, 'name': 'dummy'}).encode() + b'\\n')\n"
        "    out[op] = json.loads(f.readline())\n"
        "print(json.dumps(out))\n")
    done = subprocess.run(["unshare", "--user", "--map-root-user", python, "-I", "-c", client,
                           str(harness.server.path)], user=100000, group=100000,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["inside_uid"] == 0
    assert out["load"]["ok"] is False and out["load"]["code"] == "EPERM"
    assert out["status"]["uid"] == 100000
    assert [m["op"] for _, m in harness.calls] == ["status"]


def test_a_user_with_many_connections_gets_one_share_of_the_loop() -> None:
    """Round robin by user: ten busy connections of one uid do not push another
    user's single connection back ten places."""
    loop = EventLoop()
    loop.turn_budget = 0.0          # one handler per turn: the order is what is tested
    pairs = [socket.socketpair() for _ in range(11)]
    served: list[str] = []
    try:
        for i, (a, b) in enumerate(pairs[:10]):
            b.send(b"x")          # stays readable: the handler does not read
            loop.add_reader(a, lambda i=i: served.append(f"nobody{i}"), group=("uid", 65534))
        root_a, root_b = pairs[10]
        root_b.send(b"x")
        loop.add_reader(root_a, lambda: served.append("root"), group=("uid", 0))
        while len(served) < 20:
            loop.run_once(0.05)
        # Every other turn is root's; uid 65534's connections take turns.
        assert served[1::2] == ["root"] * 10, served
        assert sorted(served[0::2]) == [f"nobody{i}" for i in range(10)], served
    finally:
        loop.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_a_peer_being_closed_is_not_read_any_more() -> None:
    """After an oversized message the peer is closed once its replies are out;
    until then nothing more is read from it, so its input cannot pile up."""
    from types import SimpleNamespace
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server = SimpleNamespace(
        reactor=loop, connection_closed=lambda c: None,
        dispatch=lambda c, line: c.send({"ok": True, "blob": "x" * 3000}))
    conn = Connection(server, ours, PeerCred(1, 65534, 65534))  # type: ignore[arg-type]
    loop.add_reader(ours, conn.on_readable)

    def pump(data: bytes) -> None:
        view = memoryview(data)
        while view:
            with contextlib.suppress(BlockingIOError):
                view = view[theirs.send(view):]
            loop.run_once(0)
    try:
        pump(b'{"op":"list"}\n' * 8)            # replies the peer never reads
        for _ in range(5):
            loop.run_once(0)
        assert conn.outbuf and not conn.paused   # some queued, under the high mark
        pump(b"x" * (MAX_MESSAGE + 100))          # no newline: oversized
        for _ in range(5):
            loop.run_once(0)
        assert conn.close_after_flush and not conn.closed
        with contextlib.suppress(BlockingIOError):
            for _ in range(100):
                theirs.send(b"y" * 65536)
                loop.run_once(0)
        assert len(conn.inbuf) <= 65536, len(conn.inbuf)
    finally:
        conn.close()
        theirs.close()
        loop.close()


def test_a_monitor_that_does_not_read_is_dropped_sooner_when_unprivileged() -> None:
    """Streamed events cannot be held back: a non-root monitor 256 KiB behind is
    dropped, root's only at 4 MiB."""
    from types import SimpleNamespace

    from kmodd.daemon.control import MAX_OUTPUT, MAX_OUTPUT_UNPRIVILEGED
    loop = EventLoop()
    server = SimpleNamespace(reactor=loop, connection_closed=lambda c: None)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        conns = []
        for uid, (ours, _) in zip((65534, 0), pairs, strict=True):
            ours.setblocking(False)
            conns.append(Connection(server, ours, PeerCred(1, uid, uid)))  # type: ignore[arg-type]
        event = {"event": "outcome", "blob": "x" * 1000}
        for _ in range((MAX_OUTPUT_UNPRIVILEGED + 2_000_000) // 1000):
            for conn in conns:
                conn.send(event)
        nobody, root = conns
        assert nobody.closed
        assert not root.closed and len(root.outbuf) <= MAX_OUTPUT
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        loop.close()
