"""Logging with journal fields: ``journalctl -u kmodd MODULE=e1000`` works.

Used by every layer that reports what it did (the loader, the daemon), so it
sits at the bottom and imports nothing of kmodd.  Cheap to import: the
journal handler (systemd-python, ~7 ms of imports) is loaded by
``setup_logging`` only when the process really runs under systemd, and
``logging`` itself is imported by whoever logs.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

# Structured journal fields kmodd attaches to its messages.  Keyword names
# are accepted in lower case (module=...) and sent upper case (MODULE=...),
# the form journald requires and ``journalctl MODULE=e1000`` matches.
FIELDS = ("MODULE", "MODALIAS", "DEVPATH", "ERRNO", "REQUESTED_BY", "STATUS_CODE", "REQUEST")

IDENTIFIER = "kmodd"

# syslog's "notice" (priority 5), between logging.INFO and logging.WARNING:
# normal but significant, e.g. kmodd deliberately doing what modprobe would not.
NOTICE = 25


def under_systemd() -> bool:
    """True when stderr goes to the journal or we were started as a unit.

    ``JOURNAL_STREAM`` is compared with stderr's device and inode, as
    systemd.exec(5) recommends: it is inherited by children whose stderr
    may have been redirected elsewhere.
    """
    stream = os.environ.get("JOURNAL_STREAM")
    if stream:
        try:
            dev, ino = (int(part) for part in stream.split(":", 1))
            st = os.fstat(2)
            if st.st_dev == dev and st.st_ino == ino:
                return True
        except (ValueError, OSError):
            pass
    return bool(os.environ.get("INVOCATION_ID"))


def _make_stderr_formatter() -> logging.Formatter:
    import logging

    class FieldFormatter(logging.Formatter):
        """``kmodd: message [MODULE=x DEVPATH=y]`` so stderr carries the same facts."""

        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            extra = [f"{name}={record.__dict__[name]}" for name in FIELDS
                     if name in record.__dict__]
            return f"{text} [{' '.join(extra)}]" if extra else text

    # Wall-clock time to the millisecond: the journal stamps its own
    # entries, a plain log file needs it to tell how long coldplug took.
    return FieldFormatter("%(asctime)s.%(msecs)03d %(name)s: %(levelname)s: %(message)s",
                          datefmt="%H:%M:%S")


def setup_logging(use_journal: bool | None = None, *, level: int | None = None,
                  logger_name: str = "kmodd") -> logging.Handler:
    """Attach a journald handler (under systemd) or a stderr handler to the ``kmodd`` logger.

    ``use_journal=None`` decides from the environment (see ``under_systemd``).
    When systemd-python cannot be imported or the journal socket is absent,
    stderr is used: under systemd that still reaches the journal, without
    the structured fields.  Returns the handler installed.
    """
    import logging

    logging.addLevelName(NOTICE, "NOTICE")
    logger = logging.getLogger(logger_name)
    for old in list(logger.handlers):
        if getattr(old, "_kmodd_handler", False):
            logger.removeHandler(old)
            old.close()
    if use_journal is None:
        use_journal = under_systemd()
    handler: logging.Handler | None = None
    if use_journal:
        try:
            from systemd.journal import JournalHandler

            class _Handler(JournalHandler):
                @staticmethod
                def map_priority(levelno: int) -> int:
                    # JournalHandler knows only Python's levels: NOTICE would be 4.
                    return 5 if levelno == NOTICE else int(JournalHandler.map_priority(levelno))

            # JournalHandler sends every upper-case attribute of the record
            # (our ``extra=`` fields) as a journal field of that name.
            handler = _Handler(SYSLOG_IDENTIFIER=IDENTIFIER)
        except (ImportError, OSError):
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_make_stderr_formatter())
    handler._kmodd_handler = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else logging.INFO)
    logger.propagate = False
    return handler


def journal_fields(**fields: Any) -> dict[str, str]:
    """``module="e1000", errno=None`` -> ``{"MODULE": "e1000"}``: upper case, None dropped."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        if value is None or value == "":
            continue
        if isinstance(value, (tuple, list)):
            value = " ".join(str(v) for v in value)
        out[key.upper()] = str(value)
    return out


def log(logger: logging.Logger, level: int, msg: str, *args: object, **fields: Any) -> None:
    """Log ``msg`` with structured fields: ``log(LOG, INFO, "loaded", module="e1000")``.

    The fields become journal fields (``journalctl -u kmodd MODULE=e1000``)
    and are appended to the line on stderr.

    Never raises: a field that cannot be encoded must not cost the line, let
    alone the caller (a worker, the event loop).
    """
    if not logger.isEnabledFor(level):
        return
    try:
        logger.log(level, msg, *args, extra=journal_fields(**fields))
    except Exception:
        import contextlib  # only on this path: importing kmodd.journal stays cheap
        with contextlib.suppress(Exception):
            logger.log(level, msg, *args)
