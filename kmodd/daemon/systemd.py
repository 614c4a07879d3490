"""systemd integration of the daemon: sd_notify and the watchdog interval.

Everything here is cheap to import: ``socket`` and ``os`` only.  sd_notify
is a single datagram, so it is written here rather than imported from
``systemd.daemon`` (same wire format, no import cost).  Logging with journal
fields lives in ``kmodd.journal``.
"""

from __future__ import annotations

import os
import socket
import threading

_notify_lock = threading.Lock()
_notify_socket: socket.socket | None = None
_notify_address: str | bytes | None = None


def _notify_target() -> str | bytes | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address[0] == "@":
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + address[1:].encode()
    if address[0] != "/":
        return None  # vsock and other forms: not used for system services
    return address


def notify(**fields: object) -> bool:
    """Send ``KEY=value`` lines to the service manager (``notify(READY=1, STATUS="...")``).

    Returns True when a message was sent, False when not under a service
    manager (no ``NOTIFY_SOCKET``) or the send failed, a full queue included
    (it never waits for the manager to read).  Never raises: a lost status
    line must not take the daemon down.
    """
    global _notify_socket, _notify_address
    address = _notify_target()
    if address is None or not fields:
        return False
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            text = text.replace("\n", " ")  # one line per field in the protocol
        lines.append(f"{key.upper()}={text}")
    payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
    with _notify_lock:
        try:
            if _notify_socket is None or _notify_address != address:
                if _notify_socket is not None:
                    _notify_socket.close()
                _notify_socket = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                _notify_address = address
            # Never blocks: a manager that stopped reading (a full receive
            # queue, max_dgram_qlen) must not wedge the daemon's event loop.
            # sd_notify(3) waits there; this caller is the loop itself.
            _notify_socket.sendto(payload, socket.MSG_DONTWAIT, address)
        except OSError:     # BlockingIOError (queue full) included: the caller may retry
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when off.

    Like sd_watchdog_enabled(): ``WATCHDOG_PID``, when set, must be our pid,
    so a child that inherited the environment does not ping for us.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000
