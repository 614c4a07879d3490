"""Alias patterns: glibc ``fnmatch(pattern, string, 0)`` semantics and kmod's result order.

Python's :mod:`fnmatch` differs from glibc (no backslash escapes, ``[^...]``
is not a negation, no ``[:class:]``), and compiling thousands of regular
expressions costs more than a whole ``kmodctl resolve`` may take.  Patterns
are therefore parsed here into star-separated chunks of fixed width and
matched directly, following glibc in the C locale (kmod never calls
setlocale).
"""

from __future__ import annotations

import marshal
import re
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from typing import Any

# [:class:] members in the C locale, as inclusive code point ranges
_CLASSES: dict[str, tuple[int, ...]] = {
    "alnum": (48, 57, 65, 90, 97, 122), "alpha": (65, 90, 97, 122), "blank": (9, 9, 32, 32),
    "cntrl": (0, 31, 127, 127), "digit": (48, 57), "graph": (33, 126), "lower": (97, 122),
    "print": (32, 126), "punct": (33, 47, 58, 64, 91, 96, 123, 126), "space": (9, 13, 32, 32),
    "upper": (65, 90), "xdigit": (48, 57, 65, 70, 97, 102),
}

# A chunk item: a literal run (str), any one character (None), or a bracket
# expression (negate, flat inclusive ranges lo, hi, lo, hi...).
Item = str | None | tuple[bool, tuple[int, ...]]
Chunk = tuple[int, tuple[Item, ...]]            # (width, items)
Glob = tuple[Chunk, ...]                        # chunks between the '*'s


def _bracket(pat: str, i: int) -> tuple[Item, int] | None:
    """Parse the bracket expression whose '[' is at ``i``: (item, index after ']').

    None when the '[' is unterminated: glibc then takes it as a literal '['.
    """
    n = len(pat)
    p = i + 1
    negate = p < n and pat[p] in "!^"
    if negate:
        p += 1
    ranges: list[int] = []
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
                if name in _CLASSES:
                    ranges.extend(_CLASSES[name])
                else:
                    never = True      # glibc: an unknown class name never matches
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
            ranges.extend((ord(c), ord(end)))     # an inverted range is empty
            continue
        ranges.extend((ord(c), ord(c)))
    if never:
        return (False, ()), p
    return (negate, tuple(ranges)), p


def compile_glob(pattern: str) -> Glob | None:
    """The pattern as star-separated chunks; None when it can never match."""
    chunks: list[Chunk] = []
    items: list[Item] = []
    lit: list[str] = []
    width = 0
    i = 0
    n = len(pattern)

    def flush() -> None:
        if lit:
            items.append("".join(lit))
            lit.clear()

    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            flush()
            chunks.append((width, tuple(items)))
            items = []
            width = 0
            while i < n and pattern[i] == "*":
                i += 1
            continue
        if c == "?":
            flush()
            items.append(None)
        elif c == "[" and (br := _bracket(pattern, i - 1)) is not None:
            flush()
            items.append(br[0])
            i = br[1]
        else:
            if c == "\\":
                if i >= n:
                    return None       # a trailing backslash never matches in glibc
                c = pattern[i]
                i += 1
            lit.append(c)
        width += 1
    flush()
    chunks.append((width, tuple(items)))
    return tuple(chunks)


def _fits(items: tuple[Item, ...], s: str, i: int) -> bool:
    """Whether a chunk's items match ``s`` at ``i`` (the caller checked the width)."""
    for item in items:
        if isinstance(item, str):
            if not s.startswith(item, i):
                return False
            i += len(item)
            continue
        if item is not None:
            negate, ranges = item
            o = ord(s[i])
            inside = False
            for k in range(0, len(ranges), 2):
                if ranges[k] <= o <= ranges[k + 1]:
                    inside = True
                    break
            if inside == negate:
                return False
        i += 1
    return True


