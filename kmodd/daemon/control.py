"""The control socket: newline-delimited JSON over a unix stream socket.

Each request is one JSON object on one line with an ``op``; each reply is
one object with ``ok`` (and ``error`` when false).  ``monitor`` keeps the
connection and streams ``{"event": "outcome", ...}`` lines.  An optional
``id`` in a request is echoed in its reply, so requests may be pipelined.

Peers are identified by ``SO_PEERCRED``: uid 0 may load, unload and reload;
anyone may read (status, list, why, monitor, settle).  The socket itself is
world-connectable for that reason.  Malformed or oversized messages get an
error reply; they never reach the daemon's logic, let alone crash it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from kmodd.daemon.client import (  # noqa: F401 (re-exported: the client used to live here)
    Client,
    ControlError,
)
from kmodd.record import dataclass
from kmodd.root import run_path

LOG = logging.getLogger(__name__)

# kmodd.daemon.client spells it out (it imports nothing of kmodd); a test holds both equal.
DEFAULT_SOCKET = run_path("control")
MAX_MESSAGE = 64 * 1024          # one request line
# Backpressure: a peer with this much output queued is not read from (its
# socket is not even polled for input) until it has read most of it, so a
# peer that pipelines requests and never reads holds one window, not a heap.
OUTPUT_HIGH = 64 * 1024
OUTPUT_LOW = 16 * 1024
# Streamed events (monitor) are not requests and cannot be held back: a
# monitor this far behind is dropped.
MAX_OUTPUT = 4 * 1024 * 1024
MAX_OUTPUT_UNPRIVILEGED = 256 * 1024
# Fairness: at most this many requests, or this much time, per peer per
# turn of the event loop; the rest waits for the next turn (EventLoop).
PEER_TURN_REQUESTS = 16
PEER_TURN_SECONDS = 0.001

# Connections: unprivileged peers get a share each and together, so they can
# never lock root's kmodctl out; root always finds room up to the hard cap.
MAX_CONNECTIONS = 512
MAX_UNPRIVILEGED = 256
MAX_PER_UID = 32



@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def peer_credentials(sock: socket.socket) -> PeerCred:
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                        socket.SO_PEERCRED, size))
    return PeerCred(pid, uid, gid)


class Reactor(Protocol):
    """The part of the service's event loop the server uses."""

    def add_reader(self, fileobj: Any, callback: Callable[[], None], *,
                   group: object = None) -> None: ...
    def remove_reader(self, fileobj: Any) -> None: ...
    def set_writer(self, fileobj: Any, callback: Callable[[], None] | None) -> None: ...
    def remove(self, fileobj: Any) -> None: ...
    def call_soon(self, fn: Callable[[], None], *, group: object = None) -> None: ...


def error_reply(message: str, code: str = "EINVAL") -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


