"""Reader for kmod's binary trie indexes (``modules.*.bin``).

Layout (see libkmod-index.c): a 12-byte big-endian header (magic
``0xB007F457``, version with major 2 in the high half, root offset), then
nodes.  A node offset carries flags in its top nibble saying which parts
the node has: a NUL-terminated prefix, a child table (first char, last
char, one 32-bit offset per char in between), and values (a count, then
per value a 32-bit priority and a NUL-terminated string).

Every read is bounds-checked and every traversal guards against cycles, so a
damaged file raises :class:`IndexCorrupt` instead of an IndexError, a
struct.error, endless recursion or a wrong answer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

from kmodd.resolution.names import WILDCARDS

INDEX_MAGIC = 0xB007F457
INDEX_VERSION_MAJOR = 2
NODE_PREFIX = 0x80000000
NODE_VALUES = 0x40000000
NODE_CHILDS = 0x20000000
NODE_MASK = 0x0FFFFFFF
CHILDMAX = 128


_U32 = struct.Struct(">I")
_CHILD_TABLES = [struct.Struct(f">{n}I") for n in range(CHILDMAX + 1)]
_HEADER = struct.Struct(">III")


class IndexCorrupt(Exception):
    """A module index cannot be trusted; the message names the file and the problem."""


class Node:
    """One decoded trie node (a plain slotted class: decoding makes tens of thousands)."""

    __slots__ = ("children", "first", "prefix", "values")

    def __init__(self, prefix: str, first: int, children: tuple[int, ...],
                 values: tuple[tuple[int, str], ...]) -> None:
        self.prefix = prefix
        self.first = first              # CHILDMAX when the node has no children
        self.children = children        # raw child offsets (flags included), first..last
        self.values = values            # (priority, value) in file order

    def child(self, ch: str) -> int:
        """Raw offset of the child for ``ch``, 0 when there is none."""
        i = ord(ch) - self.first
        if 0 <= i < len(self.children):
            return self.children[i]
        return 0


def decode_value(raw: bytes) -> str:
    """Values are module names or paths; keep undecodable bytes round-trippable."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def key_bytes_str(key: str) -> str:
    """The key as kmod sees it: one character per byte (latin-1 view of UTF-8)."""
    if key.isascii():
        return key
    return key.encode("utf-8", "surrogateescape").decode("latin-1")


