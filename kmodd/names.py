"""Module and alias name normalisation, as libkmod does it."""

from __future__ import annotations


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
    ``alias_normalize`` rejects it.
    """
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
