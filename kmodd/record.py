"""Record classes: the part of the standard library's dataclasses kmodd uses.

``dataclasses`` imports ``inspect`` (and with it ast, dis and tokenize) for
one line, the signature it writes into a class without a docstring: about
1.1 MB of the idle daemon's memory and a good share of its import time
(docs/performance.md, issue 14).  This module makes the same classes without
it: ``@dataclass``, ``@dataclass(frozen=True)``, ``@dataclass(eq=False)``,
``@dataclass(slots=True)``,
``field(default=...)``, ``field(default_factory=...)``, ``__post_init__``,
``replace``, ``fields`` and ``asdict``, with dataclasses' semantics for each
(generated ``__init__``/``__repr__``/``__eq__``, the ``__hash__`` rules of
``_hash_action``, frozen assignment raising an ``AttributeError``).  Type
checkers see it as a dataclass maker through ``dataclass_transform``.
"""

from __future__ import annotations

# typing (with the collections, functools and re it imports) is for type
# checkers only: the daemon's entry point reaches its first finit_module
# through this module (kmodd.kernel.early), and imports as little as it can.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform, overload

    _T = TypeVar("_T")
    _C = TypeVar("_C", bound=type)


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record (dataclasses.FrozenInstanceError)."""


class Field:
    __slots__ = ("default", "default_factory", "name")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.default = default
        self.default_factory = default_factory

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r}, default={self.default!r}, "
                f"default_factory={self.default_factory!r})")


if TYPE_CHECKING:
    @overload
    def field(*, default: _T) -> _T: ...
    @overload
    def field(*, default_factory: Callable[[], _T]) -> _T: ...
def field(*, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    return Field(default, default_factory)


_FIELDS = "__record_fields__"


def _is_classvar(annotation: object) -> bool:
    # Annotations are strings here (``from __future__ import annotations``),
    # as dataclasses' _is_type sees them.
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _collect(cls: type) -> dict[str, Field]:
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        found.update(getattr(base, _FIELDS, {}) if _FIELDS in base.__dict__ else {})
    # Not inspect.get_annotations: inspect is what this module avoids.
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    for name, annotation in own.items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name = name
        if isinstance(f.default, list | dict | set):
            raise ValueError(f"mutable default {type(f.default)} for field {name} "
                             "is not allowed: use default_factory")
        if isinstance(value, Field):     # the class attribute becomes the plain default
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        found[name] = f
    return found


def _make(name: str, src: str, env: dict[str, Any], qualname: str) -> Any:
    ns: dict[str, Any] = {}
    exec(src, env, ns)
    fn = ns[name]
    fn.__qualname__ = f"{qualname}.{name}"
    return fn


def _set_new(cls: type, name: str, value: Any) -> None:
    # Like dataclasses' _set_new_attribute: a method the class wrote itself stays.
    if name not in cls.__dict__:
        setattr(cls, name, value)


def _slotted(cls: Any, names: list[str]) -> Any:
    # As dataclasses' _add_slots: the same class made again with __slots__.
    body = {k: v for k, v in cls.__dict__.items()
            if k not in names and k not in ("__dict__", "__weakref__")}
    body["__slots__"] = tuple(names)
    new = type(cls)(cls.__name__, cls.__bases__, body)
    new.__qualname__ = cls.__qualname__
    return new


def _process(cls: Any, frozen: bool, eq: bool, slots: bool) -> Any:
    fields_ = _collect(cls)
    names = list(fields_)
    if slots:
        cls = _slotted(cls, names)
    setattr(cls, _FIELDS, fields_)
    qual = cls.__qualname__
    env: dict[str, Any] = {"MISSING": MISSING, "__object_setattr": object.__setattr__}
    params: list[str] = []
    body: list[str] = []
    for n, f in fields_.items():
        if f.default_factory is not MISSING:
            env[f"__factory_{n}"] = f.default_factory
            params.append(f"{n}=MISSING")
            body.append(f"  if {n} is MISSING: {n} = __factory_{n}()")
        elif f.default is not MISSING:
            env[f"__default_{n}"] = f.default
            params.append(f"{n}=__default_{n}")
        else:
            params.append(n)
        body.append(f"  __object_setattr(self, {n!r}, {n})" if frozen else f"  self.{n} = {n}")
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    init = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["  pass"])
    _set_new(cls, "__init__", _make("__init__", init, env, qual))

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{self.__class__.__qualname__}({inner})"
    __repr__.__qualname__ = f"{qual}.__repr__"
    _set_new(cls, "__repr__", __repr__)

    as_tuple = "(" + "".join(f"self.{n}," for n in names) + ")"
    if eq:
        other = as_tuple.replace("self.", "other.")
        src = ("def __eq__(self, other):\n"
               "  if other.__class__ is self.__class__:\n"
               f"    return {as_tuple} == {other}\n"
               "  return NotImplemented")
        _set_new(cls, "__eq__", _make("__eq__", src, env, qual))
    # dataclasses' _hash_action with unsafe_hash=False.
    class_hash = cls.__dict__.get("__hash__", MISSING)
    explicit_hash = not (class_hash is MISSING
                         or (class_hash is None and "__eq__" in cls.__dict__))
    if eq and not explicit_hash:
        if frozen:
            cls.__hash__ = _make("__hash__", f"def __hash__(self):\n  return hash({as_tuple})",
                                 env, qual)
        else:
            cls.__hash__ = None
    if frozen:
        if "__setattr__" in cls.__dict__ or "__delattr__" in cls.__dict__:
            raise TypeError(f"cannot overwrite __setattr__ or __delattr__ in {cls.__name__}")
        frozen_names = frozenset(names)

        def __setattr__(self: Any, name: str, value: Any) -> None:
            if type(self) is cls or name in frozen_names:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)

        def __delattr__(self: Any, name: str) -> None:
            if type(self) is cls or name in frozen_names:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)
        cls.__setattr__ = __setattr__
        cls.__delattr__ = __delattr__
    _set_new(cls, "__match_args__", tuple(names))
    return cls


if TYPE_CHECKING:
    @overload
    @dataclass_transform(field_specifiers=(field, Field))
    def dataclass(cls: _C, /) -> _C: ...
    @overload
    def dataclass(*, frozen: bool = False, eq: bool = True,
                  slots: bool = False) -> Callable[[_C], _C]: ...
def dataclass(cls: Any = None, /, *, frozen: bool = False, eq: bool = True,
              slots: bool = False) -> Any:
    """``@dataclass`` or ``@dataclass(frozen=..., eq=..., slots=...)``: the record's methods."""
    if cls is None:
        return lambda c: _process(c, frozen, eq, slots)
    return _process(cls, frozen, eq, slots)


