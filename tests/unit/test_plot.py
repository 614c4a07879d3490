"""kmodctl plot's SVG, rendered by headless Chromium: what the page shows
(rows and their order, labels, bars, legend, axis), measured by the browser's
own layout, never pixels."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from kmodd.cli.plot import render_svg
from kmodd.daemon.loadlog import LoadRecord, critical_chain

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
                  "--virtual-time-budget=10000"]

# Loads the SVG file as a document of its own (XML parser, like opening
# boot.svg in the browser), then reports the layout the browser computed.
PROBE = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="f" src="plot.svg" style="border:0;width:4000px;height:4000px"></iframe>
<pre id="out">not rendered</pre>
<script>
function box(el) { const b = el.getBoundingClientRect();
  return {left: b.left, right: b.right, top: b.top, bottom: b.bottom, width: b.width}; }
document.getElementById('f').addEventListener('load', () => {
  const doc = document.getElementById('f').contentDocument;
  const svg = doc.documentElement;
  const rows = [...doc.querySelectorAll('g.row')].map(g => {
    const label = g.querySelector('text.label'), bar = g.querySelector('rect.kernel');
    const dur = g.querySelector('text.duration');
    return {module: g.getAttribute('data-module'), label: label.textContent,
            labelBox: box(label), barBox: box(bar), durBox: box(dur),
            duration: dur.textContent, fill: getComputedStyle(bar).fill,
            bold: getComputedStyle(label).fontWeight,
            cls: g.getAttribute('class')};
  });
  const legend = [...doc.querySelectorAll('#legend text')].map(
    t => ({text: t.textContent, box: box(t)}));
  const ticks = [...doc.querySelectorAll('text.tick')].map(t => t.textContent);
  document.getElementById('out').textContent = JSON.stringify({
    root: svg.tagName, svgBox: box(svg), rows, legend, ticks,
    title: doc.getElementById('title').textContent,
    subtitle: doc.getElementById('subtitle').textContent});
});
</script></body></html>
"""


def render_in_chromium(svg: str, tmp: Path) -> dict[str, Any]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (scripts/install-deps.sh installs it)"
    (tmp / "plot.svg").write_text(svg)
    (tmp / "probe.html").write_text(PROBE)
    profile = tempfile.mkdtemp(prefix="kmodd-chromium-")
    try:
        proc = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
             (tmp / "probe.html").as_uri()],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no page from chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    text = m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace(
        "&gt;", ">").replace("&amp;", "&")
    assert text != "not rendered", "the SVG never loaded in the browser"
    result: dict[str, Any] = json.loads(text)
    return result


def rec(module: str, kind: str, requested: float, ready: float, start: float, end: float,
        **kw: Any) -> LoadRecord:
    return LoadRecord(module=module, kind=kind, key=f"k:{module}", status=kw.pop("status",
                                                                                "loaded"),
                      requested_at=requested, deps_ready_at=ready, start=start, end=end, **kw)


def boot_records() -> list[LoadRecord]:
    return [
        rec("scsi_mod", "coldplug", 10.0, 10.0, 10.01, 10.3, role="dependency"),
        rec("ahci", "coldplug", 10.0, 10.3, 10.31, 14.0, waited_for=("scsi_mod",)),
        rec("e1000", "modalias", 10.2, 10.2, 10.2, 10.5),
        rec("sd_mod", "coldplug", 11.0, 11.0, 11.0, 14.004),
        rec("dummy", "kernel", 12.0, 12.0, 12.0, 12.01),
        rec("loop", "admin", 12.5, 12.5, 12.6, 12.7),
        rec("br_netfilter", "modules-load", 10.05, 10.05, 10.1, 10.2,
            requested_by="/etc/modules-load.d/net.conf:2"),
        rec("broken", "coldplug", 10.4, 10.4, 10.4, 10.45, status="failed",
            error="broken: No such device", errno=19),
    ]


