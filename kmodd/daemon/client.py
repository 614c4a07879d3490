"""The control socket's client: what kmodctl talks to the daemon with.

Kept apart from the server (``kmodd.daemon.control``) and dependency-free
because ``kmodctl settle``, ``status``, ``why``, ``list`` and ``monitor`` are
started often and must start fast (at boot, ``kmodctl settle`` is what units
wait on, like ``udevadm settle``).  It imports only CPython's C halves of
``socket`` and ``json`` (``_socket``, ``_json``): the Python modules around
them build enums, compile regular expressions and pull in ``selectors``,
which under emulation costs more than the whole exchange.  Other
interpreters get the ordinary modules.  The wire format is the same: one
JSON object per line each way (``kmodd.daemon.control``).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import Any

try:
    import _json
    import _socket as _sock_mod

    class _ScanContext:
        # What json.decoder.JSONDecoder hands the C scanner (json/scanner.py's
        # c_make_scanner): the defaults of json.loads.
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo: dict[str, str] = {}   # the scanner's own cache, cleared per call

        @staticmethod
        def parse_constant(name: str) -> float:
            return {"-Infinity": float("-inf"), "Infinity": float("inf"),
                    "NaN": float("nan")}[name]

    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
    _encode_str: Callable[[str], str] = _json.encode_basestring_ascii

    def _loads(text: str) -> Any:
        # json.decoder.JSONDecoder.raw_decode + decode's trailing-data check.
        end = len(text)
        start = 0
        while start < end and text[start] in " \t\n\r":
            start += 1
        try:
            obj, pos = _scan(text, start)
        except StopIteration as exc:
            raise ValueError(f"Expecting value at char {exc.value}") from None
        finally:
            _ScanContext.memo.clear()
        while pos < end and text[pos] in " \t\n\r":
            pos += 1
        if pos != end:
            raise ValueError(f"Extra data at char {pos}")
        return obj
except ImportError:         # not CPython: the ordinary modules
    import json as _json_mod
    import socket as _sock_mod  # type: ignore[no-redef]

    _loads = _json_mod.loads  # type: ignore[assignment]
    _encode_str = _json_mod.encoder.encode_basestring_ascii

DEFAULT_SOCKET = "/run/kmodd/control"
MAX_OUTPUT = 4 * 1024 * 1024     # longest reply line read (control.MAX_OUTPUT)


def dumps(obj: object, indent: int | None = None, sort_keys: bool = False,
          _level: int = 0) -> str:
    """``json.dumps(obj, indent=..., sort_keys=...)`` for what the protocol carries
    (dicts with string keys, lists, strings, numbers, booleans, None), same text."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return _encode_str(obj)
    if isinstance(obj, int):
        return int.__repr__(obj)
    if isinstance(obj, float):
        if obj != obj:
            return "NaN"
        if obj in (float("inf"), float("-inf")):
            return "Infinity" if obj > 0 else "-Infinity"
        return float.__repr__(obj)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = sorted(obj.items()) if sort_keys else list(obj.items())
        parts = [f"{_encode_str(str(k))}: {dumps(v, indent, sort_keys, _level + 1)}"
                 for k, v in items]
        return _join("{", parts, "}", indent, _level)
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        return _join("[", [dumps(v, indent, sort_keys, _level + 1) for v in obj], "]", indent,
                     _level)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _join(open_: str, parts: list[str], close: str, indent: int | None, level: int) -> str:
    if indent is None:
        return open_ + ", ".join(parts) + close
    inner = "\n" + " " * (indent * (level + 1))
    return open_ + inner + ("," + inner).join(parts) + "\n" + " " * (indent * level) + close


class ControlError(Exception):
    """The daemon answered with ok=false, or the connection broke."""

    def __init__(self, message: str, code: str = "EIO", reply: dict[str, Any] | None = None
                 ) -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply or {}


class Client:
    """Blocking client for kmodctl (one request at a time, or a monitor stream)."""

    def __init__(self, path: str | Path = DEFAULT_SOCKET, *, timeout: float | None = None
                 ) -> None:
        self.path = str(path)
        self.sock = _sock_mod.socket(_sock_mod.AF_UNIX,
                                     _sock_mod.SOCK_STREAM | _sock_mod.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except BaseException:
            self.sock.close()
            raise
        self._buf = b""

    @classmethod
    def try_connect(cls, path: str | Path = DEFAULT_SOCKET, *, timeout: float | None = 5.0
                    ) -> Client | None:
        """A client when a daemon listens at ``path``; None otherwise (load directly)."""
        try:
            return cls(path, timeout=timeout)
        except OSError:
            return None

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(dumps(msg).encode() + b"\n")

    def _readline(self) -> bytes:
        # A line of at most MAX_OUTPUT bytes, as file.readline(MAX_OUTPUT)
        # returns it (a longer one is cut there and then fails to parse).
        while True:
            nl = self._buf.find(b"\n", 0, MAX_OUTPUT)
            if nl >= 0:
                line, self._buf = self._buf[:nl + 1], self._buf[nl + 1:]
                return line
            if len(self._buf) >= MAX_OUTPUT:
                line, self._buf = self._buf[:MAX_OUTPUT], self._buf[MAX_OUTPUT:]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self._buf = self._buf, b""
                return line
            self._buf += chunk

    def receive(self) -> dict[str, Any]:
        line = self._readline()
        if not line:
            raise ControlError("the daemon closed the connection")
        try:
            obj = _loads(line.decode())
        except ValueError as exc:       # UnicodeDecodeError is one
            raise ControlError(f"bad reply from the daemon: {exc}") from None
        if not isinstance(obj, dict):
            raise ControlError("bad reply from the daemon: not an object")
        return obj

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return its raw reply (``ok`` may be false)."""
        self.send(msg)
        return self.receive()

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Like :meth:`request` but raise ControlError when ``ok`` is false."""
        reply = self.request({"op": op, **fields})
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "request failed")),
                               str(reply.get("code", "EIO")), reply)
        return reply

    def stream(self, op: str = "monitor", **fields: Any) -> Iterator[dict[str, Any]]:
        """The first reply, then every event line until the daemon closes."""
        first = self.call(op, **fields)
        yield first
        while True:
            try:
                yield self.receive()
            except ControlError:
                return

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def list_modules(self) -> dict[str, Any]:
        return self.call("list")

    def why(self, module: str) -> dict[str, Any]:
        return self.call("why", module=module)

    def settle(self, timeout: float | None = None) -> dict[str, Any]:
        return self.call("settle", timeout=timeout)

    def reload(self) -> dict[str, Any]:
        return self.call("reload")

    def load(self, name: str, options: str = "", *, kind: str = "admin",
             requested_by: str = "") -> dict[str, Any]:
        """Ask the daemon to load; the reply carries the outcome (``status``...)."""
        return self.request({"op": "load", "name": name, "options": options, "kind": kind,
                             "requested_by": requested_by})

    def unload(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return self.request({"op": "unload", "name": name, "force": force})

    def close(self) -> None:
        try:  # noqa: SIM105 (contextlib is not imported here: start-up cost)
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
