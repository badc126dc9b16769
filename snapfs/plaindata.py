"""dataclasses' decorator for the records, without importing dataclasses (issue 16).

`import dataclasses` brings inspect, ast, dis and tokenize: about a third of a reading
verb's start-up. The classes made here behave as `dataclasses.dataclass` makes them (the
same __init__, __repr__, __eq__, __hash__, frozen assignment errors, __match_args__ and
__doc__), and `dataclasses.fields`, `asdict` and `replace` work on them: their
`__dataclass_fields__` is made by dataclasses itself the first time it is asked for. Only
what the records use is supported: no inheritance, no `init=False`, no ClassVar.
"""

from __future__ import annotations

import reprlib

TYPE_CHECKING = False  # typing itself is not imported: a reading verb has no use for it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_MISSING = object()


class _FactoryDefault:
    """__init__'s default for a field with a default factory (named as dataclasses names it)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _FactoryDefault()


class _Factory:
    def __init__(self, factory: Callable[[], object]) -> None:
        self.factory = factory


def field(*, default: object = _MISSING, default_factory: Callable[[], object] | None = None) -> Any:
    """dataclasses.field(default=...) or (default_factory=...): a fresh default for each instance."""
    if (default is _MISSING) == (default_factory is None):
        raise ValueError("give field() one of default and default_factory")
    return default if default_factory is None else _Factory(default_factory)


def asdict(obj: object) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)  # type: ignore[call-overload]


def replace(obj: Any, /, **changes: object) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def dataclass(cls: type | None = None, /, *, frozen: bool = False) -> Any:
    """`@dataclass` or `@dataclass(frozen=True)`, as the standard library's."""

    def wrap(cls: type) -> type:
        return _process(cls, frozen)

    return wrap if cls is None else wrap(cls)


def _process(cls: type, frozen: bool) -> type:
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    for name in defaults:
        delattr(cls, name)  # as dataclasses: a default stays a class attribute, a factory does not
        if not isinstance(defaults[name], _Factory):
            setattr(cls, name, defaults[name])
    for name, method in _methods(cls, names, defaults, frozen).items():
        setattr(cls, name, method)
    cls.__hash__ = _hash(names) if frozen else None  # type: ignore[assignment,method-assign]
    if frozen:
        cls.__setattr__ = _frozen("cannot assign to field")  # type: ignore[method-assign]
        cls.__delattr__ = _frozen("cannot delete field")  # type: ignore[method-assign]
    cls.__match_args__ = names  # type: ignore[attr-defined]
    cls.__dataclass_fields__ = _Fields(names, defaults, frozen)  # type: ignore[attr-defined]
    if not cls.__doc__:
        cls.__doc__ = cls.__name__ + _signature(cls, names, defaults)
    return cls


def _methods(cls: type, names: tuple[str, ...], defaults: dict[str, object], frozen: bool) -> dict[str, Any]:
    """__init__, __repr__ and __eq__, as dataclasses writes them, compiled in one go."""
    scope: dict[str, object] = {"_FACTORY": _FACTORY, "_set": object.__setattr__}
    exec(_init(names, defaults, frozen, scope) + _repr(names) + _eq(names), scope)  # noqa: S102  (as dataclasses)
    methods: dict[str, Any] = {}
    for name in ("__init__", "__repr__", "__eq__"):
        methods[name] = scope[name]
        methods[name].__qualname__ = f"{cls.__qualname__}.{name}"
    annotations = cls.__dict__.get("__annotations__", {})
    methods["__init__"].__annotations__ = {**{n: annotations[n] for n in names}, "return": None}
    methods["__repr__"] = reprlib.recursive_repr()(methods["__repr__"])
    return methods


def _init(names: tuple[str, ...], defaults: dict[str, object], frozen: bool, scope: dict[str, object]) -> str:
    params, body = [], []
    for n in names:
        default = defaults.get(n, _MISSING)
        value = n
        if isinstance(default, _Factory):
            scope[f"_factory_{n}"] = default.factory
            params.append(f"{n}=_FACTORY")
            value = f"_factory_{n}() if {n} is _FACTORY else {n}"
        elif default is not _MISSING:
            scope[f"_default_{n}"] = default
            params.append(f"{n}=_default_{n}")
        else:
            params.append(n)
        body.append(f"_set(self, {n!r}, {value})" if frozen else f"self.{n} = {value}")
    return f"def __init__(self, {', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body or ["pass"])


def _repr(names: tuple[str, ...]) -> str:
    shown = ", ".join(f"{n}={{self.{n}!r}}" for n in names)
    return f"def __repr__(self):\n    return self.__class__.__qualname__ + f'({shown})'\n"


def _eq(names: tuple[str, ...]) -> str:
    mine = "".join(f"self.{n}," for n in names)
    theirs = "".join(f"other.{n}," for n in names)
    return (
        "def __eq__(self, other):\n"
        "    if other.__class__ is self.__class__:\n"
        f"        return ({mine}) == ({theirs})\n"
        "    return NotImplemented\n"
    )


def _hash(names: tuple[str, ...]) -> Callable[[object], int]:
    def __hash__(self: object) -> int:
        return hash(tuple(getattr(self, n) for n in names))

    return __hash__


def _frozen(what: str) -> Callable[..., None]:
    def refuse(self: object, name: str, *value: object) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"{what} {name!r}")

    return refuse


def _signature(cls: type, names: tuple[str, ...], defaults: dict[str, object]) -> str:
    """What dataclasses puts in __doc__: inspect's text of the __init__ signature."""
    annotations = cls.__dict__.get("__annotations__", {})
    params = []
    for n in names:
        text = f"{n}: {annotations[n]!r}"
        default = defaults.get(n, _MISSING)
        if default is not _MISSING:
            text += " = <factory>" if isinstance(default, _Factory) else f" = {default!r}"
        params.append(text)
    return f"({', '.join(params)})"


class _Fields:
    """A record class's `__dataclass_fields__`, made by dataclasses when first asked for
    (dataclasses.fields, asdict, replace, is_dataclass): the fields of a twin class that
    the real decorator processes, set on the record class in place of this descriptor."""

    def __init__(self, names: tuple[str, ...], defaults: dict[str, object], frozen: bool) -> None:
        self.names, self.defaults, self.frozen = names, defaults, frozen

    def __get__(self, instance: object, owner: type) -> dict[str, Any]:
        import dataclasses

        namespace: dict[str, object] = {
            "__module__": owner.__module__,
            "__qualname__": owner.__qualname__,
            "__annotations__": {n: owner.__dict__["__annotations__"][n] for n in self.names},
        }
        for n, default in self.defaults.items():
            factory = isinstance(default, _Factory)
            namespace[n] = dataclasses.field(default_factory=default.factory) if factory else default
        twin = dataclasses.dataclass(frozen=self.frozen)(type(owner.__name__, (), namespace))
        owner.__dataclass_fields__ = twin.__dataclass_fields__  # type: ignore[attr-defined]
        owner.__dataclass_params__ = twin.__dataclass_params__  # type: ignore[attr-defined]
        return twin.__dataclass_fields__  # type: ignore[attr-defined]