def test_the_plot_reads_at_a_glance_in_a_browser(tmp_path: Path) -> None:
    records = boot_records()
    chain = critical_chain(records)
    assert [c.record.module for c in chain] == ["sd_mod", "ahci", "scsi_mod"]
    svg = render_svg(records, chain, marks={"coldplug-start": 9.9, "coldplug-end": 14.01},
                     anchor={"monotonic": 10.0, "wall": 1_700_000_000.0})
    ET.fromstring(svg.split("?>", 1)[1])            # well-formed XML
    page = render_in_chromium(svg, tmp_path)
    assert page["root"] == "svg"
    assert page["title"] == "kmodd: module loads"
    assert "8 load(s), 1 failed" in page["subtitle"]
    rows = page["rows"]
    # One row per load, in the order they were requested, top to bottom.
    expected = [r.module for r in sorted(records, key=lambda r: r.requested_at)]
    assert [r["module"] for r in rows] == expected
    assert [r["label"] for r in rows] == expected
    tops = [r["labelBox"]["top"] for r in rows]
    assert tops == sorted(tops) and len(set(tops)) == len(tops)
    svg_box = page["svgBox"]
    for r in rows:
        lab, bar, dur = r["labelBox"], r["barBox"], r["durBox"]
        # Labels are drawn, inside the picture, left of every bar; the
        # duration text follows its bar.
        assert lab["width"] > 0 and lab["left"] >= svg_box["left"]
        assert lab["right"] <= bar["left"] and dur["left"] >= bar["right"]
        assert dur["right"] <= svg_box["right"] and lab["bottom"] <= svg_box["bottom"]
        assert bar["width"] >= 1
    by = {r["module"]: r for r in rows}
    # Time runs left to right: a later start is further right, a longer init wider.
    assert by["scsi_mod"]["barBox"]["left"] < by["ahci"]["barBox"]["left"] \
        < by["sd_mod"]["barBox"]["left"] < by["loop"]["barBox"]["left"]
    assert by["ahci"]["barBox"]["width"] > 10 * by["e1000"]["barBox"]["width"]
    # Coloured by source; the failure is red and says so; the chain is bold.
    fills = {m: by[m]["fill"] for m in ("ahci", "e1000", "dummy", "loop", "br_netfilter")}
    assert len(set(fills.values())) == 5
    assert by["broken"]["fill"] == "rgb(225, 87, 89)"
    assert by["broken"]["duration"].startswith("✗ failed") and "No such device" in \
        by["broken"]["duration"]
    bold = {m for m, r in by.items() if int(r["bold"]) >= 700}
    assert bold == {"sd_mod", "ahci", "scsi_mod"}
    assert all("critical" in by[m]["cls"] for m in bold)
    # The legend names every source and mark, and its entries do not overlap.
    legend = [item["text"] for item in page["legend"]]
    for label in ("in the kernel: coldplug", "in the kernel: hotplug",
                  "in the kernel: kernel request", "in the kernel: admin",
                  "in the kernel: modules-load.d", "being resolved", "waiting for dependencies",
                  "waiting for a worker", "failed", "critical chain"):
        assert label in legend
    boxes = [item["box"] for item in page["legend"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = a["right"] <= b["left"] or b["right"] <= a["left"] \
                or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            assert apart, (a, b)
    # A time axis in round steps from the first request.
    assert page["ticks"][0] == "0" and "+1.000s" in page["ticks"]


def test_an_empty_log_still_renders() -> None:
    svg = render_svg([], [])
    root = ET.fromstring(svg.split("?>", 1)[1])
    assert root.tag.endswith("svg") and "0 load(s)" in svg


@pytest.mark.parametrize("name", ["a<b", 'q"uote', "x&y"])
def test_names_and_errors_are_escaped(name: str) -> None:
    r = rec(name, "admin", 1.0, 1.0, 1.0, 2.0, status="failed", error=f"{name}: <bad>")
    ET.fromstring(render_svg([r], []).split("?>", 1)[1])
