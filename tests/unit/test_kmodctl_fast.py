"""kmodctl's socket-only sub-commands start in a few imports, and say the same.

``settle``, ``status``, ``why``, ``list`` and ``monitor`` run against a fake
daemon (a unix socket answering canned replies) in a fresh interpreter
without site (``-I -S``, as close to a bare start as it gets); each must
answer correctly and leave argparse, json, socket, typing, the server side
and the resolution engine unimported.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd.cli import ctl_daemon
from kmodd.daemon.client import Client, ControlError, dumps

ROOT = Path(__file__).resolve().parents[2]

STATUS = {"ok": True, "version": "0.1.0", "pid": 42, "uptime": 12.5, "coldplug": "done",
          "settled": True, "loading": 0, "workers": 12, "pending": 0, "submitted": 3,
          "outcomes": {"loaded": 2, "unresolved": 1}, "loaded_by_kmodd": 2, "backoff": 0,
          "autoclean": {"interval": 0}}
WHY = {"ok": True, "module": "e1000", "loaded_by_kmodd": True, "loaded_at": 0,
       "role": "target", "kind": "coldplug", "key": "pci:v00008086d0000100E",
       "devpath": "/devices/pci0000:00/0000:00:03.0", "requested_by": "coldplug"}
LIST = {"ok": True, "modules": [{"name": "e1000", "state": "live", "refcount": 0,
                                 "loaded_by_kmodd": True, "loaded_at": 0, "idle_since": None,
                                 "why": {"kind": "coldplug", "key": "pci:v00008086d0000100E"}}]}
EVENT = {"event": "outcome", "status": "loaded", "modules": ["e1000"], "time": 0,
         "request": {"kind": "modalias", "key": "pci:x", "devpath": None}, "error": None}

# Whatever else these commands import is start-up time for nothing.
FORBIDDEN = ("argparse", "json", "socket", "typing", "re", "dataclasses", "logging",
             "pathlib", "selectors", "importlib", "contextlib", "enum", "collections",
             "kmodd.cli.common", "kmodd.daemon.control", "kmodd.resolution", "kmodd.kernel",
             "pyudev", "elftools", "systemd")
ALLOWED_KMODD = {"kmodd", "kmodd.cli", "kmodd.cli.kmodctl", "kmodd.cli.ctl_daemon",
                 "kmodd.daemon", "kmodd.daemon.client"}


class FakeDaemon:
    """Answers one request per connection line with a canned reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    msg = json.loads(line)
                    self.requests.append(msg)
                    op = msg["op"]
                    reply: dict[str, Any] = {
                        "status": STATUS, "why": WHY, "list": LIST,
                        "settle": {"ok": True, "settled": True},
                    }.get(op, {"ok": True})
                    f.write(json.dumps(reply).encode() + b"\n")
                    if op == "monitor":
                        f.write(json.dumps(EVENT).encode() + b"\n")
                    f.flush()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(tmp_path / "control")
    yield d
    d.close()


def run_bare(argv: list[str]) -> tuple[int, str, str, set[str]]:
    """kmodctl in a fresh interpreter with no site; (rc, stdout, stderr, modules)."""
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from kmodd.cli.kmodctl import main; rc = main(sys.argv[1:]); sys.stdout.flush(); "
            "sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)) + '\\n'); "
            "raise SystemExit(rc)")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT), *argv],
                         capture_output=True, text=True, timeout=60, check=False)
    err, marker, mods = res.stderr.rpartition("\nMODULES ")
    if not marker:                  # argparse exited (--help, a usage error)
        return res.returncode, res.stdout, res.stderr, set()
    return res.returncode, res.stdout, err, set(mods.split())


def assert_cheap(modules: set[str]) -> None:
    kmodd = {m for m in modules if m == "kmodd" or m.startswith("kmodd.")}
    assert kmodd <= ALLOWED_KMODD, kmodd - ALLOWED_KMODD
    heavy = sorted(m for m in modules for f in FORBIDDEN if m == f or m.startswith(f + "."))
    assert not heavy, heavy


@pytest.mark.parametrize(("argv", "expect"), [
    (["settle", "--timeout", "5"], ""),
    (["status"], "coldplug:  done; settled: yes"),
    (["why", "e1000"], "request:      coldplug pci:v00008086d0000100E"),
    (["list"], "e1000"),
    (["monitor", "-n", "1"], "loaded      e1000"),
    (["status", "--json"], '"pid": 42'),
])
def test_socket_commands_import_nothing_else(daemon: FakeDaemon, argv: list[str],
                                             expect: str) -> None:
    rc, out, err, modules = run_bare([*argv, "--socket", str(daemon.path)])
    assert rc == 0, err
    assert expect in out
    assert_cheap(modules)
    op = argv[0]
    assert any(r["op"] == op for r in daemon.requests)
    if op == "settle":
        assert daemon.requests[-1] == {"op": "settle", "timeout": 5.0}
    if op == "why":
        assert daemon.requests[-1] == {"op": "why", "module": "e1000"}


