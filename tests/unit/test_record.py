"""kmodd.record makes the same classes as the standard library's dataclasses
for every form kmodd uses; each case is built both ways and compared."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodd import record

ROOT = Path(__file__).resolve().parents[2]


def both(build: Any) -> tuple[Any, Any]:
    """The class ``build(dataclass, field)`` makes, by kmodd.record and by dataclasses."""
    return build(record.dataclass, record.field), build(dataclasses.dataclass, dataclasses.field)


def plain(dc: Any, field: Any) -> Any:
    @dc
    class Base:
        a: int
        b: str = "x"
        c: list[int] = field(default_factory=list)
    return Base


def frozen(dc: Any, field: Any) -> Any:
    @dc(frozen=True)
    class Key:
        name: str
        parts: tuple[str, ...] = field(default=())
    return Key


def slotted(dc: Any, field: Any) -> Any:
    @dc(frozen=True, slots=True)
    class Entry:
        mod: str
        n: int = 0
    return Entry


def identity(dc: Any, field: Any) -> Any:
    @dc(eq=False)
    class Job:
        key: str
        done: bool = False
    return Job


def post_init(dc: Any, field: Any) -> Any:
    @dc
    class Checked:
        value: int
        doubled: int = 0

        def __post_init__(self) -> None:
            if self.value < 0:
                raise ValueError("negative")
            self.doubled = 2 * self.value
    return Checked


def inherited(dc: Any, field: Any) -> Any:
    @dc
    class Parent:
        a: int
        b: int = 1

    @dc
    class Child(Parent):
        c: int = 2
        b: int = 5
    return Child


def own_methods(dc: Any, field: Any) -> Any:
    @dc(frozen=True)
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"
    return Named


@pytest.mark.parametrize("build,args", [
    (plain, ((1,), (1, "y", [2]))), (frozen, (("n",), ("n", ("p",)))),
    (slotted, (("m",), ("m", 3))), (identity, (("k",), ("k", True))),
    (post_init, ((3,), (4, 1))), (inherited, ((1,), (1, 2, 3))), (own_methods, (("x",),)),
])
def test_same_class_both_ways(build: Any, args: tuple[tuple[Any, ...], ...]) -> None:
    ours_cls, std_cls = both(build)
    for a in args:
        ours, std = ours_cls(*a), std_cls(*a)
        assert repr(ours).replace(".<locals>", "") == repr(std).replace(".<locals>", "")
        assert [f.name for f in record.fields(ours)] == [f.name for f in dataclasses.fields(std)]
        assert {f.name: getattr(ours, f.name) for f in record.fields(ours)} == \
            {f.name: getattr(std, f.name) for f in dataclasses.fields(std)}
        # equality and hashing follow the same rules
        assert (ours == ours_cls(*a)) == (std == std_cls(*a))
        assert (ours_cls.__hash__ is None) == (std_cls.__hash__ is None)
        if ours_cls.__hash__ is not None:
            assert (hash(ours) == hash(ours_cls(*a))) == (hash(std) == hash(std_cls(*a)))
        assert ours != object() and std != object()
        assert ours_cls.__match_args__ == std_cls.__match_args__
        # replace builds through __init__ (so __post_init__ runs again)
        first = record.fields(ours)[0].name
        assert repr(record.replace(ours, **{first: a[0]})).replace(".<locals>", "") == \
            repr(dataclasses.replace(std, **{first: a[0]})).replace(".<locals>", "")
        with pytest.raises(TypeError):
            record.replace(ours, nonsense=1)


def test_frozen_refuses_assignment_as_an_attribute_error() -> None:
    ours_cls, std_cls = both(frozen)
    for obj in (ours_cls("n"), std_cls("n")):
        with pytest.raises(AttributeError, match="cannot assign to field 'name'"):
            obj.name = "m"
        with pytest.raises(AttributeError):
            del obj.name
    ours_cls, _ = both(slotted)
    with pytest.raises(AttributeError):
        ours_cls("m").n = 1
    assert not hasattr(ours_cls("m"), "__dict__")


def test_defaults_factories_and_errors() -> None:
    ours_cls, _ = both(plain)
    one, two = ours_cls(1), ours_cls(1)
    one.c.append(9)
    assert two.c == []                       # a fresh list each time
    assert ours_cls.b == "x" and not hasattr(ours_cls, "c")
    with pytest.raises(TypeError):
        ours_cls()                           # a is required
    with pytest.raises(ValueError, match="negative"):
        both(post_init)[0](-1)
    with pytest.raises(ValueError, match="mutable default"):
        @record.dataclass
        class Bad:
            xs: list[int] = []
    with pytest.raises(ValueError):
        record.field(default=1, default_factory=int)  # type: ignore[call-overload]
    assert both(own_methods)[0]("x").__repr__() == "<x>"


def test_asdict_converts_nested_records_like_dataclasses() -> None:
    inner_cls, std_inner = both(frozen)
    ours_cls, std_cls = both(plain)
    ours = ours_cls(1, "s", [inner_cls("n", ("a",))])        # type: ignore[list-item]
    std = std_cls(1, "s", [std_inner("n", ("a",))])
    assert record.asdict(ours) == dataclasses.asdict(std)
    with pytest.raises(TypeError):
        record.asdict({"a": 1})


def test_the_daemon_imports_no_dataclasses() -> None:
    """Why this module exists: dataclasses brings inspect, ast, dis."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kmodd.cli.daemon, "
            "kmodd.daemon.service, kmodd.kernel.real, kmodd.kernel.sim; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert "kmodd.daemon.service" in out
    assert not {"dataclasses", "inspect", "ast", "dis"} & set(out)