def glob_match(glob: Glob | None, s: str, pos: int = 0) -> bool:
    """Whether ``s[pos:]`` matches the compiled pattern.

    Fixed-width chunks between stars are placed at their leftmost fit, which
    finds a match whenever one exists; the last chunk is tied to the end.
    """
    if glob is None:
        return False
    end = len(s)
    if len(glob) == 1:
        width, items = glob[0]
        return end - pos == width and _fits(items, s, pos)
    width, items = glob[0]
    if end - pos < width or not _fits(items, s, pos):
        return False
    pos += width
    width, items = glob[-1]
    end -= width
    if end < pos or not _fits(items, s, end):
        return False
    for k in range(1, len(glob) - 1):
        width, items = glob[k]
        if not width:
            continue
        head = items[0]
        i = pos
        while True:
            if i + width > end:
                return False
            if isinstance(head, str):
                i = s.find(head, i, end)
                if i < 0:
                    return False
            if i + width <= end and _fits(items, s, i):
                break
            i += 1
        pos = i + width
    return True


def star_match(segments: list[str], s: str) -> bool:
    """Whether ``s`` matches a pattern whose only wildcard is ``*``, split at
    its stars: each middle segment at its leftmost place decides it."""
    first = segments[0]
    if len(segments) == 1:
        return s == first
    last = segments[-1]
    if not s.startswith(first):
        return False
    pos = len(first)
    end = len(s) - len(last)
    if end < pos or not s.endswith(last):
        return False
    for k in range(1, len(segments) - 1):
        seg = segments[k]
        i = s.find(seg, pos, end)
        if i < 0:
            return False
        pos = i + len(seg)
    return True


# Star-only patterns (nearly all of modules.alias) as their segments, others compiled.
_compiled: dict[str, list[str] | Glob | None] = {}


def fnmatch(pattern: str, string: str) -> bool:
    """glibc ``fnmatch(pattern, string, 0) == 0``."""
    try:
        glob = _compiled[pattern]
    except KeyError:
        glob = _compiled[pattern] = (pattern.split("*") if _star_only(pattern)
                                     else compile_glob(pattern))
    if type(glob) is list:
        return star_match(glob, string)
    return glob_match(glob, string)  # type: ignore[arg-type]


_WILD = re.compile(r"[*?\[]")


def literal_len(pattern: str) -> int:
    """Length of the part kmod compares literally: up to the first '*', '?' or '['."""
    m = _WILD.search(pattern)
    return len(pattern) if m is None else m.start()


Payload = tuple[tuple[int, str], ...]          # (kmod order key, value) per match
# A node of a group's segment trie: (ends, tails, tail_buckets, kids, kid_buckets)
#   ends         payload of the patterns whose remaining part is just '*'
#   tails        ((tail, payload), ...): the pattern ends with that literal
#   tail_buckets {first char: {tail: payload}} instead, when there are many tails
#   kids         ((segment, more segments, node, leaf payload), ...): the pattern
#                continues '*' segment '*' more... then node (None when only
#                the leaf payload, patterns ending in '*', remains)
#   kid_buckets  {two first chars: (segment lengths, {segment: (more, node, leaf)})}
#                instead of kids, when there are many
# An edge's "more" is the tuple of its further segments, or the index of their
# compiled chain (an int) when the chain is frequent (_follow reads both).
# A group's root is such a node, _EMPTY, or, for a group that is a single
# pattern made of one frequent chain, the pair (chain index, payload):
# matched without a _walk call.  Plain tuples all: they are marshalled.
Node = tuple[Any, ...]
_CHAIN_ONLY = 2                 # len() of that pair; a full node has 5 items
_SMALL = 6


def _star_only(rest: str) -> bool:
    return "?" not in rest and "[" not in rest and "\\" not in rest