def test_json_output_is_what_json_module_prints(daemon: FakeDaemon) -> None:
    rc, out, err, _ = run_bare(["status", "--json", "--socket", str(daemon.path)])
    assert rc == 0, err
    assert out == json.dumps(STATUS, indent=2, sort_keys=True) + "\n"


def test_no_daemon_is_an_error_not_a_crash(tmp_path: Path) -> None:
    rc, _, err, modules = run_bare(["settle", "--socket", str(tmp_path / "none")])
    assert rc == 1 and "kmodd is not running" in err
    assert_cheap(modules)


def test_help_and_errors_still_go_through_argparse(daemon: FakeDaemon) -> None:
    rc, out, _, _ = run_bare(["settle", "--help"])      # argparse exits: no module list
    assert rc == 0 and "--timeout" in out
    rc, _, err, _ = run_bare(["settle", "--timeout", "soon", "--socket", str(daemon.path)])
    assert rc == 2 and "invalid float value" in err
    rc, _, err, _ = run_bare(["why", "--socket", str(daemon.path)])
    assert rc == 2 and "module" in err
    # An abbreviation argparse accepts works too, the slow way.
    rc, _, err, modules = run_bare(["settle", "--time", "3", "--socket", str(daemon.path)])
    assert rc == 0, err
    assert "argparse" in modules and daemon.requests[-1]["timeout"] == 3.0


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json", "--prometheus"], ["status", "--socket", "/x/y"],
    ["settle", "-t", "0"], ["settle", "--timeout", "2.5", "--json"], ["why", "e1000"],
    ["why", "--", "-odd"], ["why", "--json", "e1000", "--socket", "/s"],
    ["monitor", "-n", "3", "--json"], ["list", "--json"], ["reload"],
])
def test_parse_fast_agrees_with_argparse(argv: list[str]) -> None:
    command, rest = argv[0], argv[1:]
    fast = ctl_daemon.parse_fast(command, rest)
    assert fast is not None
    parser = argparse.ArgumentParser()
    ctl_daemon.add_arguments(parser, command)
    slow = parser.parse_args(rest)
    assert {k: v for k, v in vars(fast).items() if k != "command"} == vars(slow)


@pytest.mark.parametrize("argv", [
    ["status", "-h"], ["status", "--sock", "/x"], ["settle", "-t5"], ["settle", "-t"],
    ["settle", "--timeout", "x"], ["why"], ["why", "a", "b"], ["list", "extra"],
    ["monitor", "-n", "-1"], ["status", "--socket=/x"], ["list", "--prometheus"],
])
def test_parse_fast_leaves_the_unusual_to_argparse(argv: list[str]) -> None:
    assert ctl_daemon.parse_fast(argv[0], argv[1:]) is None


@pytest.mark.parametrize("obj", [
    {"b": 1, "a": [1, 2.5, None, True, False, "é\"\n\x00"], "c": {}, "d": [], "e": {"x": -0.0}},
    [float("inf"), float("-inf"), 1e100, -3, "\u2603"], "plain", 7, None,
    {"nested": [{"z": [[]], "y": {"k": [1, {"q": "r"}]}}]},
])
@pytest.mark.parametrize("indent", [None, 2])
def test_dumps_matches_json(obj: object, indent: int | None) -> None:
    for sort_keys in (False, True):
        assert dumps(obj, indent=indent, sort_keys=sort_keys) == \
            json.dumps(obj, indent=indent, sort_keys=sort_keys)
    assert dumps(float("nan")) == json.dumps(float("nan"))


def test_client_reads_replies_split_and_joined(tmp_path: Path) -> None:
    """Replies arriving in pieces or several in one read; NaN; a bad line; EOF."""
    path = tmp_path / "s"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1000)
            conn.sendall(b'{"ok": true, "a"')
            conn.sendall(b': NaN}\n {"ok": true, "n": 1}\n')
            conn.sendall(b'[1]\nnot json\n')
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with Client(path, timeout=10) as c:
        first = c.call("status")
        assert first["ok"] and math.isnan(first["a"])
        assert c.receive() == {"ok": True, "n": 1}
        with pytest.raises(ControlError, match="not an object"):
            c.receive()
        with pytest.raises(ControlError, match="bad reply"):
            c.receive()
        with pytest.raises(ControlError, match="closed"):
            c.receive()
    t.join(10)
    srv.close()


def test_client_timeout_is_timeouterror(tmp_path: Path) -> None:
    path = tmp_path / "s"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    with Client(path, timeout=0.2) as c, pytest.raises(TimeoutError):
        c.call("status")
    srv.close()
    assert Client.try_connect(tmp_path / "nothing", timeout=1) is None


def test_client_and_server_agree_on_the_default_socket() -> None:
    from kmodd.daemon import client, control
    assert client.DEFAULT_SOCKET == control.DEFAULT_SOCKET
