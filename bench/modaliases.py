"""Realistic modaliases made from a module tree's own alias patterns.

Each pattern is instantiated the way a device would present it: a '*' that
stands for a hexadecimal field (``v*``, ``sd*``, ``bc*`` ...) gets random
uppercase hex of the width the bus uses, learnt from the literal fields of the
other patterns of that bus; other wildcards get short plain text.  A share of
the results is mutated (a character changed, the end cut or extended) so
misses are measured too.  Filling fields with arbitrary text instead makes
glibc's fnmatch backtrack heavily and would flatter kmodd unfairly.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path

_FIELD = re.compile(r"([a-z]+)([0-9A-F]+)(?=[a-z*]|$)")
_TAG_BEFORE_STAR = re.compile(r"([a-z]+)$")
_WORDS = ["", "0", "1", "serial", "<NULL>", "generic", "PNP0C09"]


def read_patterns(moddir: Path) -> list[str]:
    """Alias patterns as modules.alias lists them (kmodd's reader is not involved)."""
    out = []
    for line in (moddir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            out.append(parts[1])
    return out


def field_widths(patterns: list[str]) -> dict[tuple[str, str], int]:
    """(bus, tag) -> the usual width of the hex value after that tag."""
    seen: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    for pat in patterns:
        bus, colon, rest = pat.partition(":")
        if not colon:
            continue
        for tag, value in _FIELD.findall(rest):
            seen[(bus, tag)][len(value)] += 1
    return {key: counts.most_common(1)[0][0] for key, counts in seen.items()}


def instantiate(pattern: str, widths: dict[tuple[str, str], int], rng: random.Random) -> str:
    bus = pattern.partition(":")[0]
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            tag = _TAG_BEFORE_STAR.search("".join(out))
            width = widths.get((bus, tag.group(1))) if tag else None
            if width is not None:
                out.append("".join(rng.choice("0123456789ABCDEF") for _ in range(width)))
            else:
                out.append(rng.choice(_WORDS))
        elif c == "?":
            out.append(rng.choice("0123456789ABCDEF"))
        elif c == "[":
            close = pattern.find("]", i + 2)
            if close < 0:
                out.append(c)
            else:
                body = pattern[i + 1:close]
                if body[:1] in ("!", "^"):
                    out.append("~")
                elif len(body) >= 3 and body[1] == "-":
                    out.append(chr(rng.randint(ord(body[0]), ord(body[2]))))
                else:
                    out.append(body[0])
                i = close
        else:
            out.append(c)
        i += 1
    return "".join(out)


def mutate(alias: str, rng: random.Random) -> str:
    if not alias:
        return "x"
    pos = rng.randrange(len(alias))
    kind = rng.randrange(3)
    if kind == 0:
        return alias[:pos] + rng.choice("0123456789ABCDEF") + alias[pos + 1:]
    if kind == 1:
        return alias[:max(pos, 1)]
    return alias + rng.choice(["0", "00", "x"])


def make_modaliases(moddir: Path, count: int, seed: int = 1,
                    mutate_share: float = 0.2) -> list[str]:
    patterns = read_patterns(moddir)
    widths = field_widths(patterns)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        alias = instantiate(rng.choice(patterns), widths, rng)
        if rng.random() < mutate_share:
            alias = mutate(alias, rng)
        out.append(alias)
    return out