_EMPTY: Node = ()      # a group with only '?' / '[' patterns
_FORMAT = 3
# Segment chains used this often get one regular expression each: one search
# in C instead of a find per segment (about three times faster for usb's
# '*dsc*dp*ic*isc*ip*in*'); the few that qualify are compiled at load.
_CHAIN_MIN_USES = 16
_CHAIN_MAX = 32


class WildIndex:
    """Patterns with values, searched with kmod's wildcard semantics and order.

    kmod walks a trie and calls fnmatch on every pattern below each wildcard
    it meets.  Here patterns are grouped by their literal prefix (the part
    kmod compares literally); the groups whose prefix starts the key are found
    with one bisection.  Inside a group, patterns made of literals and '*'
    only, nearly all of them, sit in a trie of their literal segments: a
    segment is matched at its leftmost occurrence (which is exact for '*'
    globs), patterns share the work of their common segments, and wide fan-outs
    are indexed by the segment's first characters, so a key visits a handful of
    nodes instead of testing hundreds of patterns.  The few others ('?', '[',
    '\\') go through :func:`glob_match`.

    Matches are ordered by a precomputed key that encodes kmod's result order.
    :meth:`to_bytes` stores everything with marshal; :meth:`from_bytes` loads
    it back and decodes each group only when a key first needs it.
    """

    def __init__(self, items: Iterable[tuple[str, Iterable[tuple[int, str]]]] = ()) -> None:
        # (visit rank key, priority, pattern, value) for every value
        flat: list[tuple[int, str, int, int, str]] = []
        widths: dict[str, int] = {}
        for pattern, values in items:
            w = widths[pattern] = literal_len(pattern)
            sortable = pattern + "\uffff"
            for pos, (prio, value) in enumerate(values):
                flat.append((w, sortable, pos, prio, value))
        # kmod visits shallow wildcards first, children before a node's own
        # values, and returns by priority with later visits first on ties.
        flat.sort()
        n = len(flat)
        per_pattern: dict[str, list[tuple[int, str]]] = {}
        self._entries: list[tuple[str, str, int]] | None = [
            (sortable[:-1], value, prio) for _, sortable, _, prio, value in flat]
        for rank, (_, sortable, _, prio, value) in enumerate(flat):
            per_pattern.setdefault(sortable[:-1], []).append(
                (prio * (n + 1) + (n - rank), value))
        self.exact: dict[str, Payload] = {}
        grouped: dict[str, list[tuple[str, Payload]]] = {}
        for pattern, vals in per_pattern.items():
            w = widths[pattern]
            payload = tuple(vals)
            if w == len(pattern):
                self.exact[pattern] = payload
            else:
                grouped.setdefault(pattern[:w], []).append((pattern[w:], payload))
        self.prefixes: list[str] = sorted(grouped)
        parents = array("i")
        stack: list[int] = []
        for i, prefix in enumerate(self.prefixes):
            while stack and not prefix.startswith(self.prefixes[stack[-1]]):
                stack.pop()
            parents.append(stack[-1] if stack else -1)
            stack.append(i)
        self.parents = parents
        nodes: list[Node] = []
        self.complex: dict[int, list[tuple[Glob | None, Payload]]] = {}
        for i, prefix in enumerate(self.prefixes):
            simple: list[tuple[str, Payload]] = []
            hard: list[tuple[Glob | None, Payload]] = []
            for r, p in grouped[prefix]:
                if _star_only(r):
                    simple.append((r, p))
                else:
                    hard.append((compile_glob(r), p))
            nodes.append(_build_node(simple) if simple else _EMPTY)
            if hard:
                self.complex[i] = hard
        uses: Counter[tuple[str, ...]] = Counter()
        for node in nodes:
            if node:
                _count_chains(node, uses)
        self.chains = [c for c, n in uses.most_common(_CHAIN_MAX) if n >= _CHAIN_MIN_USES]
        ids = {c: i for i, c in enumerate(self.chains)}
        self._nodes: list[Node | None] = []
        for node in nodes:
            if node:
                node = _use_chains(node, ids)
                # most groups are one pattern whose segments are a frequent chain
                if not (node[0] or node[1] or node[2] or node[4]) and len(node[3]) == 1:
                    seg, chain, child, leaf = node[3][0]
                    if seg is None and child is None:
                        node = (chain, leaf)
            self._nodes.append(node)
        self._chain_rx = _compile_chains(self.chains)
        self._blob = b""
        self._offsets = array("I")
        self._entries_blob = b""

    # -- storing -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Everything, marshalled; each group separately so it can be decoded alone."""
        nodes = [self._node(g) for g in range(len(self.prefixes))]
        parts = [marshal.dumps(node) for node in nodes]
        offsets = array("I", [0])
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        return marshal.dumps((_FORMAT, self.exact, self.prefixes, self.parents.tobytes(),
                              self.complex, tuple(self.chains), offsets.tobytes(),
                              b"".join(parts), marshal.dumps(self.patterns())))

    @classmethod
    def from_bytes(cls, data: bytes) -> WildIndex:
        """Load :meth:`to_bytes` output; raises ValueError if it is not one."""
        try:
            state = marshal.loads(data)
            fmt, exact, prefixes, parents, complex_, chains, offsets, blob, entries = state
        except (EOFError, TypeError, ValueError) as e:
            raise ValueError(f"not a stored alias index: {e}") from None
        if fmt != _FORMAT:
            raise ValueError("stored alias index of another format")
        self = cls.__new__(cls)
        self.exact = exact
        self.prefixes = prefixes
        self.parents = array("i")
        self.parents.frombytes(parents)
        self.complex = complex_
        self.chains = list(chains)
        self._chain_rx = _compile_chains(self.chains)
        self._offsets = array("I")
        self._offsets.frombytes(offsets)
        self._blob = blob
        self._nodes = [None] * len(prefixes)
        self._entries = None
        self._entries_blob = entries
        if len(self.parents) != len(prefixes) or len(self._offsets) != len(prefixes) + 1 \
                or self._offsets[-1] != len(blob):
            raise ValueError("stored alias index is inconsistent")
        return self

    def _node(self, g: int) -> Node:
        node = self._nodes[g]
        if node is None:
            node = self._nodes[g] = marshal.loads(
                self._blob[self._offsets[g]:self._offsets[g + 1]])
        return node

    # -- searching -----------------------------------------------------------

    def search(self, key: str) -> list[str]:
        found: list[tuple[int, str]] = []
        prefixes = self.prefixes
        g = bisect_right(prefixes, key) - 1
        # the longest group prefix that starts the key is an ancestor of the
        # greatest prefix sorting before it
        parents = self.parents
        while g >= 0 and not key.startswith(prefixes[g]):
            g = parents[g]
        nodes = self._nodes
        complex_ = self.complex
        chain_rx = self._chain_rx
        while g >= 0:
            node = nodes[g]
            if node is None:
                node = self._node(g)
            if len(node) == _CHAIN_ONLY:
                if chain_rx[node[0]].match(key, len(prefixes[g])) is not None:
                    found.extend(node[1])
            elif node:
                _walk(node, key, len(prefixes[g]), found, chain_rx)
            if complex_:
                hard = complex_.get(g)
                if hard:
                    w = len(prefixes[g])
                    for glob, payload in hard:
                        if glob_match(glob, key, w):
                            found.extend(payload)
            g = parents[g]
        exact = self.exact.get(key)
        if exact:
            found.extend(exact)
        if len(found) == 1:
            return [found[0][1]]
        found.sort()
        return [v for _, v in found]

    def patterns(self) -> list[tuple[str, str, int]]:
        """(pattern, value, priority) of every entry, in kmod's visiting order."""
        if self._entries is None:
            self._entries = [(p, v, n) for p, v, n in marshal.loads(self._entries_blob)]
        return list(self._entries)


