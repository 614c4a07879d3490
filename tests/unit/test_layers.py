"""The package's layers: a lower layer never imports a higher one.

    top level   kmodd, kmodd.root, kmodd.journal, kmodd.argparsing, kmodd.record
    resolution  names, patterns, indexes, modprobe.d, plans (pure)
    modfile     codecs, ELF, signature, parameters
    kernel      the kernel interface, its implementations, the loader
    daemon      the event loop, request sources, scheduler, state
    cli         front ends: parse, call, print

Every import counts, including those inside functions and under
TYPE_CHECKING: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kmodd"
LAYERS = ("resolution", "modfile", "kernel", "daemon", "cli")


def layer_of(module: str) -> int:
    """0 for the top level, then 1.. in LAYERS order; -1 outside kmodd."""
    parts = module.split(".")
    if parts[0] != "kmodd":
        return -1
    if len(parts) > 1 and parts[1] in LAYERS:
        return 1 + LAYERS.index(parts[1])
    return 0


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, name: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in module ``name``'s source."""
    package = name if is_package else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from kmodd import x" may name a submodule: judge the submodule.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if layer_of(sub) > layer_of(target) else target))
    return out


def violations(source: str, name: str, *, is_package: bool = False) -> list[str]:
    here = layer_of(name)
    return [f"{line}: {name} imports {target}"
            for line, target in imports_of(source, name, is_package=is_package)
            if layer_of(target) > here]


def test_no_lower_layer_imports_a_higher_one() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    found = [f"{path.relative_to(PACKAGE.parent)}:{v}" for path in files
             for v in violations(path.read_text(), module_name(path),
                                 is_package=path.name == "__init__.py")]
    assert found == []


def test_every_module_is_in_a_layer_package_or_the_top_level() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "root", "journal", "argparsing", "record"}, (
        "a new module belongs in one of the layer packages: " + ", ".join(LAYERS))
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)


@pytest.mark.parametrize("source, bad", [
    ("from kmodd.daemon.scheduler import Scheduler\n", True),
    ("from kmodd import cli\n", True),
    ("import kmodd.kernel.loader\n", True),
    ("from ..daemon import state\n", True),
    ("from .names import normalize\n", False),
    ("from kmodd.root import Root\n", False),
    ("def f():\n    from kmodd.cli.common import x\n", True),
])
def test_the_rule_sees_every_form_of_import(source: str, bad: bool) -> None:
    """The checker itself: an upward import from resolution in any spelling is caught."""
    assert bool(violations(source, "kmodd.resolution.probe")) is bad
