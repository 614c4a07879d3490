"""``kmodctl status --prometheus``: the daemon's counters in the Prometheus text
exposition format (version 0.0.4), for node_exporter's textfile collector.

Built from two read-only replies, ``status`` and ``loads``; no port is
opened anywhere.  Every source is always present (0 included) so rate()
and alerts work from the first scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kmodd.daemon.loadlog import SOURCE_NAMES, Histogram
from kmodd.daemon.requests import OUTCOME_STATUSES


def _escape(value: str) -> str:
    # Label values: backslash, double quote and newline are escaped.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return repr(value)
    return "0"


class _Families:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[str, Mapping[str, str], Any]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{suffix}{'{' + text + '}' if text else ''} {_num(value)}")


def exposition(status: Mapping[str, Any], loads: Mapping[str, Any]) -> str:
    out = _Families()
    sources = list(SOURCE_NAMES.values())
    extra = sorted((set(loads.get("loads") or {}) | set(loads.get("failures") or {}))
                   - set(sources))
    sources += extra
    ok_loads = loads.get("loads") or {}
    failures = loads.get("failures") or {}
    out.family("kmodd_up", "gauge", "1 when kmodd answered on its control socket.",
               [("", {}, 1)])
    out.family("kmodd_uptime_seconds", "gauge", "Seconds since kmodd started.",
               [("", {}, float(status.get("uptime") or 0.0))])
    out.family("kmodd_module_loads_total", "counter",
               "Modules kmodd inserted, by the source that asked for them.",
               [("", {"source": s}, int(ok_loads.get(s, 0))) for s in sources])
    out.family("kmodd_module_load_failures_total", "counter",
               "Module loads that failed, by the source that asked for them.",
               [("", {"source": s}, int(failures.get(s, 0))) for s in sources])
    outcomes = status.get("outcomes") or {}
    statuses = list(OUTCOME_STATUSES) + sorted(set(outcomes) - set(OUTCOME_STATUSES))
    out.family("kmodd_requests_total", "counter",
               "Requests answered (uevents, coldplug, kernel, admin, modules-load.d), by outcome.",
               [("", {"outcome": s}, int(outcomes.get(s, 0))) for s in statuses])
    out.family("kmodd_modules_in_backoff", "gauge",
               "Modules whose last load failed and that are retried only after a delay.",
               [("", {}, int(status.get("backoff") or 0))])
    out.family("kmodd_modules_loaded", "gauge",
               "Modules loaded by kmodd and still loaded.",
               [("", {}, int(status.get("loaded_by_kmodd") or 0))])
    out.family("kmodd_requests_pending", "gauge", "Distinct requests not yet answered.",
               [("", {}, int(status.get("pending") or 0))])
    autoclean = status.get("autoclean") or {}
    out.family("kmodd_autoclean_unloads_total", "counter",
               "Idle modules autoclean unloaded.",
               [("", {}, int(autoclean.get("unloaded") or 0))])
    out.family("kmodd_coldplug_done", "gauge", "1 once coldplug has finished (or is disabled).",
               [("", {}, 0 if status.get("coldplug") == "running" else 1)])
    hist = loads.get("init_seconds") or Histogram().to_dict()
    samples: list[tuple[str, Mapping[str, str], Any]] = [
        ("_bucket", {"le": str(le)}, int(n)) for le, n in hist.get("buckets") or ()]
    samples += [("_sum", {}, float(hist.get("sum") or 0.0)),
                ("_count", {}, int(hist.get("count") or 0))]
    out.family("kmodd_module_init_seconds", "histogram",
               "Time modules spent in finit_module (their init), successful loads only.",
               samples)
    return "\n".join(out.lines) + "\n"
