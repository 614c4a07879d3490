"""The daemon's event loop: selectors, timers, and callbacks from other threads.

One thread runs it: the control socket, the request sources (uevents, the
kernel-request FIFO, inotify), timers (autoclean, watchdog, STATUS=) and
callbacks posted by the worker threads.  Like sd-event, a handler that
raises is logged and the loop goes on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# The name the loop's lines had before the loop had a file of its own (it
# starts every stderr line; see kmodd.daemon.report.DAEMON_LOGGER).
LOG = logging.getLogger("kmodd.daemon.service")

CALLBACK = "event loop callback"     # what a failing handler is called in the log


class _Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """selectors + timers + a self-pipe for callbacks from other threads.

    ``call_soon_threadsafe`` takes no lock (deque.append is atomic), so it is
    safe from a signal handler too.

    Each turn: the *priority* readers (the kernel's uevents and request FIFO,
    inotify) first, all of them; then the other ready handlers and the work
    deferred with :meth:`call_soon` (control peers), in a rotating order and
    only until ``turn_budget`` seconds are spent -- what is left waits for the
    next turn, which begins with a fresh look at the priority readers; then
    timers and the callbacks of other threads.  So the kernel never waits
    behind more than one budget of control traffic, and no peer is always
    last (the same idea as sd-event's per-source priorities).
    """

    TURN_BUDGET = 0.005
    # When the budget ran out (control traffic saturates the loop), the next
    # wait serves only the priority readers for as long as the budgeted work
    # took: control gets at most half of the loop thread, and the scheduler's
    # threads get the interpreter lock in between.
    REST_SHARE = 1.0

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._wakeup_pending = False
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._handlers: dict[int, tuple[Callable[[], None] | None,
                                        Callable[[], None] | None]] = {}
        self._priority: set[int] = set()
        self._deferred: deque[tuple[Callable[[], None], object]] = deque()
        # Fairness: ready work is served least recently served group first
        # (a group: the uid of a control peer, else the fd itself), so a
        # user with many connections gets one share, not one per connection.
        self._groups: dict[int, object] = {}
        self._what: dict[int, str] = {}
        self._served: dict[object, int] = {}
        self._ticks = itertools.count(1)
        self._turn = 0
        self.turn_budget = self.TURN_BUDGET
        self.rest_share = self.REST_SHARE
        self._rest_until = 0.0
        self.selector.register(self._rsock, selectors.EVENT_READ, None)
        # Non-priority fds live in a selector of their own (epoll nests),
        # watched from the main one except while the loop rests.
        self._normal = selectors.DefaultSelector()
        self._normal_watched = False
        self._watch_normal(True)
        self.stopped = False
        self.thread: threading.Thread | None = None

    # registration ------------------------------------------------------------
    def _update(self, fileobj: Any, reader: Callable[[], None] | None,
                writer: Callable[[], None] | None) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        events = (selectors.EVENT_READ if reader else 0) | \
            (selectors.EVENT_WRITE if writer else 0)
        known = fd in self._handlers
        if not events:
            if known:
                self._selector_of(fd).unregister(fd)
                del self._handlers[fd]
            self._priority.discard(fd)
            self._groups.pop(fd, None)
            self._what.pop(fd, None)
            return
        self._handlers[fd] = (reader, writer)
        if known:
            self._selector_of(fd).modify(fd, events)
        else:
            self._selector_of(fd).register(fd, events)

    def _selector_of(self, fd: int) -> selectors.BaseSelector:
        return self.selector if fd in self._priority else self._normal

    def _watch_normal(self, on: bool) -> None:
        if on != self._normal_watched:
            if on:
                self.selector.register(self._normal.fileno(), selectors.EVENT_READ, None)
            else:
                self.selector.unregister(self._normal.fileno())
            self._normal_watched = on

    def add_reader(self, fileobj: Any, callback: Callable[[], None], *,
                   priority: bool = False, group: object = None,
                   what: str | None = None) -> None:
        """Call ``callback`` when readable; ``priority`` readers go first every turn.

        Others share the turn's budget by ``group`` (default: the fd alone).
        ``what`` names the reader in the line logged when it raises.
        """
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        reader, writer = self._handlers.get(fd, (None, None))
        if (fd in self._priority) != priority and (reader or writer):
            self._update(fd, None, None)         # moves to the other selector
        if priority:
            self._priority.add(fd)
        else:
            self._priority.discard(fd)
        self._update(fd, callback, writer)
        if group is not None:
            self._groups[fd] = group
        if what is not None:
            self._what[fd] = what

    def watching(self, fileobj: Any, callback: Callable[[], None]) -> bool:
        """Whether ``callback`` is the registered reader of ``fileobj``'s fd."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        reader, _ = self._handlers.get(fd, (None, None))
        if reader is None or reader != callback:
            return False
        try:
            return bool(self._selector_of(fd).get_key(fd).events & selectors.EVENT_READ)
        except (KeyError, ValueError):
            return False

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching for input (a writer stays registered)."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        _, writer = self._handlers.get(fd, (None, None))
        self._update(fd, None, writer)

    def set_writer(self, fileobj: Any, callback: Callable[[], None] | None) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        reader, _ = self._handlers.get(fd, (None, None))
        self._update(fd, reader, callback)

    def remove(self, fileobj: Any) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._handlers:
            self._selector_of(fd).unregister(fd)
            del self._handlers[fd]
        self._priority.discard(fd)
        self._groups.pop(fd, None)
        self._what.pop(fd, None)

    # callbacks and timers ------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None:
        self._calls.append((fn, args))
        # One wake-up byte per batch: the loop clears the flag before taking
        # the batch, so a call appended after that always sends its own.
        if not self._wakeup_pending:
            self._wakeup_pending = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wsock.send(b"\0")

    def call_soon(self, fn: Callable[[], None], *, group: object = None) -> None:
        """From the loop thread: run ``fn`` in a coming turn, within the turn budget
        and the share of ``group`` (see :meth:`add_reader`)."""
        self._deferred.append((fn, group if group is not None else fn))

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + max(0.0, delay), fn)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        if len(self._timers) > 1024:
            # Cancelled far-future timers (settle timeouts) would pile up.
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
        return timer

    def call_every(self, interval: float, fn: Callable[[], object], *,
                   what: str = CALLBACK) -> _Timer:
        """Repeat ``fn`` every ``interval`` seconds; cancel the returned handle to stop.

        A tick that raises is logged (as ``what``) and the next one still comes."""
        handle = _Timer(0.0, lambda: None)     # a handle: cancel() stops the ticks

        def tick() -> None:
            if handle.cancelled:
                return
            self._guard(fn, what=what)
            if not handle.cancelled:
                self.call_later(interval, tick)

        self.call_later(interval, tick)
        return handle

    @staticmethod
    def _guard(fn: Callable[..., object], *args: Any, what: str = CALLBACK) -> None:
        # The one guard of every handler, reader and timer: a bug or bad
        # input in one of them is logged and never takes the loop down.
        try:
            fn(*args)
        except Exception:
            LOG.exception("%s failed", what)

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = max_wait
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            until = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        resting = self._rest_until - time.monotonic()
        if resting > 0:
            timeout = resting if timeout is None else min(timeout, resting)
        elif self._deferred:
            timeout = 0.0
        if self._calls:
            timeout = 0.0
        self._watch_normal(resting <= 0)
        normal = False
        for key, mask in self.selector.select(timeout):
            if key.fileobj is self._rsock:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._rsock.recv(4096):
                        pass
            elif key.fd in self._priority:
                self._dispatch(key.fd, mask)
            else:
                normal = True            # the nested selector of the others
        if resting <= 0:
            ready = [(key.fd, mask) for key, mask in self._normal.select(0)] if normal else []
            self._run_budgeted(ready)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guard(timer.callback)
        self._wakeup_pending = False
        for _ in range(len(self._calls)):
            fn, args = self._calls.popleft()
            self._guard(fn, *args)

    def _dispatch(self, fd: int, mask: int) -> None:
        reader, writer = self._handlers.get(fd, (None, None))
        if mask & selectors.EVENT_WRITE and writer is not None:
            self._guard(writer)
        # The write handler may have closed and unregistered the fd.
        reader, _ = self._handlers.get(fd, (None, None))
        if mask & selectors.EVENT_READ and reader is not None:
            self._guard(reader, what=self._what.get(fd, CALLBACK))

    def _run_budgeted(self, ready: list[tuple[int, int]]) -> None:
        if not ready and not self._deferred:
            return
        deferred = list(self._deferred)
        self._deferred.clear()
        # (group, own key, fd and mask | None, deferred index | -1)
        work: list[tuple[object, object, tuple[int, int] | None, int]] = [
            (self._groups.get(fd, ("fd", fd)), ("fd", fd), (fd, mask), -1) for fd, mask in ready]
        work += [(group, fn, None, i) for i, (fn, group) in enumerate(deferred)]
        # Round robin: groups least recently served first, one item of each
        # in turn; inside a group, its least recently served item first.
        queues: dict[object, deque[tuple[object, object, tuple[int, int] | None, int]]] = {}
        for item in sorted(work, key=lambda w: self._served.get(w[1], 0)):
            queues.setdefault(item[0], deque()).append(item)
        order = sorted(queues, key=lambda g: self._served.get(g, 0))
        sequence = []
        while order:
            order = [g for g in order if queues[g]]
            sequence += [queues[g].popleft() for g in order]
        self._turn += 1
        left: list[int] = []
        began = time.monotonic()
        deadline = began + self.turn_budget
        for done, (group, key, event, index) in enumerate(sequence):
            if done and time.monotonic() > deadline:
                # Left for the next turn: ready fds are reported again
                # (level-triggered), deferred calls stay queued.  Saturated:
                # rest as long as this took (priority readers still served).
                now = time.monotonic()
                self._rest_until = now + (now - began) * self.rest_share
                left = sorted(i for _, _, e, i in sequence[done:] if e is None)
                break
            tick = next(self._ticks)
            self._served[group] = self._served[key] = tick
            if event is None:
                self._guard(deferred[index][0])
            else:
                self._dispatch(*event)
        # Unserved deferred calls keep their order, ahead of any added since.
        self._deferred.extendleft(deferred[i] for i in reversed(left))
        if len(self._served) > 4096:
            self._served.clear()

    def run(self, until: Callable[[], bool]) -> None:
        self.thread = threading.current_thread()
        while not until():
            self.run_once()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.selector.close()
        with contextlib.suppress(Exception):
            self._normal.close()
        self._rsock.close()
        self._wsock.close()
