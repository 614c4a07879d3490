"""Alias patterns: glibc ``fnmatch(pattern, string, 0)`` semantics and kmod's result order.

Python's :mod:`fnmatch` differs from glibc (no backslash escapes, ``[^...]``
is not a negation, no ``[:class:]``), so patterns are translated here into
regular expressions that follow glibc in the C locale, the locale modprobe
runs in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WILDCARDS = "*?["

_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "blank": " \\t", "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": " \\t\\n\\r\\f\\v", "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}

NEVER = re.compile(r"(?!)")


def _esc(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def _bracket(pat: str, i: int) -> tuple[str, int] | None:
    """Translate the bracket expression whose '[' is at ``i``.

    Returns (regex, index after ']'), None when the '[' is unterminated (glibc
    then takes it as a literal '['), or ('(?!)', ...) when it can never match.
    """
    n = len(pat)
    p = i + 1
    negate = p < n and pat[p] in "!^"
    if negate:
        p += 1
    parts: list[str] = []
    never = False
    first = True
    while True:
        if p >= n:
            return None
        c = pat[p]
        p += 1
        if c == "]" and not first:
            break
        first = False
        if c == "\\":
            if p >= n:
                return None
            c = pat[p]
            p += 1
        elif c == "[" and p < n and pat[p] in ":.=":
            kind = pat[p]
            close = pat.find(kind + "]", p + 1)
            if close < 0:
                return None
            name = pat[p + 1:close]
            p = close + 2
            if kind == ":":
                if name not in _CLASSES:
                    never = True      # glibc: an unknown class name never matches
                else:
                    parts.append(_CLASSES[name])
                continue
            if len(name) != 1:        # C locale: only single-character symbols exist
                never = True
                continue
            c = name
        # a range c-end, unless the '-' is the last character before ']'
        if p + 1 < n and pat[p] == "-" and pat[p + 1] != "]":
            end = pat[p + 1]
            p += 2
            if end == "\\":
                if p >= n:
                    return None
                end = pat[p]
                p += 1
            if ord(c) <= ord(end):
                parts.append(f"{_esc(c)}-{_esc(end)}")
            continue
        parts.append(_esc(c))
    if never:
        return "(?!)", p
    if not parts:
        return ("(?s:.)" if negate else "(?!)"), p
    return f"[{'^' if negate else ''}{''.join(parts)}]", p


def translate(pattern: str) -> str | None:
    """Regex source equivalent to glibc fnmatch(pattern, s, 0); None if it never matches."""
    out: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            while i < n and pattern[i] == "*":
                i += 1
            out.append("(?s:.*)")
            continue
        if c == "?":
            out.append("(?s:.)")
        elif c == "[":
            br = _bracket(pattern, i)
            if br is not None:
                out.append(br[0])
                i = br[1]
                continue
            out.append(_esc(c))
        elif c == "\\":
            if i + 1 >= n:
                return None           # a trailing backslash never matches in glibc
            i += 1
            out.append(_esc(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


_compiled: dict[str, re.Pattern[str]] = {}


def compile_pattern(pattern: str) -> re.Pattern[str]:
    rx = _compiled.get(pattern)
    if rx is None:
        src = translate(pattern)
        rx = NEVER if src is None else re.compile(src)
        _compiled[pattern] = rx
    return rx


def fnmatch(pattern: str, string: str) -> bool:
    """glibc ``fnmatch(pattern, string, 0) == 0``."""
    return compile_pattern(pattern).fullmatch(string) is not None


def literal_len(pattern: str) -> int:
    """Length of the part kmod compares literally: up to the first '*', '?' or '['."""
    for k, ch in enumerate(pattern):
        if ch in WILDCARDS:
            return k
    return len(pattern)


def kmod_order(found: list[tuple[int, str, int, str]]) -> list[str]:
    """Order matches as index_mm_searchwild returns them.

    ``found`` holds (priority, pattern, position of the value in its node,
    value).  kmod walks the trie down the key's literal path; at each depth it
    visits the '*', '?' and '[' subtrees (children in ascending order, a
    node's values after its children) before going deeper, and the exact key
    last.  Each value is inserted before the first one of equal or higher
    priority, so equal priorities come out in reverse visiting order.
    """
    if len(found) <= 1:
        return [f[3] for f in found]
    visit = sorted(found, key=lambda f: (literal_len(f[1]), f[1] + "\uffff", f[2]),
                   reverse=True)
    visit.sort(key=lambda f: f[0])
    return [f[3] for f in visit]


class WildIndex:
    """Patterns with values, searched like kmod's wildcard index search.

    Patterns are bucketed by their literal prefix (what kmod walks literally
    in the trie); a key only needs the buckets whose prefix it starts with,
    and only the part after the prefix goes through the regex.
    """

    def __init__(self, items: Iterable[tuple[str, Iterable[tuple[int, str]]]]) -> None:
        # entry: (priority, pattern, position in node, value)
        self.exact: dict[str, list[tuple[int, str, int, str]]] = {}
        self.groups: dict[str, list[tuple[int, str, int, str]]] = {}
        for pattern, values in items:
            w = literal_len(pattern)
            bucket = self.exact if w == len(pattern) else self.groups
            lst = bucket.setdefault(pattern[:w], [])
            for pos, (prio, value) in enumerate(values):
                lst.append((prio, pattern, pos, value))
        self.lengths = sorted({len(k) for k in self.groups})

    def search(self, key: str) -> list[str]:
        found: list[tuple[int, str, int, str]] = []
        n = len(key)
        groups = self.groups
        for w in self.lengths:
            if w > n:
                break
            entries = groups.get(key[:w])
            if entries:
                rest = key[w:]
                for e in entries:
                    if compile_pattern(e[1][w:]).fullmatch(rest) is not None:
                        found.append(e)
        exact = self.exact.get(key)
        if exact:
            found.extend(exact)
        return kmod_order(found)

    def patterns(self) -> list[tuple[str, str, int]]:
        """(pattern, value, priority) of every entry."""
        out = [(e[1], e[3], e[0]) for lst in self.exact.values() for e in lst]
        out += [(e[1], e[3], e[0]) for lst in self.groups.values() for e in lst]
        return out


def depmod_values(values: list[tuple[int, str]], prio: int, value: str) -> None:
    """Insert a value the way depmod's index_add_value orders a node's values."""
    k = 0
    while k < len(values) and values[k][0] < prio:
        k += 1
    values.insert(k, (prio, value))
