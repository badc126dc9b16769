"""The synchronous Python API of the seed (DESIGN section 4).

Each call runs the one async implementation in domain.py under `trio.run`, so the API,
the command line and the mount share every rule.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .domain import DeactivateFlags, DomainCore, StoreCore
from .store import SnapshotRecord, default_store_path

T = TypeVar("T")


def _run(fn: Callable[..., Awaitable[T]], *args) -> T:
    return trio.run(fn, *args)


def open_store(path: str | None = None) -> Store:
    """Open (creating if needed) a store and finish any operation a crash interrupted."""
    store = Store(StoreCore(path or default_store_path()))
    _run(store.core.recover)
    return store


class Store:
    def __init__(self, core: StoreCore) -> None:
        self.core = core

    @property
    def path(self) -> str:
        return self.core.root

    def list_domains(self) -> list[str]:
        return self.core.domain_names()

    def lookup_domain(self, name: str) -> Domain:
        return Domain(self.core.domain(name))

    def define_xml(self, text: str | bytes) -> Domain:
        core, _ = _run(self.core.define_xml, text)
        return Domain(core)

    def define(self, name: str, disks: list[tuple[str, str, str | None]]) -> Domain:
        """disks: (target, image path, 'qcow2' | 'raw' | None to probe once)."""
        core, _ = _run(self.core.define, name, disks)
        return Domain(core)

    def undefine(self, name: str, remove_snapshots: bool = False) -> None:
        _run(self.core.undefine, name, remove_snapshots)


class Domain:
    def __init__(self, core: DomainCore) -> None:
        self.core = core

    @property
    def name(self) -> str:
        return self.core.name

    def uuid(self) -> str:
        return self.core.record().uuid

    def xml_desc(self) -> str:
        return self.core.domain_xml()

    def snapshot_create_xml(self, xml_desc: str | bytes, flags: int = 0) -> Snapshot:
        record = _run(self.core.create_from_xml, xml_desc)
        return Snapshot(self, record.id)

    def snapshot_num(self, flags: int = 0) -> int:
        return len(self.core.view().snapshots)

    def list_snapshot_names(self, flags: int = 0) -> list[str]:
        records = sorted(self.core.view().snapshots.values(), key=lambda r: (r.creation_time, r.name))
        return [r.name for r in records]

    def snapshot_lookup_by_name(self, name: str, flags: int = 0) -> Snapshot:
        return Snapshot(self, self.core.lookup(name).id)

    def create_with_snapshot(self, snapshot: Snapshot, flags: int = 0) -> None:
        _run(self.core.revert, snapshot.id)

    def current_snapshot(self) -> Snapshot | None:
        current = self.core.view().current
        return Snapshot(self, current) if current else None

    def last_error(self) -> str:
        return self.core.last_error()


class Snapshot:
    """A handle on one snapshot, keyed by its internal id: it survives a rename."""

    def __init__(self, domain: Domain, snap_id: str) -> None:
        self.domain = domain
        self.id = snap_id

    def _record(self) -> SnapshotRecord:
        return self.domain.core.get(self.id)

    @property
    def name(self) -> str:
        return self._record().name

    def __repr__(self) -> str:
        return f"<Snapshot {self.domain.name}/{self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.id == self.id and other.domain.name == self.domain.name

    def __hash__(self) -> int:
        return hash(self.id)

    def get_xml_desc(self, flags: int = 0) -> str:
        return self.domain.core.snapshot_xml(self.id)

    def deactivate(self, flags: int = DeactivateFlags.NONE) -> None:
        _run(self.domain.core.deactivate, self.id, flags)

    def rename(self, name: str) -> None:
        _run(self.domain.core.rename, self.id, name)

    def set_description(self, text: str) -> None:
        _run(self.domain.core.set_description, self.id, text)

    def get_description(self) -> str:
        return self._record().description

    def set_compression(self, kind: str) -> None:
        _run(self.domain.core.set_compression, self.id, kind)

    def get_parent(self) -> Snapshot | None:
        parent = self._record().parent
        return Snapshot(self.domain, parent) if parent else None

    def list_children(self) -> list[Snapshot]:
        return [Snapshot(self.domain, c.id) for c in self.domain.core.view().children(self.id)]

    def layer_paths(self) -> dict[str, str]:
        """target -> L(S): `qemu-img convert` of one gives that disk as it was at S."""
        return {d.target: self.domain.core.layer_path(d.target, self.id) for d in self.domain.core.disks}
