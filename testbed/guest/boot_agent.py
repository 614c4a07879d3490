#!/usr/bin/python3
"""The boot test bed's agent: runs the host's commands, answers on a serial port.

Installed in the boot image as /usr/local/sbin/testbed-agent and started by
testbed-agent.service (``testbed-agent /dev/ttyS1``).  One JSON object per line
each way; the port is put in raw mode, so only ``\\n`` ends a line.

    host -> guest  {"id": N, "cmd": "shell text", "timeout": S|null, "input": b64|null}
                   {"hello": 1}                          (answered by a "ready" line)
    guest -> host  {"ready": BOOT_ID, "pid": PID}        (at start and on hello)
                   {"id": N, "rc": RC, "out": b64, "err": b64, "timed_out": bool}

Commands run concurrently, each as ``/bin/sh -c`` in its own session; at its
timeout the whole process group is killed.  Lines that do not parse (noise from
a reboot) are ignored.  Only the Python standard library is used.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import tty
import zlib

ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "HOME": "/root",
}

_write_lock = threading.Lock()


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return fh.read().strip()


def _send(fd: int, obj: dict[str, object]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    with _write_lock:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def _pack(data: bytes) -> str:
    # zlib first: journal and sysfs listings compress well, and the port is slow.
    return base64.b64encode(zlib.compress(data, 6)).decode()


def _run(fd: int, req: dict[str, object]) -> None:
    ident = req.get("id")
    timeout = req.get("timeout")
    stdin = base64.b64decode(str(req["input"])) if req.get("input") else b""
    timed_out = False
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", str(req.get("cmd", ""))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ENV, cwd="/root",
                                start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=float(str(timeout)) if timeout else None)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        rc = proc.returncode
    except Exception as exc:
        rc, out, err = 126, b"", f"agent: {exc!r}\n".encode()
    _send(fd, {"id": ident, "rc": rc, "out": _pack(out), "err": _pack(err),
               "timed_out": timed_out})


def main() -> int:
    port = sys.argv[1] if len(sys.argv) > 1 else "/dev/ttyS1"
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[4] = attrs[5] = termios.B115200
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    boot_id = _boot_id()
    _send(fd, {"ready": boot_id, "pid": os.getpid()})
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
            except ValueError:
                continue
            if not isinstance(req, dict):
                continue
            if "hello" in req:
                _send(fd, {"ready": boot_id, "pid": os.getpid()})
            elif "id" in req:
                threading.Thread(target=_run, args=(fd, req), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
