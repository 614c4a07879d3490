"""``kmodctl plot``: an SVG timeline of the loads, one row per load, in the
order they were requested (what ``systemd-analyze plot`` draws for units).

Each row shows the request (a tick), the wait for dependencies (grey), the
wait for a free worker (pale) and the time in the kernel (coloured by
source); failures are red with a cross, the critical chain is outlined and
its labels bold.  Plain SVG 1.1, no script, no external resources.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from kmodd.daemon.loadlog import SOURCE_NAMES, ChainLink, LoadRecord, fmt_seconds

SOURCE_COLOURS = {"coldplug": "#4e79a7", "hotplug": "#59a14f", "kernel request": "#f28e2b",
                  "admin": "#b07aa1", "modules-load.d": "#76b7b2"}
OTHER_COLOUR = "#9c755f"
FAILED_COLOUR = "#e15759"
DEP_WAIT_COLOUR = "#b8b8b8"
RESOLVING_COLOUR = "#c9d6e3"
QUEUED_COLOUR = "#e6e6e6"

LABEL_W = 220        # module names, right-aligned before the chart
CHART_W = 900
TEXT_W = 260         # durations and errors after the bars
ROW_H = 20
TOP = 128            # title, legend and the upper time axis
BOTTOM = 64          # the lower time axis and the marks' names


def _nice_step(span: float, most: int = 12) -> float:
    """A round tick interval (1, 2 or 5 x 10^n) giving at most ``most`` ticks."""
    raw = span / most
    exp = math.floor(math.log10(raw)) if raw > 0 else -3
    for mult in (1, 2, 5, 10):
        step = mult * 10.0 ** exp
        if span / step <= most:
            return step
    return 10.0 ** (exp + 1)


def render_svg(records: Sequence[LoadRecord], chain: Sequence[ChainLink] = (), *,
               marks: Mapping[str, float] | None = None,
               anchor: Mapping[str, Any] | None = None,
               title: str = "kmodd: module loads") -> str:
    marks = dict(marks or {})
    rows = sorted(records, key=lambda r: (r.requested_at, r.start, r.module))
    critical = {id(link.record) for link in chain}
    critical_keys = {(link.record.module, link.record.start) for link in chain}
    starts = [r.requested_at for r in rows] + [v for k, v in marks.items() if k.endswith("start")]
    ends = [r.end for r in rows] + list(marks.values())
    t0 = min(starts) if starts else 0.0
    t1 = max(ends) if ends else t0 + 1.0
    span = max(t1 - t0, 0.001)
    step = _nice_step(span)
    span = math.ceil(span / step - 1e-9) * step

    def x(t: float) -> float:
        return LABEL_W + (t - t0) / span * CHART_W

    width = LABEL_W + CHART_W + TEXT_W
    height = TOP + max(1, len(rows)) * ROW_H + BOTTOM
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        '<rect x="0" y="0" width="100%" height="100%" fill="#ffffff"/>',
        f'<text id="title" x="10" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
    ]
    failed = sum(1 for r in rows if r.failed)
    sub = f"{len(rows)} load(s), {failed} failed, from @{fmt_seconds(t0)} to @{fmt_seconds(t1)}"
    if anchor and "wall" in anchor and "monotonic" in anchor:
        wall = float(anchor["wall"]) + (t0 - float(anchor["monotonic"]))
        sub += time.strftime(" (%Y-%m-%d %H:%M:%S)", time.localtime(wall))
    if chain:
        sub += f"; critical chain: {' ← '.join(link.record.module for link in chain)}"
    out.append(f'<text id="subtitle" x="10" y="40" fill="#444444">{escape(sub)}</text>')
    out += _legend(rows, 10, 58)
    out += _axis(t0, span, step, x, TOP - 8, height - BOTTOM)
    for i, (mark, when) in enumerate(sorted(marks.items(), key=lambda kv: kv[1])):
        mx = x(when)
        out.append(f'<line class="mark" x1="{mx:.1f}" y1="{TOP - 4}" x2="{mx:.1f}" '
                   f'y2="{height - BOTTOM}" stroke="#333333" stroke-dasharray="4 3"/>')
        # Staggered: marks close in time would print over each other.
        out.append(f'<text class="mark-label" x="{mx + 3:.1f}" '
                   f'y="{height - BOTTOM + 28 + 12 * (i % 3)}" '
                   f'font-size="10" fill="#333333">{escape(mark)}</text>')
    for i, r in enumerate(rows):
        is_crit = id(r) in critical or (r.module, r.start) in critical_keys
        out += _row(r, i, TOP + i * ROW_H, x, is_crit)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend(rows: Sequence[LoadRecord], x0: float, y0: float) -> list[str]:
    out = ['<g id="legend">']
    items: list[tuple[str, str, str]] = []
    for source in SOURCE_NAMES.values():
        items.append((f"in the kernel: {source}", SOURCE_COLOURS[source], "none"))
    if any(r.source not in SOURCE_COLOURS for r in rows):
        items.append(("in the kernel: other", OTHER_COLOUR, "none"))
    items += [("being resolved", RESOLVING_COLOUR, "none"),
              ("waiting for dependencies", DEP_WAIT_COLOUR, "none"),
              ("waiting for a worker", QUEUED_COLOUR, "none"),
              ("failed", FAILED_COLOUR, "none"),
              ("critical chain", "#ffffff", "#000000")]
    per_row = 5
    for i, (label, fill, stroke) in enumerate(items):
        lx = x0 + (i % per_row) * 230
        ly = y0 + (i // per_row) * 18
        sw = 2 if stroke != "none" else 0
        out.append(f'<rect x="{lx}" y="{ly}" width="14" height="11" fill="{fill}" '
                   f'stroke="{stroke}" stroke-width="{sw}"/>')
        out.append(f'<text class="legend-item" x="{lx + 20}" y="{ly + 10}">'
                   f"{escape(label)}</text>")
    out.append("</g>")
    return out


def _axis(t0: float, span: float, step: float, x: Any, y_top: float,
          y_bottom: float) -> list[str]:
    out = ['<g id="axis" font-size="10" fill="#555555">']
    n = round(span / step)
    for k in range(n + 1):
        t = t0 + k * step
        tx = x(t)
        out.append(f'<line x1="{tx:.1f}" y1="{y_top}" x2="{tx:.1f}" y2="{y_bottom}" '
                   f'stroke="#eeeeee"/>')
        label = fmt_seconds(k * step) if k else "0"
        for ly in (y_top - 4, y_bottom + 14):
            out.append(f'<text class="tick" x="{tx:.1f}" y="{ly}" '
                       f'text-anchor="middle">{escape("+" + label if k else label)}</text>')
    out.append(f'<text class="axis-title" x="{LABEL_W + CHART_W / 2}" y="{y_top - 18}" '
               f'text-anchor="middle">time since @{escape(fmt_seconds(t0))} '
               f"(seconds since boot)</text>")
    out.append("</g>")
    return out


def _row(r: LoadRecord, i: int, y: float, x: Any, critical: bool) -> list[str]:
    colour = FAILED_COLOUR if r.failed else SOURCE_COLOURS.get(r.source, OTHER_COLOUR)
    cls = "row" + (" critical" if critical else "") + (" failed" if r.failed else "")
    tip = (f"{r.module}: {r.source} {r.key}; requested @{fmt_seconds(r.requested_at)}, "
           f"resolved in {fmt_seconds(r.resolving)}, "
           f"dependencies waited {fmt_seconds(r.dep_wait)}, queued {fmt_seconds(r.queued)}, "
           f"in the kernel {fmt_seconds(r.in_kernel)}")
    if r.failed:
        tip += f"; FAILED: {r.error or 'failed'}"
    out = [f'<g class={quoteattr(cls)} data-module={quoteattr(r.module)} '
           f'data-source={quoteattr(r.source)}>', f"<title>{escape(tip)}</title>"]
    if i % 2:
        out.append(f'<rect x="0" y="{y}" width="{LABEL_W + CHART_W + TEXT_W}" '
                   f'height="{ROW_H}" fill="#f7f7f7"/>')
    weight = ' font-weight="bold"' if critical else ""
    out.append(f'<text class="label" x="{LABEL_W - 8}" y="{y + 14}" text-anchor="end"'
               f"{weight}>{escape(r.module)}</text>")
    bar_y, bar_h = y + 4, ROW_H - 8
    xr, xp = x(r.requested_at), x(r.planned)
    xd, xs, xe = x(r.deps_ready_at), x(r.start), x(r.end)
    out.append(f'<line class="requested" x1="{xr:.1f}" y1="{y + 2}" x2="{xr:.1f}" '
               f'y2="{y + ROW_H - 2}" stroke="#555555"/>')
    if xp - xr >= 0.5:
        out.append(f'<rect class="resolving" x="{xr:.1f}" y="{bar_y + 2}" '
                   f'width="{xp - xr:.1f}" height="{bar_h - 4}" fill="{RESOLVING_COLOUR}"/>')
    if xd - xp >= 0.5:
        out.append(f'<rect class="dep-wait" x="{xp:.1f}" y="{bar_y + 2}" '
                   f'width="{xd - xp:.1f}" height="{bar_h - 4}" fill="{DEP_WAIT_COLOUR}"/>')
    if xs - xd >= 0.5:
        out.append(f'<rect class="queued" x="{xd:.1f}" y="{bar_y + 2}" '
                   f'width="{xs - xd:.1f}" height="{bar_h - 4}" fill="{QUEUED_COLOUR}"/>')
    stroke = ' stroke="#000000" stroke-width="2"' if critical else ""
    out.append(f'<rect class="kernel" x="{xs:.1f}" y="{bar_y}" width="{max(1.5, xe - xs):.1f}" '
               f'height="{bar_h}" fill="{colour}"{stroke}/>')
    text = fmt_seconds(r.in_kernel)
    if r.failed:
        text = f"✗ failed after {text}: {r.error or 'failed'}"
        if len(text) > 60:
            text = text[:57] + "..."
    fill = FAILED_COLOUR if r.failed else "#222222"
    out.append(f'<text class="duration" x="{max(xe, xs + 1.5) + 5:.1f}" y="{y + 14}" '
               f'fill="{fill}"{weight}>{escape(text)}</text>')
    out.append("</g>")
    return out
