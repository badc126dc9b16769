"""snapfs: virtual-machine disk snapshots as files, commands and a Python API."""

from .api import Domain, Snapshot, Store, open_store
from .domain import CONTROL_WORDS, DeactivateFlags
from .errors import DependentsError, SnapfsError

__all__ = [
    "CONTROL_WORDS",
    "DeactivateFlags",
    "DependentsError",
    "Domain",
    "SnapfsError",
    "Snapshot",
    "Store",
    "open_store",
]
