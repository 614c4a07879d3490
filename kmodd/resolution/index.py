"""The module indexes of one ``lib/modules/VERSION`` directory.

kmod's binary indexes (``modules.*.bin``) are read directly; when one is
missing the text file depmod writes next to it is used instead (libkmod
itself answers nothing in that case, so kmodd only ever answers more, never
differently).  A damaged index raises :class:`IndexCorrupt` naming the file.

Keys are looked up as given: callers normalise aliases first (kmod does it in
``kmod_module_new_from_lookup``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

from kmodd.record import dataclass
from kmodd.resolution import aliasmatch, index_cache
from kmodd.resolution.aliasmatch import WildIndex, depmod_values
from kmodd.resolution.index_bin import BinIndex, IndexCorrupt, key_bytes_str
from kmodd.resolution.names import alias_normalize, has_wildcard

__all__ = ["DepEntry", "IndexCorrupt", "ModuleTree", "path_to_modname"]


@dataclass(frozen=True)
class DepEntry:
    """One modules.dep line: ``path`` is absolute, ``deps`` are module names in file order."""

    name: str
    path: str
    deps: tuple[str, ...]


def path_to_modname(path: str) -> str:
    """kmod's path_to_modname: the basename up to its first '.', '-' read as '_'."""
    base = path.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot >= 0:
        base = base[:dot]
    return base.replace("-", "_")


class _Missing:
    """Marker for an index that has neither a .bin nor a text file."""


_MISSING = _Missing()

# Distinct modules.alias keys answered by walking the trie before the prepared
# index is built (see ModuleTree._bind_alias_search); 0 prepares at once.
PREPARE_AFTER = 256
# Trie answers remembered (a burst repeats the same few hundred modaliases).
_WALK_MEMO = 4096

LOG = logging.getLogger(__name__)


