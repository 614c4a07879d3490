"""A minimal QMP client (QEMU Machine Protocol) over a Unix socket.

Shared by the busybox test bed (``testbed.vm``) and the boot test bed
(``testbed.boot``).  One client per QEMU; calls from several threads are
serialised.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class QMPError(RuntimeError):
    def __init__(self, execute: str, error: Mapping[str, Any]) -> None:
        self.error = dict(error)
        super().__init__(f"QMP {execute} failed: {error.get('class')}: {error.get('desc')}")


class QMPClient:
    """Connects on first use, negotiates capabilities, keeps events in ``events``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(str(self.path))
            self._sock = sock
            self._buf = b""
            greeting = self._recv()
            if "QMP" not in greeting:
                raise RuntimeError(f"unexpected QMP greeting {greeting}")
            self.send("qmp_capabilities", {})
        return self._sock

    def _recv(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, execute: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Send one command (connected, lock held) and return its ``return`` member."""
        assert self._sock is not None
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(execute, reply["error"])
            ret = reply.get("return", {})
            return ret if isinstance(ret, dict) else {"return": ret}

    def execute(self, execute: str, **arguments: Any) -> dict[str, Any]:
        with self.lock:
            self.connect()
            return self.send(execute, arguments)

    def settimeout(self, seconds: float) -> None:
        if self._sock is not None:
            self._sock.settimeout(seconds)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
