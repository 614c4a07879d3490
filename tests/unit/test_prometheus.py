"""kmodctl status --prometheus: strictly parsed, and the numbers are the daemon's."""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.cli.prometheus import exposition
from kmodd.daemon.requests import Request
from tests.unit.test_service import Env, in_thread, stop

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? (\S+)$")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Series]:
    """A strict reader of the text format 0.0.4: every sample belongs to a
    family declared by HELP and TYPE just before it, families are contiguous and
    unique, no series repeats, histograms are cumulative and end in +Inf = _count."""
    assert text.endswith("\n") and "\r" not in text
    types: dict[str, str] = {}
    series: Series = {}
    current: str | None = None
    helped: set[str] = set()
    for line in text.splitlines():
        assert line, "blank line"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(NAME, name) and name not in helped, line
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in types and kind in TYPES, line
            types[name] = kind
            current = name
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, value = m.group(1), m.group(m.lastindex or 0)
        assert current is not None
        family = current
        if types[family] == "histogram":
            assert name in (f"{family}_bucket", f"{family}_sum", f"{family}_count"), line
        else:
            assert name == family, f"{line!r} outside its family {family}"
        labels = tuple(re.findall(LABEL, line[len(name):line.rfind(" ")]))
        assert len({k for k, _ in labels}) == len(labels), line
        number = float(value)        # raises on anything but a float literal / +Inf / NaN
        key = (name, labels)
        assert key not in series, f"duplicate series {line!r}"
        series[key] = number
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets = [(dict(lb)["le"], v) for (n, lb), v in series.items()
                   if n == f"{family}_bucket"]
        assert buckets and buckets[-1][0] == "+Inf"
        bounds = [math.inf if le == "+Inf" else float(le) for le, _ in buckets]
        counts = [v for _, v in buckets]
        assert bounds == sorted(bounds) and counts == sorted(counts)
        assert counts[-1] == series[(f"{family}_count", ())]
    return types, series


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, tuple(labels.items()))]


def test_strict_parser_rejects_what_prometheus_would() -> None:
    good = "# HELP a x\n# TYPE a counter\na 1\n"
    parse(good)
    for bad in ("a 1\n", "# HELP a x\n# TYPE a counter\na{b=\"1} 1\n",
                "# HELP a x\n# TYPE a counter\na 1\na 2\n", "# HELP a x\n# TYPE a counter\na one\n",
                "# HELP a x\n# TYPE a counter\nb 1\n"):
        with pytest.raises((AssertionError, ValueError)):
            parse(bad)


def test_label_values_are_escaped() -> None:
    text = exposition({"outcomes": {'we"ird\\\n': 2}}, {})
    _, series = parse(text)
    assert value(series, "kmodd_requests_total", outcome='we\\"ird\\\\\\n') == 2


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    d = Path(tempfile.mkdtemp(prefix="kmodd-prom-", dir="/tmp"))
    yield Env(tmp_path, d)
    shutil.rmtree(d, ignore_errors=True)


def test_prometheus_counts_match_the_daemon(env: Env, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    from kmodd.cli import kmodctl
    env.kernel.load_errors["solo"] = 19
    env.kernel.init_delays["slow"] = 0.03
    svc = env.service(backoff_initial=600.0)
    t, rc = in_thread(svc)
    env.notifier.wait_for("READY")
    assert svc.submit(Request("admin", "a")).result(10).status == "loaded"      # a + core
    assert svc.submit(Request("coldplug", "pci:v8086d100E", "/devices/n", "coldplug")
                      ).result(10).status == "loaded"
    assert svc.submit(Request("kernel", "slow")).result(10).status == "loaded"
    assert svc.submit(Request("modalias", "solo")).result(10).status == "failed"
    assert svc.submit(Request("modalias", "nothing")).result(10).status == "unresolved"
    sock = str(env.sock)
    assert kmodctl.main(["status", "--prometheus", "--socket", sock]) == 0
    types, series = parse(capsys.readouterr().out)
    assert types["kmodd_module_loads_total"] == "counter"
    assert types["kmodd_module_init_seconds"] == "histogram"
    assert value(series, "kmodd_up") == 1
    assert value(series, "kmodd_module_loads_total", source="admin") == 2
    assert value(series, "kmodd_module_loads_total", source="coldplug") == 1
    assert value(series, "kmodd_module_loads_total", source="kernel request") == 1
    assert value(series, "kmodd_module_loads_total", source="hotplug") == 0
    assert value(series, "kmodd_module_loads_total", source="modules-load.d") == 0
    assert value(series, "kmodd_module_load_failures_total", source="hotplug") == 1
    assert value(series, "kmodd_module_load_failures_total", source="admin") == 0
    assert value(series, "kmodd_requests_total", outcome="loaded") == 3
    assert value(series, "kmodd_requests_total", outcome="failed") == 1
    assert value(series, "kmodd_requests_total", outcome="unresolved") == 1
    assert value(series, "kmodd_modules_in_backoff") == 1
    assert value(series, "kmodd_modules_loaded") == 4
    assert value(series, "kmodd_autoclean_unloads_total") == 0
    assert value(series, "kmodd_module_init_seconds_count") == 4
    assert value(series, "kmodd_module_init_seconds_sum") >= 0.03
    # Each bucket counts the daemon's own recorded init times up to its bound.
    from kmodd.daemon.control import Client
    with Client(sock, timeout=10) as c:
        times = {r["module"]: r["in_kernel"] for r in c.call("loads")["records"]
                 if r["status"] == "loaded"}
    assert sorted(times) == ["a", "core", "nic", "slow"] and times["slow"] >= 0.03
    for (name, labels), count in series.items():
        if name == "kmodd_module_init_seconds_bucket":
            le = float(dict(labels)["le"])
            assert count == sum(1 for v in times.values() if v <= le), labels
    assert value(series, "kmodd_module_init_seconds_bucket", le="0.025") <= 3
    assert value(series, "kmodd_module_init_seconds_sum") == pytest.approx(
        sum(times.values()))
    # Autoclean unloads show up: two sweeps with no idle time to wait.
    svc.autoclean.policy = type(svc.autoclean.policy)(0.0, frozenset())
    svc.loop.call_soon_threadsafe(svc.sweep)
    svc.loop.call_soon_threadsafe(svc.sweep)
    for _ in range(500):
        if svc.autoclean.unloaded_total:
            break
        threading_wait(0.01)
    assert kmodctl.main(["status", "--prometheus", "--socket", sock]) == 0
    _, series = parse(capsys.readouterr().out)
    assert value(series, "kmodd_autoclean_unloads_total") == svc.autoclean.unloaded_total > 0
    stop(svc, t, rc)


def threading_wait(seconds: float) -> None:
    import threading
    threading.Event().wait(seconds)
