"""The load log on Debian's real kernel, in ONE boot: modules-load.d served by
kmodd through its pool, and blame / critical-chain / plot / --prometheus
agreeing with the daemon's own log of the same coldplug.

The daemon starts in the guest (no udevd) with a modules-load.d file listing
a few network modules (vxlan brings two dependencies) and a masked file;
after `kmodctl settle` every kmodctl view is taken in one guest round trip
and checked on the host (the plot rendered by the host's headless Chromium).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd.daemon.loadlog import LoadRecord, critical_chain
from testbed.vm import VM
from tests.unit.test_plot import render_in_chromium
from tests.unit.test_prometheus import parse, value

LOG = "/tmp/kmodd-analyze.log"
CONF = "/tmp/kmodd-analyze.toml"
LISTED = ("dummy", "vxlan", "veth", "tun")
LIST_FILE = "/etc/modules-load.d/50-kmodd-vm.conf"
# vxlan's dependencies on this kernel (modules.dep), loaded before it.
VXLAN_DEPS = ("udp_tunnel", "ip6_udp_tunnel")
# Module lines look like
# "HH:MM:SS.mmm kmodd.daemon.service: INFO: loaded e1000 for pci:... in 12 ms".
LOADED_LINE = re.compile(r"kmodd\.daemon\.service: INFO: loaded (\S+) for (.*?) in (\d+) ms")


def sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in re.finditer(r"@@(\S+)\n(.*?)(?=\n@@\S+\n|\Z)", text, re.S):
        out[m.group(1)] = m.group(2)
    return out


@pytest.fixture(scope="module")
def facts(fresh_vm: Callable[..., VM]) -> Iterator[dict[str, Any]]:
    vm = fresh_vm()
    checkout = str(vm.share)
    script = f"""
