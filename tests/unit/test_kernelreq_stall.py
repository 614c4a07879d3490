"""The request FIFO can never be lost silently: a line whose handling fails
does not take the lines read with it, and the periodic check finds a FIFO
removed, a descriptor closed behind the source's back, or requests left
unread because the loop stopped watching it, repairs it and says so."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from kmodd.daemon.kernelreq import KernelRequestSource
from kmodd.daemon.requests import Outcome, Request
from kmodd.daemon.service import Service
from kmodd.daemon.settings import Settings
from tests.unit.daemon_fakes import GatedLoader, GraphResolver, sim_kernel


class Recorder:
    """submit() answering every request with "loaded" at once."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def submit(self, request: Request) -> Future[Outcome]:
        self.keys.append(request.key)
        fut: Future[Outcome] = Future()
        fut.set_result(Outcome(request=request, status="loaded", modules=(request.key,)))
        return fut


@pytest.fixture
def source(run_dir: Path) -> Iterator[tuple[KernelRequestSource, Recorder]]:
    rec = Recorder()
    src = KernelRequestSource(rec.submit, run_dir / "request", free_orphans=False)
    yield src, rec
    src.close()


def reply_fifo(run_dir: Path, n: int) -> tuple[str, int]:
    """A helper's reply FIFO (the fifo mode), its read end held open."""
    path = run_dir / f"reply.{n}"
    os.mkfifo(path, 0o600)
    return str(path), os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def read_reply(fd: int, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            data += os.read(fd, 4096)
        if data.count(b"\n") >= 2:
            return data
        time.sleep(0.01)
    return data


def write_request(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def test_a_failing_line_does_not_lose_the_lines_read_with_it(
        source: tuple[KernelRequestSource, Recorder], run_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    src, rec = source
    first, fd1 = reply_fifo(run_dir, 101)
    second, fd2 = reply_fifo(run_dir, 102)
    real_open = src._open_reply

    def open_reply(path: str) -> int | None:
        if path == first:
            raise RuntimeError("a bug in serving one line")
        return real_open(path)

    src._open_reply = open_reply  # type: ignore[method-assign]
    # Two helpers' lines arrive in one read.
    write_request(run_dir / "request", f"dummy {first}\nbridge {second}\n".encode())
    with caplog.at_level(logging.ERROR):
        src.on_readable()
    assert rec.keys == ["bridge"]
    assert read_reply(fd2) == b"+\n0 loaded bridge\n"
    assert any("serving" in r.getMessage() for r in caplog.records)
    os.close(fd1)
    os.close(fd2)


def test_check_makes_a_new_fifo_when_the_path_was_removed(
        source: tuple[KernelRequestSource, Recorder], run_dir: Path) -> None:
    src, rec = source
    assert src.check() is None
    # Written into the FIFO just before its name went: still served.
    path, fd = reply_fifo(run_dir, 201)
    write_request(run_dir / "request", f"dummy {path}\n".encode())
    (run_dir / "request").unlink()
    problem = src.check()
    assert problem is not None and "removed or replaced" in problem
    assert rec.keys == ["dummy"] and read_reply(fd) == b"+\n0 loaded dummy\n"
    # A new FIFO under the name, read by the source.
    path2, fd2 = reply_fifo(run_dir, 202)
    write_request(run_dir / "request", f"minix {path2}\n".encode())
    src.on_readable()
    assert rec.keys == ["dummy", "minix"] and read_reply(fd2) == b"+\n0 loaded minix\n"
    assert src.check() is None
    os.close(fd)
    os.close(fd2)


def test_check_reopens_when_the_descriptor_was_closed_behind_its_back(
        source: tuple[KernelRequestSource, Recorder], run_dir: Path) -> None:
    src, rec = source
    fifo = run_dir / "request"
    before = os.lstat(fifo).st_ino
    os.close(src.fileno())
    # A helper opening the FIFO now waits for a writer (nobody holds it).
    opened = threading.Event()

    def helper() -> None:
        fd = os.open(fifo, os.O_RDONLY)
        opened.set()
        os.close(fd)

    threading.Thread(target=helper, daemon=True).start()
    assert not opened.wait(0.2)
    problem = src.check()
    assert problem is not None and "closed or reused" in problem
    # The same FIFO, reopened: the waiting helper got in.
    assert opened.wait(5) and os.lstat(fifo).st_ino == before
    path, fd = reply_fifo(run_dir, 301)
    write_request(run_dir / "request", f"dummy {path}\n".encode())
    src.on_readable()
    assert rec.keys == ["dummy"] and read_reply(fd) == b"+\n0 loaded dummy\n"
    os.close(fd)


def test_check_reports_requests_left_unread(
        source: tuple[KernelRequestSource, Recorder], run_dir: Path) -> None:
    src, _ = source
    path, fd = reply_fifo(run_dir, 401)
    write_request(run_dir / "request", f"dummy {path}\n".encode())
    assert src.check() is None            # just written: the loop may not have run yet
    problem = src.check()                 # still there, no read in between
    assert problem is not None and "unread" in problem
    src.on_readable()
    assert src.check() is None
    os.close(fd)


def test_service_watches_a_lost_request_fifo_again(
        tmp_path: Path, run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The event loop stops watching the FIFO (whatever the cause): the next
    # helper is served within a check or two, not after its 60 s watchdog,
    # and the journal says what happened.
    graph = {"dummy": ()}
    kernel = sim_kernel(tmp_path / "tree", graph)
    settings = Settings(max_workers=2, autoclean_interval=0,
                        socket=str(tmp_path / "control"),
                        state_file=str(tmp_path / "state/state.json"),
                        root=str(tmp_path / "tree"), coldplug=False, version="6.1.0-test")
    sources: list[KernelRequestSource] = []

    def kernel_requests(submit: object) -> KernelRequestSource:
        src = KernelRequestSource(submit, run_dir / "request", free_orphans=False)  # type: ignore[arg-type]
        sources.append(src)
        return src

    svc = Service(settings, kernel, lambda s: GraphResolver(tmp_path / "mods", graph),
                  loader=GatedLoader(kernel), sources=[kernel_requests], coldplug=None,
                  watcher=None, modules_load=None, notify=lambda **kw: True,
                  watchdog_interval=lambda: None, install_signals=False)
    svc.SOURCE_CHECK_INTERVAL = 0.2
    t = threading.Thread(target=svc.run, daemon=True)
    with caplog.at_level(logging.ERROR):
        t.start()
        deadline = time.monotonic() + 10
        while not svc.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.ready and sources
        done = threading.Event()
        svc.loop.call_soon_threadsafe(lambda: (svc.loop.remove(sources[0]), done.set()))
        assert done.wait(5)
        path, fd = reply_fifo(run_dir, 501)
        write_request(run_dir / "request", f"dummy {path}\n".encode())
        assert read_reply(fd, timeout=10) == b"+\n0 loaded dummy\n"
        os.close(fd)
        svc.request_stop()
        t.join(15)
    assert not t.is_alive()
    assert any("no longer watched" in r.getMessage() for r in caplog.records)


def test_the_daemons_share_of_the_round_trip_is_logged_at_debug_level(
        source: tuple[KernelRequestSource, Recorder], run_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # bench/bench_request.py reads these lines (ANSWERED) from the daemon's log.
    from bench.bench_request import daemon_spans
    src, _ = source
    for n, name in enumerate(("rtnl-link-dummy", "rtnl-link-dummy")):
        path, fd = reply_fifo(run_dir, 600 + n)
        write_request(run_dir / "request", f"{name} {path}\n".encode())
        with caplog.at_level(logging.DEBUG, logger="kmodd.daemon.kernelreq"):
            src.on_readable()
        assert read_reply(fd) == f"+\n0 loaded {name}\n".encode()
        os.close(fd)
    lines = "\n".join(r.getMessage() for r in caplog.records)
    spans = daemon_spans(lines)
    assert list(spans) == ["rtnl-link-dummy"] and len(spans["rtnl-link-dummy"]) == 1
    assert 0 <= spans["rtnl-link-dummy"][0] < 10
