"""The control operations: one table of what each op needs and which handler serves it.

:data:`OPERATIONS` maps an op to (needs root, handler); the control server
(kmodd.daemon.control) checks the peer against it and calls the handler,
which answers with a reply, or later through ``conn.reply`` (load, unload,
settle), or by streaming (monitor).  The JSON of every reply is the
protocol ``kmodctl`` speaks: it does not change with the code behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from kmodd.daemon.control import Connection, Operation, error_reply
from kmodd.daemon.report import DAEMON_LOGGER, redact_error, redact_requester
from kmodd.daemon.requests import Outcome, Request, RequestKind
from kmodd.daemon.state import ModuleRecord
from kmodd.journal import log
from kmodd.kernel.protocol import InitState
from kmodd.resolution.names import modname_normalize

if TYPE_CHECKING:
    from kmodd.daemon.service import Service

LOG = logging.getLogger(DAEMON_LOGGER)     # the daemon's lines keep their name (report.py)

MAX_SETTLE_PER_PEER = 16

Reply = dict[str, Any]
SettleWaiter = tuple[Connection, Reply, Any]


class ControlOps:
    """The handlers behind :data:`OPERATIONS`, reading and driving one service."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.settle_waiters: list[SettleWaiter] = []

    def table(self) -> dict[str, Operation]:
        return {op: Operation(root, _bind(handler, self))
                for op, (root, handler) in OPERATIONS.items()}

    # --- the ops that only read ---------------------------------------------------

    def ping(self, conn: Connection, msg: Reply) -> Reply:
        return {"ok": True}

    def op_status(self, conn: Connection, msg: Reply) -> Reply:
        return self.status()

    def op_list(self, conn: Connection, msg: Reply) -> Reply:
        return {"ok": True, "modules": self.list_modules(private=conn.cred.is_root)}

    def op_why(self, conn: Connection, msg: Reply) -> Reply:
        return self.why(_name_arg(msg, "module"), private=conn.cred.is_root)

    def loads(self, conn: Connection, msg: Reply) -> Reply:
        return {"ok": True, **self.svc.loadlog.to_dict()}

    def monitor(self, conn: Connection, msg: Reply) -> Reply:
        self.svc.reporter.add_monitor(conn)
        return {"ok": True, "monitoring": True}

    # --- the ops that change things (root) -------------------------------------------

    def deny_op(self, conn: Connection, msg: Reply) -> Reply:
        return self.set_denied(_name_arg(msg, "module"), msg["op"] == "deny")

    def reload(self, conn: Connection, msg: Reply) -> Reply:
        try:
            return {"ok": True, **self.svc.reload()}
        except Exception as exc:
            # A reply, not a crash: the previous configuration stays in force.
            return error_reply(f"reload failed, previous configuration kept: {exc}", "EIO")

    # --- settle waiters (the loop thread) -----------------------------------------------

    def check_settle(self) -> None:
        """Answer every waiting ``settle`` once nothing is pending."""
        if not self.settle_waiters or not self.svc.settled():
            return
        waiters, self.settle_waiters = self.settle_waiters, []
        for conn, msg, timer in waiters:
            if timer is not None:
                timer.cancel()
            conn.reply(msg, {"ok": True, "settled": True})

    def stop_settle(self) -> None:
        """The daemon is stopping: every waiter hears it is not settled."""
        for conn, msg, timer in self.settle_waiters:
            if timer is not None:           # a settle without a timeout has none
                timer.cancel()
            conn.reply(msg, {"ok": True, "settled": False, "reason": "kmodd is stopping"})
        self.settle_waiters = []

    def status(self) -> dict[str, Any]:
        snap = self.svc.scheduler.snapshot()
        from kmodd import __version__ as kmodd_version
        return {
            "ok": True, "pid": os.getpid(), "version": kmodd_version,
            "uptime": round(time.time() - self.svc.started_at, 3),
            "ready": self.svc.ready, "stopping": self.svc.stopping,
            "coldplug": self.svc.coldplug_state, "settled": self.svc.settled(),
            "kernel_version": self._kernel_version(),
            "workers": snap["max_workers"], "loading": snap["loading"],
            "pending": snap["pending"], "queued_loads": snap["queued_loads"],
            "waiting": self.svc.scheduler.pending_detail(),
            "waiting_loads": snap["waiting_loads"], "submitted": snap["submitted"],
            "outcomes": snap["outcomes"], "backoff": snap["backoff"],
            "runaway": snap["runaway"], "loaded_by_kmodd": len(self.svc.state),
            "deny": self.svc.deny.denied(),
            "autoclean": {"interval": self.svc.settings.autoclean_interval,
                          "idle_timeout": self.svc.settings.idle_timeout,
                          "never_unload": list(self.svc.settings.never_unload),
                          "sweeps": self.svc.autoclean.sweeps,
                          "unloaded": self.svc.autoclean.unloaded_total},
            "reloads": self.svc.reloads, "last_reload_error": self.svc.last_reload_error,
            "sources": [type(s).__name__ for s in self.svc.sources],
            "monitors": len(self.svc.reporter.monitors), "socket": self.svc.settings.socket,
        }

    def _kernel_version(self) -> str | None:
        if self.svc.settings.version:
            return self.svc.settings.version
        try:
            from kmodd.root import running_kernel_version
            return running_kernel_version(self.svc.settings.root_obj)
        except Exception:       # status still answers; the version shows as null
            return None

    def list_modules(self, *, private: bool = True) -> list[dict[str, Any]]:
        """Every loaded module; ``private=False`` (non-root peers) hides who asked."""
        records = self.svc.state.records()
        try:
            table = self.svc.kernel.modules()
        except Exception as exc:    # any read error: one clear reply, not a traceback
            raise RuntimeError(f"cannot read the module list: {exc}") from None
        out = []
        for name in sorted(table):
            mod = table[name]
            rec = records.get(name)
            out.append({
                "name": name, "state": mod.state.lower(), "refcount": mod.refcount,
                "holders": list(mod.holders), "size": mod.size, "permanent": mod.permanent,
                "loaded_by_kmodd": rec is not None,
                "why": _why_dict(rec, private) if rec else None,
                "loaded_at": rec.loaded_at if rec else None,
                "idle_since": rec.idle_since if rec else None})
        return out

    def why(self, module: str, *, private: bool = True) -> dict[str, Any]:
        name = modname_normalize(module)
        rec = self.svc.state.get(name)
        state: InitState | None
        try:
            state = self.svc.kernel.initstate(name)
            unreadable = None
        except Exception as exc:    # sysfs unreadable: say so, never "absent"
            state, unreadable = None, str(exc)
        out: dict[str, Any] = {"ok": True, "module": name,
                               "state": state.value if state is not None else "unknown",
                               "loaded_by_kmodd": rec is not None}
        if unreadable is not None:
            out["state_error"] = f"cannot read the state of {name}: {unreadable}"
        if rec is not None:
            out.update(_why_dict(rec, private))
            out["loaded_at"] = rec.loaded_at
            out["idle_since"] = rec.idle_since
        if self.svc.last_sweep is not None and name in self.svc.last_sweep.kept:
            out["autoclean"] = self.svc.last_sweep.kept[name]     # why it is still loaded
        present = state in (InitState.LIVE, InitState.COMING)
        denied = self.svc.deny.reason(name)
        if denied is not None:
            out["denied"] = denied
        if self.svc.resolver.blacklisted(name):
            out["blacklisted"] = True
        if present and (denied is not None or out.get("blacklisted")):
            what = "denied" if denied is not None else "blacklisted in modprobe.d"
            out["warning"] = f"{name} is {what}, yet loaded"
            out["how"] = self._how_it_got_in(name, rec)
        failure = self.svc.scheduler.failures().get(name)
        if failure is not None:
            out["last_failure"] = {"failures": failure.failures,
                                   "error": failure.error if private
                                   else redact_error(failure.error),
                                   "errno": failure.errno}
        return out

    def set_denied(self, module: str, deny: bool) -> dict[str, Any]:
        """``kmodctl deny/allow``: edit the persistent list (the setting stays as written)."""
        name = modname_normalize(module)
        try:
            changed = self.svc.deny.set(name, deny)
        except OSError as exc:
            return error_reply(f"cannot write {self.svc.deny.path}: {exc.strerror or exc}", "EIO")
        if changed:
            log(LOG, logging.INFO, "%s %s (%s)", "denied" if deny else "allowed again", name,
                 self.svc.deny.path, module=name)
        out: dict[str, Any] = {"ok": True, "module": name, "changed": changed,
                               "denied": self.svc.deny.reason(name) is not None,
                               "deny": self.svc.deny.denied()}
        if not deny and name in self.svc.deny.setting:
            out["note"] = f"still denied by the 'deny' setting in {self.svc.deny.config_file}"
        return out

    def _how_it_got_in(self, name: str, rec: ModuleRecord | None) -> str:
        if rec is not None:
            how = f"kmodd loaded it for {rec.kind} {rec.key}"
            if rec.role != "target" and rec.via:
                how += f", as {rec.role} of {' '.join(rec.via)}"
            elif rec.kind in ("admin", "kernel"):
                how += " (by name: the blacklist only applies to aliases)"
            return how
        holders: tuple[str, ...] = ()
        with contextlib.suppress(Exception):    # only a hint: the generic answer follows
            holders = tuple(self.svc.kernel.holders(name))
        if holders:
            return (f"not loaded by kmodd; used by {' '.join(holders)}: most likely "
                    "loaded as their dependency (the blacklist does not apply to those)")
        return ("not loaded by kmodd: by name (modprobe NAME ignores the blacklist), "
                "before kmodd started, or from the initramfs")

    def settle(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        timeout = msg.get("timeout")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float) or timeout < 0):
            return error_reply("timeout must be a non-negative number of seconds")
        if self.svc.settled():
            return {"ok": True, "settled": True}
        if timeout == 0:
            return {"ok": True, "settled": False}
        if sum(1 for w in self.settle_waiters if w[0] is conn) >= MAX_SETTLE_PER_PEER:
            return error_reply("too many settle requests waiting on this connection",
                               "EAGAIN")
        timer = None
        entry: list[Any] = []

        def expire() -> None:
            if entry and entry[0] in self.settle_waiters:
                self.settle_waiters.remove(entry[0])
                # What it still waits for: a settle that times out says why.
                conn.reply(msg, {"ok": True, "settled": False,
                                 "pending": self.svc.scheduler.pending(),
                                 "coldplug": self.svc.coldplug_state,
                                 "waiting": self.svc.scheduler.pending_detail()})

        if timeout is not None:
            timer = self.svc.loop.call_later(float(timeout), expire)
        waiter = (conn, msg, timer)
        entry.append(waiter)
        self.settle_waiters.append(waiter)

        def drop(c: Connection) -> None:
            if waiter in self.settle_waiters:
                self.settle_waiters.remove(waiter)
                if timer is not None:
                    timer.cancel()

        conn.on_close.append(drop)
        return None

    def load(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        name = _name_arg(msg, "name")
        options = msg.get("options") or ""
        if not isinstance(options, str) or len(options) > 4096:
            return error_reply("options must be a string")
        kind = msg.get("kind") or "admin"
        if kind not in ("admin", "kernel"):
            return error_reply("kind must be 'admin' or 'kernel'")
        if kind == "kernel":
            from kmodd.daemon.kernelreq import check_name

            problem = check_name(name)
            if problem is not None:
                # What the request FIFO answers too: refused, under kind kernel.
                log(LOG, logging.WARNING, "kernel request refused: %s", problem,
                     request=name[:80], requested_by="kernel")
                return error_reply(f"kernel request refused: {problem}", "EINVAL")
        if kind == "admin" and options:
            refusal = self._refuse_params(name, options)
            if refusal is not None:
                return error_reply(refusal, "EINVAL")
        by = msg.get("requested_by")
        requested_by = by if isinstance(by, str) and by and len(by) < 256 else \
            f"kmodctl uid={conn.uid} pid={conn.cred.pid}"
        future = self.svc.submit(Request(RequestKind(kind), name, None, requested_by, options))

        def done(f: Future[Outcome]) -> None:
            outcome = f.result()
            self.svc.loop.call_soon_threadsafe(
                conn.reply, msg, {"ok": True, "status": outcome.status,
                                  "outcome": outcome.to_dict()})

        future.add_done_callback(done)
        return None

    def _refuse_params(self, name: str, options: str) -> str | None:
        """An admin's parameters unknown to the module are refused, as a direct load does."""
        from kmodd.modfile.params import check_params, split_params
        try:
            plan = self.svc.resolver.plan(name, extra_options=options)
        except Exception:
            return None          # the load itself will report why it cannot resolve
        return check_params(plan, split_params(options))

    def unload(self, conn: Connection, msg: dict[str, Any]) -> dict[str, Any] | None:
        name = modname_normalize(_name_arg(msg, "name"))
        force = bool(msg.get("force", False))

        def work() -> None:
            try:
                result = self.svc.loader_unload(name, force=force)
                status = result.status
                reply = {"ok": True, "module": name, "status": status,
                         "error": result.error, "errno": result.errno}
                if status in ("unloaded", "remove-command", "absent"):
                    self.svc.state.forget(name)
                    self.svc.loop.call_soon_threadsafe(self.svc.saver.mark_dirty)
            except Exception as exc:    # on its own thread: the peer must hear back
                reply = {"ok": True, "module": name, "status": "failed", "error": str(exc),
                         "errno": getattr(exc, "errno", None)}
            self.svc.loop.call_soon_threadsafe(conn.reply, msg, reply)

        # delete_module is quick, a remove command may not be: off the loop.
        threading.Thread(target=work, name=f"kmodd-unload-{name}", daemon=True).start()
        return None


def _name_arg(msg: dict[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024 or "\0" in value \
            or value.startswith("-"):
        raise ValueError(f"{key!r} must be a module name or alias")
    return value


def _why_dict(rec: ModuleRecord, private: bool = True) -> dict[str, Any]:
    return {"kind": rec.kind, "key": rec.key, "devpath": rec.devpath,
            "requested_by": rec.requested_by if private else redact_requester(rec.requested_by),
            "role": rec.role, "via": list(rec.via)}


Handler = Callable[[ControlOps, Connection, Reply], "Reply | None"]

# The one table: op -> (needs root, handler).  Anyone may read; only root
# may change what is loaded or configured (SO_PEERCRED, kmodd.daemon.control).
OPERATIONS: dict[str, tuple[bool, Handler]] = {
    "ping": (False, ControlOps.ping),
    "status": (False, ControlOps.op_status),
    "list": (False, ControlOps.op_list),
    "why": (False, ControlOps.op_why),
    "loads": (False, ControlOps.loads),
    "monitor": (False, ControlOps.monitor),
    "settle": (False, ControlOps.settle),
    "load": (True, ControlOps.load),
    "unload": (True, ControlOps.unload),
    "deny": (True, ControlOps.deny_op),
    "allow": (True, ControlOps.deny_op),
    "reload": (True, ControlOps.reload),
}
ROOT_OPS = frozenset(op for op, (root, _) in OPERATIONS.items() if root)


def _bind(handler: Handler, ops: ControlOps) -> Callable[[Connection, Reply], Reply | None]:
    return lambda conn, msg: handler(ops, conn, msg)
