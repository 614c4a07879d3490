"""Module and alias names: normalisation as libkmod does it, and what makes a pattern.

The one place for this vocabulary: the indexes, the configuration and the
resolver all ask here.
"""

from __future__ import annotations

# kmod's index wildcards: an alias containing one is stored in (and searched
# through) the wildcard part of modules.alias.bin (libkmod-index.c).
WILDCARDS = "*?["
# fnmatch(3) gives these a meaning, '\\' included: a pattern without them
# matches only itself, so an exact comparison answers the same.
_GLOB_CHARS = frozenset("*?[\\")


def has_wildcard(alias: str) -> bool:
    """The alias holds one of kmod's index wildcards (``*``, ``?``, ``[``)."""
    return "*" in alias or "?" in alias or "[" in alias


def is_glob(pattern: str) -> bool:
    """``fnmatch(pattern, s, 0)`` could match something other than *pattern* itself."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def modname_normalize(name: str) -> str:
    """``-`` and ``_`` are the same in module names; strip a ``.ko*`` suffix."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".ko")
    if dot > 0 and (len(base) == dot + 3 or base[dot + 3] == "."):
        base = base[:dot]
    return base.replace("-", "_")


def alias_normalize(alias: str) -> str:
    """Replace ``-`` by ``_`` outside ``[...]`` character classes.

    Raises ValueError on an unbalanced ``]`` / ``[`` like libkmod's
    ``alias_normalize`` rejects it (and depmod skips such an alias).
    """
    # Most modaliases have no brackets: no character loop for them.
    if "[" not in alias and "]" not in alias:
        return alias.replace("-", "_")
    out: list[str] = []
    in_class = False
    for ch in alias:
        if in_class:
            if ch == "]":
                in_class = False
            out.append(ch)
        elif ch == "[":
            in_class = True
            out.append(ch)
        elif ch == "]":
            raise ValueError(f"unbalanced ']' in alias {alias!r}")
        elif ch == "-":
            out.append("_")
        else:
            out.append(ch)
    if in_class:
        raise ValueError(f"unterminated '[' in alias {alias!r}")
    return "".join(out)


def alias_normalize_or_none(alias: str) -> str | None:
    """:func:`alias_normalize`, with ``None`` for an alias kmod would reject."""
    try:
        return alias_normalize(alias)
    except ValueError:
        return None