class ModuleTree:
    """Lookups in the indexes of one module directory; each file is read on first use.

    The prepared alias index is kept in a private cache (see
    :mod:`kmodd.resolution.index_cache`); ``cache_dir`` overrides its location and
    ``use_cache=False`` turns it off.
    """

    def __init__(self, moddir: Path, *, cache_dir: Path | None = None,
                 use_cache: bool = True, prepare_after: int = PREPARE_AFTER) -> None:
        self.moddir = Path(moddir)
        self._dirname = os.fspath(self.moddir)
        self._loaded: dict[str, object] = {}
        # The daemon's workers resolve concurrently: one of them builds each
        # index, the others wait for it instead of building their own copy.
        self._load_lock = threading.RLock()
        directory = (cache_dir or index_cache.default_dir()) if use_cache else None
        self._cache = index_cache.IndexCache(directory)
        # hot paths, bound on first use
        self._alias_search: Callable[[str], list[str]] | None = None
        self._prepare_lock = threading.Lock()
        self.prepare_after = prepare_after
        self._builtin_alias_search: Callable[[str], list[str]] | None = None
        self._builtin_names: set[str] | None = None

    # -- plumbing ----------------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self._dirname, name)

    def _get(self, name: str, loader: Callable[[], object]) -> object:
        obj = self._loaded.get(name)
        if obj is None:
            with self._load_lock:
                obj = self._loaded.get(name)
                if obj is None:
                    obj = loader()
                    self._loaded[name] = obj
        return obj

    def _read(self, path: str) -> tuple[bytes, os.stat_result] | None:
        """A file's bytes and the stat of what was read; None if it does not exist."""
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except IsADirectoryError as e:
            raise IndexCorrupt(f"{path}: is a directory") from e

    def _bin(self, name: str) -> BinIndex | None:
        path = self._file(name + ".bin")
        got = self._read(path)
        return None if got is None else BinIndex(path, got[0])

    def _text(self, name: str) -> list[str] | None:
        got = self._read(self._file(name))
        return None if got is None else got[0].decode("latin-1").splitlines()

    # -- modules.dep -------------------------------------------------------

    def _dep_index(self) -> object:
        def load() -> object:
            b = self._bin("modules.dep")
            if b is not None:
                return b
            lines = self._text("modules.dep")
            if lines is None:
                return _MISSING
            table: dict[str, str] = {}
            for line in lines:
                colon = line.find(":")
                if colon <= 0 or line.startswith("#"):
                    continue
                # depmod orders modules.dep like the .bin priorities: first wins
                table.setdefault(path_to_modname(line[:colon]), _value(line))
            return table
        return self._get("modules.dep", load)

    def _dep_line(self, name: str) -> str | None:
        idx = self._dep_index()
        if isinstance(idx, BinIndex):
            return idx.search(name)
        if isinstance(idx, dict):
            return idx.get(key_bytes_str(name))
        return None

    def _dep_fields(self, name: str) -> tuple[str, str] | None:
        """(module path, dependency list) of a modules.dep entry, split at its ':'."""
        line = self._dep_line(name)
        if line is None:
            return None
        path, colon, deps = line.partition(":")
        if not colon:
            raise IndexCorrupt(f"{self._file('modules.dep')}: entry for {name!r} has no ':'")
        return path, deps

    def dep(self, name: str) -> DepEntry | None:
        """The modules.dep entry of a module name (as kmod_search_moddep finds it)."""
        fields = self._dep_fields(name)
        if fields is None:
            return None
        deps = tuple(path_to_modname(p) for p in fields[1].replace("\t", " ").split())
        return DepEntry(name, self._abspath(fields[0]), deps)

    def dep_path(self, name: str) -> str | None:
        fields = self._dep_fields(name)
        return None if fields is None else self._abspath(fields[0])

    def _abspath(self, rel: str) -> str:
        if rel.startswith("/"):
            return rel
        return self._dirname + "/" + rel

    def module_names(self) -> list[str]:
        """Every module in modules.dep, sorted."""
        idx = self._dep_index()
        if isinstance(idx, BinIndex):
            return sorted(k for k, _ in idx.items())
        if isinstance(idx, dict):
            return sorted(idx)
        return []

    # -- modules.alias / modules.symbols ---------------------------------------

    def _alias_text(self, name: str, normalize: bool) -> WildIndex | None:
        """A text index of ``alias PATTERN MODULE`` lines, ordered as depmod orders the .bin.

        depmod writes modules.alias patterns as the modules spell them but
        normalises them for the .bin ('-' to '_' outside brackets, unbalanced
        brackets dropped); modules.symbols keys are taken as they are.
        """
        lines = self._text(name)
        if lines is None:
            return None
        module_order: dict[str, int] = {}
        table: dict[str, list[tuple[int, str]]] = {}
        for line in lines:
            if not line.startswith("alias "):
                continue
            pattern, _, module = line[6:].strip().rpartition(" ")
            pattern = pattern.strip()
            if not pattern or not module:
                continue
            if normalize:
                try:
                    pattern = alias_normalize(pattern)
                except ValueError:
                    continue
            # depmod's priority is the module's position; modules come in that order
            prio = module_order.setdefault(module, len(module_order))
            depmod_values(table.setdefault(pattern, []), prio, _value(module))
        return WildIndex(table.items())

    def _load_alias_index(self) -> object:
        """The prepared modules.alias index: from the cache, else built (and stored)."""
        path = self._file("modules.alias.bin")
        try:
            f = open(path, "rb")  # noqa: SIM115 - read only on a cache miss
        except FileNotFoundError:
            return self._alias_text("modules.alias", True) or _MISSING
        except IsADirectoryError as e:
            raise IndexCorrupt(f"{path}: is a directory") from e
        with f:
            # the identity of what is read, not of what the path names later
            st = os.fstat(f.fileno())
            big = st.st_size >= index_cache.MIN_SOURCE_SIZE
            ident = index_cache.identity(st)
            if big:
                stored = self._cache.get("alias", path, ident)
                if stored is not None:
                    try:
                        return WildIndex.from_bytes(stored)
                    except ValueError:
                        pass
            data = f.read()
        idx = WildIndex(BinIndex(path, data).items())
        if big:
            self._cache.put("alias", path, ident, idx.to_bytes())
        return idx

    def _alias_index(self) -> WildIndex | None:
        idx = self._get("modules.alias", self._load_alias_index)
        return idx if isinstance(idx, WildIndex) else None

    def drop_caches(self) -> None:
        """Forget every index read so far (they are read again on the next
        lookup): the daemon's idle memory after coldplug.  The files are
        re-readable, and a lookup in progress keeps what it holds."""
        with self._prepare_lock, self._load_lock:
            self._loaded.clear()
            self._alias_search = None
            self._builtin_alias_search = None
            self._builtin_names = None

    def prepare_aliases(self) -> None:
        """Switch modules.alias lookups to the prepared index now (built or
        loaded from the cache), instead of after ``prepare_after`` walks."""
        with self._prepare_lock:
            # Not under the load lock: other indexes stay available meanwhile.
            idx = self._loaded.get("modules.alias")
            if idx is None:
                idx = self._loaded.setdefault("modules.alias", self._load_alias_index())
            self._alias_search = idx.search if isinstance(idx, WildIndex) else _nothing

    def _prepare_aside(self) -> None:
        try:
            self.prepare_aliases()
        except Exception:       # the trie keeps answering; the error shows there
            LOG.debug("preparing the alias index failed", exc_info=True)

    def alias(self, alias: str) -> list[str]:
        """Modules whose modules.alias patterns match, in kmod's order (duplicates kept)."""
        if has_wildcard(alias):
            found = self._trie_search("modules.alias.bin", alias)
            if found is not None:
                return found
        search = self._alias_search
        if search is None:
            search = self._bind_alias_search()
        return search(alias if alias.isascii() else key_bytes_str(alias))

    def _bind_alias_search(self) -> Callable[[str], list[str]]:
        """Until it pays off, walk kmod's trie instead of preparing the index.

        Preparing modules.alias costs as much as a few hundred walks of the
        trie (and holds some 15 MB), and a daemon's coldplug asks for a few
        dozen: those are answered by walking the trie (what libkmod does),
        remembered, and only a caller that keeps asking gets the prepared
        index (from the cache when it holds a valid copy), prepared in a
        thread of its own while the trie keeps answering.
        """
        with self._prepare_lock:
            if self._alias_search is not None:
                return self._alias_search
            search: Callable[[str], list[str]] | None = None
            if self.prepare_after > 0 and "modules.alias" not in self._loaded:
                trie = self._trie("modules.alias.bin")
                if trie is not None:                    # else: text files only
                    search = self._walking_search(trie)
            if search is None:
                idx = self._alias_index()
                search = idx.search if idx is not None else _nothing
            self._alias_search = search
            return search

    def _walking_search(self, trie: BinIndex) -> Callable[[str], list[str]]:
        answers: dict[str, list[str]] = {}
        walks = 0
        started = False

        def search(key: str) -> list[str]:
            nonlocal walks, started
            found = answers.get(key)
            if found is None:
                found = trie.searchwild(key, aliasmatch.fnmatch)
                if len(answers) >= _WALK_MEMO:
                    answers.clear()
                answers[key] = found
                walks += 1
                if walks >= self.prepare_after and not started:
                    started = True
                    threading.Thread(target=self._prepare_aside, name="kmodd-index",
                                     daemon=True).start()
            return list(found)

        return search

    def _trie_search(self, name: str, key: str) -> list[str] | None:
        """kmod's own trie walk, for keys holding '*', '?' or '['.

        kmod then also follows the key literally through the patterns' own
        wildcard characters and may return a module once per way it got
        there, depending on how depmod compressed the trie; only a walk of
        the real trie answers the same.  None when there is no .bin file.
        """
        trie = self._trie(name)
        return None if trie is None else trie.searchwild(key, aliasmatch.fnmatch)

    def _trie(self, name: str) -> BinIndex | None:
        """kmod's trie in ``name`` (a .bin file), decoded on demand; None without the file."""
        trie = self._get("trie:" + name, lambda: self._bin(name[:-4]) or _MISSING)
        return None if isinstance(trie, _Missing) else cast(BinIndex, trie)

    def alias_patterns(self) -> list[tuple[str, str]]:
        """(pattern, module) of every modules.alias entry, by module priority then pattern."""
        idx = self._alias_index()
        if idx is None:
            return []
        return [(p, v) for p, v, _ in sorted(idx.patterns(), key=lambda e: (e[2], e[0]))]

    def _wild(self, name: str, text: Callable[[], WildIndex | None],
              prepare: bool) -> BinIndex | WildIndex | None:
        """A wildcard index: the trie as is (rare lookups) or prepared (``prepare``)."""
        def load() -> object:
            b = self._bin(name)
            if b is not None:
                return WildIndex(b.items()) if prepare else b
            return text() or _MISSING
        idx = self._get(name, load)
        return idx if isinstance(idx, BinIndex | WildIndex) else None

    def symbol(self, symbol: str) -> list[str]:
        """modules.symbols matches for a ``symbol:NAME`` key."""
        # symbol: lookups are rare (symbol_request); modules.symbols.bin is big
        idx = self._wild("modules.symbols", lambda: self._alias_text("modules.symbols", False),
                         prepare=False)
        return _search(idx, symbol)

    # -- builtin -------------------------------------------------------------

    def _builtin_index(self) -> set[str] | None:
        def load() -> object:
            b = self._bin("modules.builtin")
            if b is not None:
                return {key for key, _ in b.items()}
            lines = self._text("modules.builtin")
            if lines is None:
                return _MISSING
            # depmod skips lines that do not start with a letter
            return {path_to_modname(ln) for ln in lines if ln[:1].isalpha()}
        idx = self._get("modules.builtin", load)
        return idx if isinstance(idx, set) else None

    def is_builtin(self, name: str) -> bool:
        names = self._builtin_names
        if names is None:
            names = self._builtin_names = self._builtin_index() or set()
        return (name if name.isascii() else key_bytes_str(name)) in names

    def _builtin_modinfo_aliases(self) -> WildIndex | None:
        """Builtin aliases from modules.builtin.modinfo, as depmod builds the .bin from it."""
        path = self._file("modules.builtin.modinfo")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        table: dict[str, list[tuple[int, str]]] = {}
        for rec in data.decode("latin-1").split("\0"):
            dot = rec.find(".")
            eq = rec.find("=", dot + 1)
            if dot <= 0 or eq < 0 or rec[dot + 1:eq] != "alias" or eq + 1 == len(rec):
                continue
            try:
                pattern = alias_normalize(rec[eq + 1:])
            except ValueError:
                continue          # depmod warns about unmatched brackets and skips
            depmod_values(table.setdefault(pattern, []), 0, _value(rec[:dot]))
        return WildIndex(table.items())

    def builtin_alias(self, alias: str) -> list[str]:
        """Builtin modules whose aliases match (modules.builtin.alias.bin)."""
        if has_wildcard(alias):
            found = self._trie_search("modules.builtin.alias.bin", alias)
            if found is not None:
                return found
        search = self._builtin_alias_search
        if search is None:
            # every alias that misses modules.alias ends up here: prepare it (it is small)
            idx = self._wild("modules.builtin.alias", self._builtin_modinfo_aliases,
                             prepare=True)
            search = self._builtin_alias_search = (idx.search if isinstance(idx, WildIndex)
                                                   else _nothing)
        return search(alias if alias.isascii() else key_bytes_str(alias))


def _nothing(_: str) -> list[str]:
    return []


def _search(idx: BinIndex | WildIndex | None, key: str) -> list[str]:
    if idx is None:
        return []
    if isinstance(idx, BinIndex):
        return idx.searchwild(key, aliasmatch.fnmatch)
    return idx.search(key_bytes_str(key))


def _value(text: str) -> str:
    """Text files are read as latin-1 (one char per byte); values go back to str."""
    if text.isascii():
        return text
    return text.encode("latin-1").decode("utf-8", "surrogateescape")