def _build_node(rests: list[tuple[str, Payload]]) -> Node:
    """The segment trie of '*'-only pattern rests (each starts with '*')."""
    if len(rests) == 1:
        return _single(*rests[0])
    tree = _new()
    for rest, payload in rests:
        parts = rest.split("*")
        node = tree
        for seg in parts[1:-1]:
            if seg:
                node = node["kids"].setdefault(seg, _new())
        last = parts[-1]
        if last:
            node["tails"].setdefault(last, []).extend(payload)
        else:
            node["ends"].extend(payload)
    return _freeze(tree)


def _single(rest: str, payload: Payload) -> Node:
    """What _build_node makes of one pattern (most groups hold one), built directly."""
    parts = rest.split("*")
    mids = [seg for seg in parts[1:-1] if seg]
    last = parts[-1]
    if not mids:
        return ((), ((last, payload),), None, (), None) if last else (payload, (), None, (), None)
    edge: tuple[str, tuple[str, ...], Node | None, Payload]
    if last:
        edge = (mids[0], tuple(mids[1:]), ((), ((last, payload),), None, (), None), ())
    else:
        edge = (mids[0], tuple(mids[1:]), None, payload)
    return ((), (), None, (edge,), None)


def _new() -> dict[str, Any]:
    return {"ends": [], "tails": {}, "kids": {}}


