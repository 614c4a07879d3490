"""Reporting outcomes: the journal lines and the monitor events, in one place.

The scheduler's callbacks land here (worker threads for the journal, the
loop thread for monitors).  Each module gets a journal line under its own
MODULE= as it goes in or fails; a failure is logged once at its level and
again only at debug; monitors get every outcome, redacted for non-root
peers.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from typing import Any

from kmodd.daemon.control import Connection
from kmodd.daemon.requests import Outcome, OutcomeStatus, Request, RequestKind
from kmodd.journal import log
from kmodd.kernel.loader import StepResult, StepStatus
from kmodd.resolution.plan import ModuleStep

# The daemon's own lines (loads, failures, boot lists, control changes) carry
# the name they always had, whichever module writes them: it starts every
# stderr line ("kmodd.daemon.service: INFO: loaded ...") and tools match it.
DAEMON_LOGGER = "kmodd.daemon.service"
LOG = logging.getLogger(DAEMON_LOGGER)


class OutcomeReporter:
    def __init__(self, logger: logging.Logger = LOG) -> None:
        self.log = logger
        self.monitors: set[Connection] = set()
        self._logged_failures: dict[str, str | None] = {}
        self._log_lock = threading.Lock()

    # --- worker threads -------------------------------------------------------

    def module_result(self, step: ModuleStep, request: Request, result: StepResult) -> bool:
        """One line per module, under its own MODULE=: journalctl MODULE=snd_pcm
        finds the dependency too, and each module of a request that names
        several (a CPU modalias) gets its own verdict.  True when it went in."""
        fields: dict[str, Any] = {
            "module": step.name, "devpath": request.devpath,
            "requested_by": request.requested_by or request.kind,
            "modalias": request.key if request.kind.is_device else None}
        seconds = result.seconds
        usec = None if seconds is None else int(seconds * 1e6)
        fields["duration_usec"] = usec
        if result.status.is_failure:    # skipped: a dependency failed
            self.module_failure(step.name, request, result.error or result.status,
                                result.errno, fields)
            return False
        if result.status is not StepStatus.LOADED:
            return False
        with self._log_lock:
            self._logged_failures.pop(step.name, None)
        log(self.log, logging.INFO, "loaded %s for %s%s", step.name, request.key,
             f" in {usec / 1000:.0f} ms" if usec is not None else "", **fields)
        return True

    def runaway(self, key: str, request: Request) -> None:
        log(self.log, logging.WARNING,
             "runaway: requests for %s keep arriving; refusing them until they calm down",
             key, module=key, requested_by=request.requested_by, devpath=request.devpath)

    def module_failure(self, what: str, req: Request, error: str, errno_: int | None,
                            fields: dict[str, Any]) -> None:
        # Each failure once: the same error again (backoff expired, a second
        # device) goes to debug.
        with self._log_lock:
            repeat = self._logged_failures.get(what, "") == error
            self._logged_failures[what] = error
            if len(self._logged_failures) > 4096:
                self._logged_failures.pop(next(iter(self._logged_failures)))
        # A driver probed for a device it does not drive answers ENODEV:
        # routine for hotplug and coldplug (udev logs it at debug too).
        routine = errno_ in (errno.ENODEV, errno.ENXIO) and req.kind.is_device
        level = logging.DEBUG if repeat else logging.INFO if routine else logging.WARNING
        log(self.log, level, "cannot load %s: %s", what, error, **{**fields, "errno": errno_})

    def outcome(self, outcome: Outcome) -> None:
        """Worker thread: one journal line per request outcome."""
        req = outcome.request
        fields: dict[str, Any] = {
            "module": " ".join(outcome.modules) or None, "devpath": req.devpath,
            "errno": outcome.errno, "requested_by": req.requested_by or req.kind}
        if req.kind.is_device:
            fields["modalias"] = req.key
        status = outcome.status
        if status is OutcomeStatus.LOADED:
            # Each module was logged as it went in (module_result).
            log(self.log, logging.DEBUG, "%s: loaded %s", req.key, " ".join(outcome.modules),
                 **fields)
        elif status == "failed" and (outcome.error or "").startswith("refused: "):
            self.module_failure(" ".join(outcome.failed) or req.key, req,
                                     outcome.error or "refused", outcome.errno, fields)
        elif status == "failed" and outcome.failed:
            # Each failing module was logged as it failed (module_result).
            log(self.log, logging.DEBUG, "%s: failed (%s)", req.key, outcome.error, **fields)
        elif status == "failed":
            self.module_failure(" ".join(outcome.modules) or req.key, req,
                                     outcome.error or "failed", outcome.errno, fields)
        elif status == "runaway":
            log(self.log, logging.DEBUG, "runaway request %s refused", req.key, **fields)
        elif req.kind is RequestKind.MODULES_LOAD and status in ("unresolved", "blacklisted"):
            # systemd-modules-load: "Failed to find module" is an error; a
            # blacklisted one is only noted ("is deny-listed (by kmod)").
            what = "not found" if status == "unresolved" else "blacklisted, not loaded"
            log(self.log, logging.ERROR if status == "unresolved" else logging.INFO,
                 "module %s listed in %s: %s", req.key, req.requested_by, what, **fields)
        else:
            log(self.log, logging.DEBUG, "%s: %s%s", req.key, status,
                 f" ({outcome.error})" if outcome.error else "", **fields)

    # --- the loop thread --------------------------------------------------------

    def add_monitor(self, conn: Connection) -> None:
        if not conn.monitoring:
            self.monitors.add(conn)
            conn.monitoring = True
            conn.on_close.append(self.monitors.discard)

    def broadcast(self, outcome: Outcome) -> None:
        if not self.monitors:
            return
        event = {"event": "outcome", "time": time.time(), **outcome.to_dict()}
        public: dict[str, Any] | None = None
        for conn in list(self.monitors):
            if conn.cred.is_root:
                conn.send(event)
            else:
                if public is None:
                    public = redact_outcome(event)
                conn.send(public)


# --- what non-root readers see ------------------------------------------------------------
# Anyone may connect to the control socket; module options are the
# administrator's (they may hold keys and passwords: modprobe.d files are
# root's to read) and a requester's pid/uid is another user's business.

_CREDENTIAL = re.compile(r"\s*\b(?:uid|gid|pid)=\S*")
# kmodd.kernel.errors.load_message quotes the parameters: "... value in '...' (see dmesg)"
_QUOTED_PARAMS = re.compile(r" in '.*'(?= \(see dmesg\))", re.DOTALL)


def redact_requester(requested_by: str | None) -> str | None:
    """``kmodctl uid=0 pid=42`` -> ``kmodctl``: who asked, as a kind, not a process."""
    if not requested_by:
        return requested_by
    return _CREDENTIAL.sub("", requested_by).strip() or "hidden"


def redact_error(error: str | None) -> str | None:
    return _QUOTED_PARAMS.sub("", error) if error else error


def redact_outcome(event: dict[str, Any]) -> dict[str, Any]:
    """An outcome (``Outcome.to_dict()``, monitor event) as a non-root peer may see it."""
    out = dict(event)
    request = dict(out.get("request") or {})
    if "options" in request:
        request["options"] = None
    if "requested_by" in request:
        request["requested_by"] = redact_requester(request["requested_by"])
    out["request"] = request
    out["error"] = redact_error(out.get("error"))
    return out