def fields(obj: Any) -> tuple[Field, ...]:
    """The record's (or record class's) fields, in order."""
    try:
        return tuple(getattr(obj, _FIELDS).values())
    except AttributeError:
        raise TypeError("must be called with a record type or instance") from None


def replace(obj: _T, /, **changes: Any) -> _T:
    """A copy of the record ``obj`` with ``changes`` (through its ``__init__``)."""
    kwargs = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for name in changes:
        if name not in kwargs:
            raise TypeError(f"{type(obj).__name__}.__init__() got an unexpected "
                            f"keyword argument {name!r}")
    kwargs.update(changes)
    return obj.__class__(**kwargs)


def asdict(obj: Any) -> dict[str, Any]:
    """The record as a dict, records, lists, tuples and dicts within converted."""
    if not hasattr(type(obj), _FIELDS):
        raise TypeError("asdict() should be called on record instances")
    return _asdict(obj)


def _asdict(value: Any) -> Any:
    if hasattr(type(value), _FIELDS):
        return {f.name: _asdict(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):      # a named tuple
        return type(value)(*[_asdict(v) for v in value])
    if isinstance(value, list | tuple):
        return type(value)(_asdict(v) for v in value)
    if isinstance(value, dict):
        return type(value)((_asdict(k), _asdict(v)) for k, v in value.items())
    import copy  # only for odd values: records hold plain ones
    return copy.deepcopy(value)