class Connection:
    """One peer.  Used from the event loop thread only."""

    def __init__(self, server: ControlServer, sock: socket.socket, cred: PeerCred) -> None:
        self.server = server
        self.sock = sock
        self.cred = cred
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False
        self.close_after_flush = False
        self.monitoring = False
        self.on_close: list[Callable[[Connection], None]] = []
        self.paused = False       # not reading: too much output queued
        self.queued = False       # complete lines wait for a coming turn
        self.max_output = MAX_OUTPUT if cred.is_root else MAX_OUTPUT_UNPRIVILEGED
        # The loop's fairness unit: one share per user, however many connections.
        self.group = ("uid", cred.uid)

    @property
    def uid(self) -> int:
        return self.cred.uid

    def describe(self) -> str:
        return f"pid={self.cred.pid} uid={self.cred.uid}"

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            line = json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            line = json.dumps(error_reply(f"internal error encoding reply: {exc}",
                                          "EIO")).encode() + b"\n"
        if len(self.outbuf) + len(line) > self.max_output:
            # A peer that does not read must not make the daemon's memory grow.
            LOG.info("control: dropping %s, it is not reading its replies", self.describe())
            self.close()
            return
        self.outbuf += line
        self._flush()

    def reply(self, request: dict[str, Any] | None, payload: dict[str, Any]) -> None:
        if request is not None and "id" in request and isinstance(request["id"], str | int):
            payload = {**payload, "id": request["id"]}
        self.send(payload)

    def _flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.outbuf[:n]
        if self.closed:
            return
        if self.outbuf:
            self.server.reactor.set_writer(self.sock, self._flush)
        else:
            self.server.reactor.set_writer(self.sock, None)
            if self.close_after_flush:
                self.close()
                return
        if self.paused and len(self.outbuf) <= OUTPUT_LOW and not self.close_after_flush:
            self.paused = False
            self.server.reactor.add_reader(self.sock, self.on_readable, group=self.group)
            self._schedule()

    def _pause(self) -> None:
        # Level-triggered polling of a socket we will not read would spin:
        # stop polling it for input until the output drains (_flush).
        if not self.paused:
            self.paused = True
            self.server.reactor.remove_reader(self.sock)

    def _schedule(self) -> None:
        if not self.queued and not self.closed and b"\n" in self.inbuf:
            self.queued = True
            self.server.reactor.call_soon(self._serve, group=self.group)

    def on_readable(self) -> None:
        if self.queued or self.paused:
            return             # lines already read wait for their turn first
        if self.close_after_flush:
            self._pause()      # nothing more is read from a peer being closed
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.inbuf += data
        self._serve()

    def _serve(self) -> None:
        """Answer the complete lines read so far, within this peer's share of the turn."""
        self.queued = False
        started = time.monotonic()
        served = 0
        while not self.closed and not self.close_after_flush:
            if len(self.outbuf) >= OUTPUT_HIGH:
                self._pause()
                return
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_MESSAGE:
                    self.send(error_reply(f"message longer than {MAX_MESSAGE} bytes",
                                          "EMSGSIZE"))
                    self.inbuf.clear()
                    self.close_after_flush = True
                    self._flush()
                return
            if served >= PEER_TURN_REQUESTS or (
                    served and time.monotonic() - started > PEER_TURN_SECONDS):
                self._schedule()
                return
            line = bytes(self.inbuf[:nl])
            del self.inbuf[:nl + 1]
            served += 1
            if len(line) > MAX_MESSAGE:
                self.send(error_reply(f"message longer than {MAX_MESSAGE} bytes", "EMSGSIZE"))
                continue
            if line.strip():
                try:
                    self.server.dispatch(self, line)
                except Exception:
                    # Never leave the lines behind it unanswered.
                    LOG.exception("control: request from %s failed", self.describe())
                    self.send(error_reply("internal error", "EIO"))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.server.reactor.remove(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.server.connection_closed(self)
        for cb in self.on_close:
            try:
                cb(self)
            except Exception:
                LOG.exception("control: close callback failed")


Handler = Callable[[Connection, dict[str, Any]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Operation:
    """One control op: who may call it and what serves it.

    ``handler(conn, msg)`` returns the reply, or None when it will reply later
    with ``conn.reply(msg, ...)`` (load, settle) or stream (monitor).
    """

    needs_root: bool
    handler: Handler


class ControlServer:
    """Accepts peers, parses lines, checks permissions against ``operations``
    (kmodd.daemon.operations.OPERATIONS) and hands each request to its handler."""

    def __init__(self, path: str | Path, reactor: Reactor,
                 operations: Mapping[str, Operation], *,
                 peercred: Callable[[socket.socket], PeerCred] = peer_credentials,
                 mode: int = 0o666) -> None:
        self.path = Path(path)
        self.reactor = reactor
        self.operations = operations
        self.peercred = peercred
        self.mode = mode
        self.sock: socket.socket | None = None
        self.connections: set[Connection] = set()
        self._paused = False

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if Client.try_connect(self.path, timeout=1.0) is not None:
                raise RuntimeError(f"{self.path}: another kmodd is already listening")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            # Everyone may connect; SO_PEERCRED decides what they may do.
            os.chmod(self.path, self.mode)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reactor.add_reader(sock, self._accept)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def stop_accepting(self) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(Exception):
            self.reactor.remove(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.sock = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close()

    def _accept(self) -> None:
        if self.sock is None:
            return
        for _ in range(64):
            try:
                peer, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors: the socket stays readable, so stop
                # watching it (no busy loop) until a connection closes.
                LOG.warning("control: cannot accept: %s", exc)
                self.reactor.remove(self.sock)
                self._paused = True
                return
            peer.setblocking(False)
            try:
                cred = self.peercred(peer)
            except Exception as exc:
                LOG.warning("control: no peer credentials (%s); dropping peer", exc)
                peer.close()
                continue
            refusal = self._over_limit(cred)
            if refusal is not None:
                with contextlib.suppress(OSError):
                    peer.send(json.dumps(error_reply(refusal, "EAGAIN")).encode() + b"\n")
                peer.close()
                continue
            conn = Connection(self, peer, cred)
            self.connections.add(conn)
            self.reactor.add_reader(peer, conn.on_readable, group=conn.group)

    def _over_limit(self, cred: PeerCred) -> str | None:
        total = len(self.connections)
        if total >= MAX_CONNECTIONS:
            return "too many connections"
        if cred.is_root:
            return None
        unprivileged = [c for c in self.connections if not c.cred.is_root]
        if len(unprivileged) >= MAX_UNPRIVILEGED:
            return "too many connections from unprivileged users"
        if sum(1 for c in unprivileged if c.cred.uid == cred.uid) >= MAX_PER_UID:
            return f"too many connections from uid {cred.uid}"
        return None

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._paused and self.sock is not None:
            self._paused = False
            self.reactor.add_reader(self.sock, self._accept)

    def dispatch(self, conn: Connection, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            conn.send(error_reply(f"malformed JSON: {exc}"))
            return
        except RecursionError:
            # json's C scanner recurses once per nesting level: 60,000 '['
            # fit in one message.  Requests are flat objects anyway.
            conn.send(error_reply("malformed JSON: nested too deeply"))
            return
        if not isinstance(msg, dict):
            conn.send(error_reply("a request must be a JSON object"))
            return
        op = msg.get("op")
        if not isinstance(op, str):
            conn.reply(msg, error_reply("missing 'op'"))
            return
        operation = self.operations.get(op)
        if operation is None:
            conn.reply(msg, error_reply(f"unknown op {op!r}", "ENOSYS"))
            return
        if operation.needs_root and not conn.cred.is_root:
            LOG.info("control: %s refused to %s", op, conn.describe())
            conn.reply(msg, error_reply(f"{op} needs root (peer uid {conn.cred.uid})", "EPERM"))
            return
        try:
            reply = operation.handler(conn, msg)
        except (KeyError, TypeError, ValueError) as exc:
            reply = error_reply(f"bad {op} request: {exc}")
        except Exception as exc:
            LOG.exception("control: %s failed", op)
            reply = error_reply(f"{op} failed: {exc}", "EIO")
        if reply is not None:
            conn.reply(msg, reply)


# --- client ------------------------------------------------------------------
# The client lives in kmodd.daemon.client (dependency-free, for kmodctl's
# start-up); these names stay importable from here.