def _edge(seg: str, child: dict[str, Any]) -> tuple[str, tuple[str, ...], Node | None, Payload]:
    """Follow single-child chains so one edge checks several segments in a row."""
    more: list[str] = []
    while not child["ends"] and not child["tails"] and len(child["kids"]) == 1:
        (nxt, child), = child["kids"].items()
        more.append(nxt)
    if not child["tails"] and not child["kids"]:
        return seg, tuple(more), None, tuple(child["ends"])
    return seg, tuple(more), _freeze(child), ()


def _freeze(node: dict[str, Any]) -> Node:
    ends = tuple(node["ends"])
    tails = tuple((t, tuple(p)) for t, p in node["tails"].items())
    tail_buckets: dict[str, dict[str, Payload]] | None = None
    if len(tails) > _SMALL:  # bucket by first character
        tail_buckets = {}
        for t, p in tails:
            tail_buckets.setdefault(t[0], {})[t] = p
        tails = ()
    kids = [_edge(seg, child) for seg, child in node["kids"].items()]
    kid_buckets = None
    if len(kids) > _SMALL:
        buckets: dict[str, dict[str, tuple[tuple[str, ...], Node | None, Payload]]] = {}
        for seg, more, child, leaf in kids:
            if len(seg) >= 2:
                buckets.setdefault(seg[:2], {})[seg] = (more, child, leaf)
        kid_buckets = {c2: (tuple(sorted({len(s) for s in b})), b) for c2, b in buckets.items()}
        kids = [k for k in kids if len(k[0]) < 2]
    return (ends, tails, tail_buckets, tuple(kids), kid_buckets)


def _count_chains(node: Node, uses: Counter[tuple[str, ...]]) -> None:
    # kids count with their first segment (one regex does it all), bucket
    # entries without (the bucket look-up found it)
    for seg, more, child, _ in node[3]:
        if more:
            uses[(seg, *more)] += 1
        if child is not None:
            _count_chains(child, uses)
    if node[4]:
        for _, table in node[4].values():
            for more, child, _ in table.values():
                if len(more) >= 2:
                    uses[more] += 1
                if child is not None:
                    _count_chains(child, uses)


