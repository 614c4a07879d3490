"""Hostile control-socket peers, for the flood test and the load benchmark.

:class:`Flood` forks its clients before anything else runs in them (no
thread of the parent is running Python code in a child), makes each one
uid 65534 when started as root (the kernel then reports that uid through
``SO_PEERCRED``: no injection), and holds them until :meth:`Flood.start`.
Each client connects (again and again if the daemon drops it) and pipelines
one request line as fast as the socket takes it; a "reader" also reads and
discards every reply, a "sleeper" never reads one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

NOBODY = 65534


def _client(path: str, line: bytes, read: bool, uid: int, go: int) -> None:
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.read(go, 1)
    batch = line * max(1, 65536 // len(line))
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        except OSError:
            time.sleep(0.01)
            continue
        if read:
            def drain(s: socket.socket = sock) -> None:
                with contextlib.suppress(OSError):
                    while s.recv(1 << 16):
                        pass
            threading.Thread(target=drain, daemon=True).start()
        try:
            while True:
                sock.sendall(batch)
        except OSError:
            sock.close()
            time.sleep(0.01)


class Flood:
    """``clients`` forked peers of ``path``; half read their replies, half never do."""

    def __init__(self, path: str | Path, clients: int = 32, *,
                 line: bytes = b'{"op":"list"}\n', readers: int | None = None,
                 uid: int = NOBODY) -> None:
        self.pids: list[int] = []
        readers = clients // 2 if readers is None else readers
        go_r, self._go = os.pipe()
        for i in range(clients):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(self._go)
                    _client(str(path), line, i < readers, uid, go_r)
                finally:
                    os._exit(0)
            self.pids.append(pid)
        os.close(go_r)

    def start(self) -> None:
        os.write(self._go, b"x" * len(self.pids))

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids = []
        with contextlib.suppress(OSError):
            os.close(self._go)


def rss_kb(pid: int | None = None) -> int:
    """VmRSS of ``pid`` (this process by default), in KiB."""
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for row in status:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    return 0


class RssPeak(threading.Thread):
    """Samples this process's VmRSS every ``interval`` seconds; ``peak`` in KiB."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, rss_kb())
            self.halt.wait(self.interval)

    def stop(self) -> int:
        self.halt.set()
        self.join(5)
        self.peak = max(self.peak, rss_kb())
        return self.peak
