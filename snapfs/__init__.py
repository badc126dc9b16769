"""snapfs: virtual-machine disk snapshots as files, commands and a Python API.

The API's names load on first use, so importing a pure module (snapfs.rules) does not
pull in trio or qemu.
"""

from __future__ import annotations

import sys

from .errors import DependentsError, SnapfsError

_API_NAMES = ("Domain", "Snapshot", "Store", "open_store")
_RULES_NAMES = ("CONTROL_WORDS", "DeactivateFlags")  # rules.py is not needed by `snapfs --help`

__all__ = [
    "CONTROL_WORDS",  # noqa: F822 (loaded lazily by __getattr__)
    "DeactivateFlags",  # noqa: F822
    "DependentsError",
    "Domain",  # noqa: F822 (loaded lazily by __getattr__)
    "SnapfsError",
    "Snapshot",  # noqa: F822
    "Store",  # noqa: F822
    "open_store",  # noqa: F822
]


def __getattr__(name: str) -> object:
    if name in _API_NAMES:
        return getattr(_submodule("api"), name)
    if name in _RULES_NAMES:
        return getattr(_submodule("rules"), name)
    try:
        return _submodule(name)  # snapfs.api and the like
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def _submodule(name: str) -> object:
    """snapfs.NAME, imported by the import statement's own machinery (importlib, with
    warnings, is not needed, and `python -X importtime` reports the import)."""
    __import__(f"{__name__}.{name}")
    return sys.modules[f"{__name__}.{name}"]
