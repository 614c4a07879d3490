"""The modules listed for loading at boot, loaded by the daemon in place of
``systemd-modules-load`` (what the lists say and how they are read:
kmodd.daemon.boot_lists)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kmodd.daemon.boot_lists import ListedModule, ListProblem
from kmodd.daemon.report import DAEMON_LOGGER
from kmodd.daemon.requests import Request, RequestKind, Submit
from kmodd.journal import log

LOG = logging.getLogger(DAEMON_LOGGER)     # the daemon's lines keep their name (report.py)


# READY=1 waits for the modules-load.d loads (units ordered after
# systemd-modules-load.service, systemd-sysctl for one, expect them), but
# never longer than this: systemd would time the start out.
MODULES_LOAD_READY_WAIT = 60.0
MODULES_LOAD_MARKER = "modules-load.served"

ListedFn = Callable[[], "tuple[list[ListedModule], list[ListProblem]]"]


class Timers(Protocol):
    """The event loop calls :class:`BootLoads` makes (kmodd.daemon.loop.EventLoop)."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> object: ...
    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> None: ...


class BootLoads:
    """The daemon serving the boot lists in place of systemd-modules-load.

    :meth:`start` submits every listed module at once: the pool loads
    dependencies first and independent modules in parallel, where
    systemd-modules-load goes one by one.  ``marker`` exists while this
    daemon serves the lists (kmodd-takeover's drop-in makes
    systemd-modules-load.service do nothing then).  ``on_done`` is called on
    the loop thread once they are all in, or after READY_WAIT seconds.
    """

    READY_WAIT = MODULES_LOAD_READY_WAIT

    def __init__(self, read: ListedFn, marker: Path, submit: Submit, loop: Timers, *,
                 mark: Callable[[str], None], on_done: Callable[[], None]) -> None:
        self._read = read
        self.marker = marker
        self._submit = submit
        self._loop = loop
        self._mark = mark            # LoadLog.mark: the lists' start and end on the timeline
        self._on_done = on_done
        self.pending = 0

    def start(self) -> None:
        try:
            listed, problems = self._read()
        except Exception as exc:    # unreadable lists: systemd-modules-load does them
            # No marker: systemd-modules-load.service (kmodd-takeover's
            # drop-in) then loads the lists itself.
            log(LOG, logging.ERROR, "cannot read modules-load.d: %s; leaving the lists "
                 "to systemd-modules-load", exc)
            return
        self.set_served(True)
        for problem in problems:
            log(LOG, logging.WARNING, "modules-load.d: %s: %s", problem.source,
                 problem.message)
        if not listed:
            return
        log(LOG, logging.INFO, "loading %d module(s) listed for boot: %s", len(listed),
             " ".join(m.name for m in listed))
        self._mark("modules-load-start")
        self.pending = len(listed)
        self._loop.call_later(self.READY_WAIT, self._waited_enough)
        for m in listed:
            future = self._submit(Request(RequestKind.MODULES_LOAD, m.name, None, m.where,
                                          m.options))
            future.add_done_callback(
                lambda f: self._loop.call_soon_threadsafe(self._one_done))

    def set_served(self, on: bool) -> None:
        try:
            if on:
                self.marker.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                self.marker.write_text(f"{os.getpid()}\n")
            else:
                self.marker.unlink(missing_ok=True)
        except OSError as exc:
            log(LOG, logging.WARNING, "cannot %s %s: %s", "create" if on else "remove",
                 self.marker, exc)

    def _one_done(self) -> None:
        if self.pending <= 0:
            return
        self.pending -= 1
        if self.pending == 0:
            self._mark("modules-load-end")
            self._on_done()

    def _waited_enough(self) -> None:
        if self.pending > 0:
            log(LOG, logging.WARNING, "modules listed for boot still loading after %gs; "
                 "ready anyway", self.READY_WAIT)
            self.pending = 0
            self._on_done()