def _use_chains(node: Node, ids: dict[tuple[str, ...], int]) -> Node:
    """The node with frequent chains replaced by their number."""
    def sub(more: tuple[str, ...], child: Node | None) -> tuple[Any, Node | None]:
        return ids.get(more, more), (None if child is None else _use_chains(child, ids))
    ends, tails, tail_buckets, kids, kid_buckets = node
    new_kids = []
    for seg, more, child, leaf in kids:
        chain = ids.get((seg, *more)) if more else None
        c = None if child is None else _use_chains(child, ids)
        # None as the segment: the whole chain is one regex from the position
        new_kids.append((None, chain, c, leaf) if chain is not None else (seg, more, c, leaf))
    new_buckets = None
    if kid_buckets:
        new_buckets = {}
        for c2, (lengths, table) in kid_buckets.items():
            new_table = {}
            for seg, (more, child, leaf) in table.items():
                m, c = sub(more, child)
                new_table[seg] = (m, c, leaf)
            new_buckets[c2] = (lengths, new_table)
    return (ends, tails, tail_buckets, tuple(new_kids), new_buckets)


def _compile_chains(chains: list[tuple[str, ...]]) -> list[re.Pattern[str]]:
    # each segment at its leftmost occurrence after the previous one, committed
    # (atomic group): exactly finding them in turn, without backtracking
    return [re.compile("".join(f"(?>.*?{re.escape(seg)})" for seg in chain), re.DOTALL)
            for chain in chains]


def _follow(more: tuple[str, ...] | int, key: str, pos: int,
            chains: list[re.Pattern[str]]) -> int:
    """Where an edge's remaining segments end in ``key[pos:]``, each found at its
    leftmost place after the previous one; -1 when one is missing.  *more* is the
    segments themselves or the index of their compiled chain."""
    if isinstance(more, int):
        m = chains[more].match(key, pos)
        return -1 if m is None else m.end()
    for seg in more:
        pos = key.find(seg, pos)
        if pos < 0:
            return -1
        pos += len(seg)
    return pos


def _walk(node: Node, key: str, pos: int, found: list[tuple[int, str]],
          chains: list[re.Pattern[str]]) -> None:
    """Add the payload of every pattern in ``node`` that matches ``key[pos:]``."""
    ends, tails, tail_buckets, kids, kid_buckets = node
    if ends:
        found.extend(ends)
    find = key.find
    if tails:
        room = len(key) - pos
        for tail, payload in tails:
            if len(tail) <= room and key.endswith(tail):
                found.extend(payload)
    elif tail_buckets:
        for first, table in tail_buckets.items():
            j = find(first, pos)
            while j >= 0:
                payload = table.get(key[j:])
                if payload:
                    found.extend(payload)
                j = find(first, j + 1)
    for seg, more, child, leaf in kids:
        if seg is None:
            m = chains[more].match(key, pos)
            if m is None:
                continue
            j = m.end()
            if child is None:
                found.extend(leaf)
            else:
                _walk(child, key, j, found, chains)
            continue
        j = find(seg, pos)
        if j < 0:
            continue
        j = _follow(more, key, j + len(seg), chains)
        if j < 0:
            continue
        if child is None:
            found.extend(leaf)
        else:
            _walk(child, key, j, found, chains)
    if kid_buckets:
        for c2, (lengths, table) in kid_buckets.items():
            j = find(c2, pos)
            if j < 0:
                continue
            done: set[str] | None = None
            while j >= 0:
                for n in lengths:
                    seg = key[j:j + n]
                    edge = table.get(seg)
                    # a segment counts at its leftmost occurrence only
                    if edge is None or (done is not None and seg in done):
                        continue
                    if done is None:
                        done = set()
                    done.add(seg)
                    more, child, leaf = edge
                    k = _follow(more, key, j + n, chains)
                    if k < 0:
                        continue
                    if child is None:
                        found.extend(leaf)
                    else:
                        _walk(child, key, k, found, chains)
                j = find(c2, j + 1)


def depmod_values(values: list[tuple[int, str]], prio: int, value: str) -> None:
    """Insert a value the way depmod's index_add_value orders a node's values."""
    k = 0
    while k < len(values) and values[k][0] < prio:
        k += 1
    values.insert(k, (prio, value))