set -e
mkdir -p /etc/modules-load.d /usr/lib/modules-load.d
printf '# kmodd VM test\\ndummy\\nvxlan\\n; a comment\\nveth\\ntun\\n' > {LIST_FILE}
printf 'nbd\\n' > /usr/lib/modules-load.d/60-kmodd-masked.conf
ln -sf /dev/null /etc/modules-load.d/60-kmodd-masked.conf
echo {checkout}/contrib/kmodd-request > /proc/sys/kernel/modprobe
printf 'autoclean_interval = 0\\n' > {CONF}
setsid {checkout}/.venv/bin/kmodd --config {CONF} --no-journal </dev/null >{LOG} 2>&1 &
for i in $(seq 600); do [ -S /run/kmodd/control ] && break; sleep 0.1; done
set +e
kmodctl settle --timeout 900; echo "settle=$?"
echo @@modules; cut -d' ' -f1 /proc/modules
echo @@loads; python3 -c 'import json,socket
s=socket.socket(socket.AF_UNIX); s.connect("/run/kmodd/control")
s.sendall(b"{{\\"op\\": \\"loads\\"}}\\n"); f=s.makefile("rb"); print(f.readline().decode())'
echo @@blame; kmodctl blame --json
echo @@blametext; kmodctl blame
echo @@chain; kmodctl critical-chain --json
echo @@chaintext; kmodctl critical-chain
echo @@why; kmodctl why vxlan --json
echo @@whytext; kmodctl why vxlan
echo @@prom; kmodctl status --prometheus
echo @@plot; kmodctl plot
echo @@log; cat {LOG}
echo @@end
"""
    r = vm.run(script, timeout=1500)
    got = sections(r.stdout)
    assert "end" in got, f"guest script failed (rc {r.rc}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "settle=0" in r.stdout.split("@@modules")[0], r.stdout[-3000:]
    facts: dict[str, Any] = {
        "modules": set(got["modules"].split()),
        "loads": json.loads(got["loads"]),
        "blame": json.loads(got["blame"]), "blametext": got["blametext"],
        "chain": json.loads(got["chain"]), "chaintext": got["chaintext"],
        "why": json.loads(got["why"]), "whytext": got["whytext"],
        "prom": got["prom"] + "\n" if not got["prom"].endswith("\n") else got["prom"],
        "plot": got["plot"], "log": got["log"]}
    yield facts


def test_modules_load_d_is_served_through_the_pool(facts: dict[str, Any]) -> None:
    mods = facts["modules"]
    assert set(LISTED) | set(VXLAN_DEPS) <= mods
    assert "nbd" not in mods                       # its file is masked by a /dev/null link
    why = facts["why"]
    assert why["kind"] == "modules-load" and why["requested_by"] == f"{LIST_FILE}:3"
    assert f"listed in:    {LIST_FILE}:3" in facts["whytext"]
    records = [LoadRecord.from_dict(r) for r in facts["loads"]["records"]]
    listed = {r.module: r for r in records if r.kind == "modules-load"}
    assert set(listed) == set(LISTED) | set(VXLAN_DEPS)
    # All submitted at once, dependencies first, the rest not waiting on each other.
    asked = [r.requested_at for r in listed.values()]
    assert max(asked) - min(asked) < 0.5
    assert listed["vxlan"].start >= max(listed[d].end for d in VXLAN_DEPS)
    for name in ("dummy", "veth", "tun"):
        assert listed[name].waited_for == ()
    # In parallel: some listed loads were inside the kernel at the same time.
    spans = sorted((r.start, r.end) for r in listed.values())
    overlaps = sum(1 for (_, e1), (s2, _) in itertools.pairwise(spans) if s2 < e1)
    print(f"\nmodules-load.d: {len(listed)} loads, {overlaps} overlapping the previous one; "
          f"first request to last end {max(r.end for r in listed.values()) - min(asked):.3f} s")
    assert overlaps >= 1
    assert "modules-load-end" in facts["loads"]["marks"]


def test_blame_agrees_with_the_daemons_load_log(facts: dict[str, Any]) -> None:
    logged: dict[str, list[int]] = {}
    for m in LOADED_LINE.finditer(facts["log"]):
        logged.setdefault(m.group(1), []).append(int(m.group(3)))
    blame = [r for r in facts["blame"] if r["status"] == "loaded"]
    assert len(blame) >= 15, facts["blametext"]
    assert sorted(r["module"] for r in blame) == sorted(
        name for name, times in logged.items() for _ in times)
    for r in blame:
        # The log rounds to the millisecond.
        assert any(abs(r["in_kernel"] * 1000 - ms) <= 1.0 for ms in logged[r["module"]]), r
    kernel_times = [r["in_kernel"] for r in facts["blame"]]
    assert kernel_times == sorted(kernel_times, reverse=True)
    top = facts["blametext"].splitlines()[1].split()
    assert top[2] == facts["blame"][0]["module"]
    print("\nkmodctl blame (top 8):\n" + "\n".join(facts["blametext"].splitlines()[:9]))


def test_critical_chain_agrees_with_the_same_records(facts: dict[str, Any]) -> None:
    records = [LoadRecord.from_dict(r) for r in facts["loads"]["records"]]
    chain = facts["chain"]["chain"]
    assert chain, facts["chaintext"]
    coldplug = [r for r in records if r.kind == "coldplug"]
    last = max(coldplug, key=lambda r: r.end)
    assert chain[0]["module"] == last.module and chain[0]["end"] == last.end
    # The client's chain is what the records give.
    assert [c["module"] for c in chain] == [
        link.record.module for link in critical_chain(records)]
    for above, link in itertools.pairwise(chain):
        if link["reason"] == "dependency":
            assert link["module"] in above["waited_for"]
            assert link["end"] <= above["deps_ready_at"] + 0.011
        else:
            assert link["reason"] == "async"
            assert link["start"] < above["start"] < link["end"]
            assert abs(link["end"] - above["end"]) <= 0.011
    text = facts["chaintext"].splitlines()
    assert text[3].startswith("coldplug done @")
    assert text[4].startswith(f"└─{chain[0]['module']} @")
    print("\nkmodctl critical-chain:\n" + facts["chaintext"])


def test_the_plot_of_this_coldplug_renders(facts: dict[str, Any], tmp_path: Path) -> None:
    svg = facts["plot"]
    assert svg.startswith("<?xml")
    page = render_in_chromium(svg, tmp_path)
    records = sorted(facts["loads"]["records"],
                     key=lambda r: (r["requested_at"], r["start"], r["module"]))
    assert [r["module"] for r in page["rows"]] == [r["module"] for r in records]
    tops = [r["labelBox"]["top"] for r in page["rows"]]
    assert tops == sorted(tops)
    bold = {r["module"] for r in page["rows"] if int(r["bold"]) >= 700}
    assert bold == {c["module"] for c in facts["chain"]["chain"]}
    legend = {item["text"] for item in page["legend"]}
    assert {"in the kernel: coldplug", "in the kernel: modules-load.d",
            "waiting for dependencies", "critical chain"} <= legend
    fills = {r["module"]: r["fill"] for r in page["rows"]}
    assert fills["vxlan"] != fills[facts["chain"]["chain"][0]["module"]]
    print(f"\nplot: {len(page['rows'])} rows, kept at {tmp_path / 'plot.svg'}")


def test_prometheus_counts_are_the_daemons(facts: dict[str, Any]) -> None:
    _, series = parse(facts["prom"])
    records = facts["loads"]["records"]
    for source in ("coldplug", "modules-load.d", "hotplug", "kernel request", "admin"):
        mine = [r for r in records if r["source"] == source]
        assert value(series, "kmodd_module_loads_total", source=source) == sum(
            1 for r in mine if r["status"] != "failed")
        assert value(series, "kmodd_module_load_failures_total", source=source) == sum(
            1 for r in mine if r["status"] == "failed")
    assert value(series, "kmodd_module_loads_total", source="modules-load.d") == 6
    assert value(series, "kmodd_module_init_seconds_count") == sum(
        1 for r in records if r["status"] == "loaded")