class BinIndex:
    """One ``modules.*.bin`` file, read into memory and decoded on demand."""

    def __init__(self, path: str | os.PathLike[str], data: bytes | None = None) -> None:
        self.path = os.fspath(path)
        if data is None:
            with open(self.path, "rb") as f:
                data = f.read()
        self.data = data
        if len(data) < _HEADER.size:
            self._corrupt(f"file is {len(data)} bytes, shorter than the 12-byte header")
        magic, version, root = _HEADER.unpack_from(data, 0)
        if magic != INDEX_MAGIC:
            self._corrupt(f"bad magic 0x{magic:08X} (expected 0x{INDEX_MAGIC:08X})")
        if version >> 16 != INDEX_VERSION_MAJOR:
            self._corrupt(f"unsupported format version {version >> 16}.{version & 0xFFFF} "
                          f"(expected {INDEX_VERSION_MAJOR}.x)")
        self.root = root
        self._nodes: dict[int, Node] = {}
        self._below: dict[tuple[int, str], list[tuple[str, tuple[tuple[int, str], ...]]]] = {}

    def _corrupt(self, problem: str) -> None:
        raise IndexCorrupt(f"{self.path}: {problem}; try re-running depmod")

    # -- nodes -------------------------------------------------------------

    def node(self, offset: int) -> Node | None:
        """The node at a raw offset (flags in the top nibble); None for offset 0."""
        pos = offset & NODE_MASK
        if pos == 0:
            return None
        cached = self._nodes.get(offset)
        if cached is not None:
            return cached
        node = self._read_node(offset, pos)
        self._nodes[offset] = node
        return node

    def _read_node(self, offset: int, pos: int) -> Node:
        data = self.data
        size = len(data)
        # a node without flags is empty and may sit at the very end (an empty index)
        if pos < _HEADER.size or pos > size:
            self._corrupt(f"node offset {pos} outside the file (size {size})")
        prefix = ""
        if offset & NODE_PREFIX:
            end = data.find(b"\0", pos)
            if end < 0:
                self._corrupt(f"node at {pos}: prefix runs past the end of the file")
            prefix = data[pos:end].decode("latin-1")
            pos = end + 1
        first = CHILDMAX
        children: tuple[int, ...] = ()
        if offset & NODE_CHILDS:
            if pos + 2 > size:
                self._corrupt(f"node at {pos}: child range truncated")
            first, last = data[pos], data[pos + 1]
            pos += 2
            if first > last or last >= CHILDMAX:
                self._corrupt(f"node at {pos - 2}: bad child range {first}..{last}")
            count = last - first + 1
            if pos + 4 * count > size:
                self._corrupt(f"node at {pos}: child table truncated")
            children = _CHILD_TABLES[count].unpack_from(data, pos)
            pos += 4 * count
        values: tuple[tuple[int, str], ...] = ()
        if offset & NODE_VALUES:
            if pos + 4 > size:
                self._corrupt(f"node at {pos}: value count truncated")
            (count,) = _U32.unpack_from(data, pos)
            pos += 4
            # each value needs at least a priority and a NUL
            if count > (size - pos) // 5:
                self._corrupt(f"node at {pos}: value count {count} exceeds the file")
            vals = []
            for _ in range(count):
                if pos + 4 > size:
                    self._corrupt(f"node at {pos}: value truncated")
                (prio,) = _U32.unpack_from(data, pos)
                end = data.find(b"\0", pos + 4)
                if end < 0:
                    self._corrupt(f"node at {pos}: value runs past the end of the file")
                raw = data[pos + 4:end]
                vals.append((prio, raw.decode("ascii") if raw.isascii() else decode_value(raw)))
                pos = end + 1
            values = tuple(vals)
        return Node(prefix, first, children, values)

    # -- lookups -----------------------------------------------------------

    def search(self, key: str) -> str | None:
        """Exact lookup: the first (lowest priority) value of ``key``, like index_mm_search."""
        key = key_bytes_str(key)
        node = self.node(self.root)
        i = 0
        n = len(key)
        while node is not None:
            prefix = node.prefix
            if prefix:
                if key[i:i + len(prefix)] != prefix:
                    return None
                i += len(prefix)
            if i == n:
                return node.values[0][1] if node.values else None
            node = self.node(node.child(key[i]))
            i += 1
        return None

    def searchwild(self, key: str, fnmatch: Callable[[str, str], bool]) -> list[str]:
        """Wildcard lookup with kmod's traversal and result order (index_mm_searchwild).

        Keys in the index are patterns.  Matches are collected in trie order and
        then ordered as kmod's add_value does: by priority, later finds first
        among equal priorities.
        """
        key = key_bytes_str(key)
        found: list[tuple[int, str]] = []
        offset = self.root
        node = self.node(offset)
        i = 0
        n = len(key)
        while node is not None:
            prefix = node.prefix
            for j, ch in enumerate(prefix):
                if ch in WILDCARDS:
                    self._collect(offset, node, prefix[j:], key[i + j:], fnmatch, found)
                    return _kmod_order(found)
                if i + j >= n or ch != key[i + j]:
                    return _kmod_order(found)
            i += len(prefix)
            for wc in WILDCARDS:
                child_offset = node.child(wc)
                child = self.node(child_offset)
                if child is not None:
                    self._collect(child_offset, child, wc + child.prefix, key[i:], fnmatch,
                                  found)
            if i == n:
                found.extend(node.values)
                break
            offset = node.child(key[i])
            node = self.node(offset)
            i += 1
        return _kmod_order(found)

    def _collect(self, offset: int, node: Node, pattern: str, subkey: str,
                 fnmatch: Callable[[str, str], bool], found: list[tuple[int, str]]) -> None:
        """Every pattern below ``node`` (``pattern``: the key from the wildcard on).

        kmod visits children in ascending order and a node's own values after
        its children; sorting the patterns with a high sentinel appended gives
        that same post-order without recursion.  Lookups of one bus keep
        meeting the same wildcard subtrees: each is decoded and sorted once.
        """
        below = self._below.get((offset, pattern))
        if below is None:
            below = sorted(self._subtree(node, pattern), key=lambda kv: kv[0] + "\uffff")
            self._below[(offset, pattern)] = below
        for pat, values in below:
            if fnmatch(pat, subkey):
                found.extend(values)

    def _subtree(self, node: Node, key: str) -> Iterator[tuple[str, tuple[tuple[int, str], ...]]]:
        """(key, values) of every node with values below and including ``node``."""
        seen: set[int] = set()
        stack: list[tuple[Node, str]] = [(node, key)]
        while stack:
            node, key = stack.pop()
            if node.values:
                yield key, node.values
            for k in range(len(node.children) - 1, -1, -1):
                off = node.children[k]
                if off & NODE_MASK == 0:
                    continue
                if off in seen:
                    self._corrupt(f"node offset {off & NODE_MASK} is reached twice (cycle)")
                seen.add(off)
                # a full walk reads each node once: no point in caching them
                child = self._read_node(off, off & NODE_MASK)
                stack.append((child, key + chr(node.first + k) + child.prefix))

    def items(self) -> Iterator[tuple[str, tuple[tuple[int, str], ...]]]:
        """Every (key, values) in key order (trie pre-order); values in file order."""
        root = self.node(self.root)
        if root is None:
            return iter(())
        return self._subtree(root, root.prefix)


def _kmod_order(found: list[tuple[int, str]]) -> list[str]:
    """kmod's add_value inserts each value before the first of equal or higher priority."""
    if len(found) <= 1:
        return [v for _, v in found]
    order = sorted(range(len(found)), key=lambda k: (found[k][0], -k))
    return [found[k][1] for k in order]
