"""The records of a store, as plain data: a domain's disks, its snapshots, one reading.

No I/O here (store.py reads and writes these records), so the rules can plan over them
without importing trio or any engine.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping

from .plaindata import dataclass, field

LIVE = "live"  # the live disk among dependents; layers/<target>/live.qcow2 is its stable name
LIVE_LINK = "live.qcow2"  # a relative symlink to the live layer's real file, in the same directory
COMPRESSIONS = ("gzip", "zstd", "none")


@dataclass
class DiskRecord:
    target: str
    base: str
    format: str
    size: int


@dataclass
class DomainRecord:
    name: str
    uuid: str
    disks: list[DiskRecord]

    @classmethod
    def from_json(cls, data: dict) -> DomainRecord:
        return cls(data["name"], data["uuid"], [DiskRecord(**d) for d in data["disks"]])


@dataclass
class SnapshotRecord:
    id: str
    name: str
    parent: str | None
    creation_time: int
    description: str = ""
    state: str = "shutoff"
    compression: str = "none"
    # {target: basename of L(S)'s real file}; None (snapshots made before layers had their
    # own names) means <id>.qcow2 on every disk. Read it through layer_name().
    layers: dict[str, str] | None = None
    # The snapshots in its chain when it was made, itself included (0: not recorded, a
    # record from before). Never less than its depth now: no operation moves a snapshot
    # under a deeper one (merges and discards only take ancestors away).
    depth: int = 0

    @classmethod
    def from_json(cls, data: dict) -> SnapshotRecord:
        return cls(**{k: data[k] for k in cls.__match_args__ if k in data})


MEMORY_STATES = ("running", "paused")  # a snapshot's state when its memory was saved (engines/memory.py)


def has_memory(record: SnapshotRecord) -> bool:
    return record.state in MEMORY_STATES


def layer_name(record: SnapshotRecord, target: str) -> str:
    """The basename of L(S)'s real file on disk `target` (beside the disk's other layers):
    the one answer to that question (store.py joins it to the directory)."""
    if record.layers is not None and target in record.layers:
        return record.layers[target]
    return f"{record.id}.qcow2"


def live_name(view: MetadataView, target: str) -> str:
    """The basename of the live layer's real file on disk `target`."""
    return view.live[target]


def fresh_layer_name() -> str:
    """A new real layer file's basename: a uuid of its own, never reused across disks."""
    import uuid  # here, not at the top: the reading verbs never make a name

    return f"{uuid.uuid4()}.qcow2"


def snapshot_order(record: SnapshotRecord) -> tuple[int, str]:
    """The one order of snapshots everywhere: creation time, then name."""
    return record.creation_time, record.name


@dataclass(frozen=True)
class MetadataView:
    """One consistent-enough reading of a domain's metadata (see DomainFiles.view)."""

    generation: int
    current: str | None
    snapshots: Mapping[str, SnapshotRecord]  # a dict, or a Layered one carried from the view before
    epoch: str | None = None
    live: dict[str, str] = field(default_factory=dict)  # {target: basename of the live layer's real file}

    @functools.cached_property
    def _by_name(self) -> Mapping[str, SnapshotRecord]:
        return {record.name: record for record in self.snapshots.values()}

    @functools.cached_property
    def _in_order(self) -> list[SnapshotRecord]:
        return sorted(self.snapshots.values(), key=snapshot_order)

    @functools.cached_property
    def _children(self) -> dict[str | None, list[SnapshotRecord]]:
        kids: dict[str | None, list[SnapshotRecord]] = {}
        for record in self._in_order:
            kids.setdefault(record.parent, []).append(record)
        return kids

    def by_name(self, name: str) -> SnapshotRecord | None:
        return self._by_name.get(name)

    def in_order(self) -> list[SnapshotRecord]:
        """Every snapshot, oldest first (creation time, then name)."""
        return list(self._in_order)

    def children(self, snap_id: str | None) -> list[SnapshotRecord]:
        """Oldest first. Indexes are built once per view, so walking a tree stays linear."""
        return list(self._children.get(snap_id, ()))

    def targets(self) -> list[str]:
        """The disks' targets, as the live layers' names record them."""
        return list(self.live)

    @functools.cached_property
    def _layer_owners(self) -> dict[str, str | None]:
        owners: dict[str, str | None] = {}
        for target in self.live:
            names = {self.live[target]} | {layer_name(record, target) for record in self.snapshots.values()}
            for name in names:
                owners[name] = target if name not in owners else None  # None: two disks share the name
        return owners

    def layer_files(self) -> dict[str, str]:
        """{basename: target} of every real layer file of every disk (live and frozen),
        leaving out a basename that more than one disk uses (legacy <id>.qcow2 layers of a
        domain with several disks)."""
        return {name: target for name, target in self._layer_owners.items() if target is not None}


class Layered(Mapping):
    """A read-only mapping: a plain dict shared with older views, and the changes made
    since ({key: value, or None for a key removed}). Carrying a view to the next generation
    copies the changes only; once they outgrow FOLD_AT (or the square root of the size)
    they are folded into a new plain dict, so a change costs O(1) amortised and a lookup
    two dict probes. Iteration keeps a plain dict's order (a changed key stays in place)."""

    __slots__ = ("_base", "_changes", "_len")
    FOLD_AT = 64

    def __init__(self, base: dict, changes: dict) -> None:
        self._base, self._changes = base, changes
        gone = sum(1 for key, value in changes.items() if value is None and key in base)
        self._len = len(base) - gone + sum(1 for key, value in changes.items() if value is not None and key not in base)

    @classmethod
    def carried(cls, old: Mapping, updates: dict) -> Mapping:
        """`old` with `updates` ({key: new value, or None: removed}) applied; `old` is unchanged."""
        if isinstance(old, Layered):
            base, changes = old._base, {**old._changes, **updates}
        else:
            base, changes = old, dict(updates)
        if len(changes) > max(cls.FOLD_AT, math.isqrt(len(base))):
            folded = dict(base)
            for key, value in changes.items():
                if value is None:
                    folded.pop(key, None)
                else:
                    folded[key] = value
            return folded
        return cls(base, changes)

    def __getitem__(self, key: object) -> object:
        changes = self._changes
        if key in changes:
            value = changes[key]
            if value is None:
                raise KeyError(key)
            return value
        return self._base[key]

    def get(self, key: object, default: object = None) -> object:
        changes = self._changes
        if key in changes:
            value = changes[key]
            return default if value is None else value
        return self._base.get(key, default)

    def __contains__(self, key: object) -> bool:
        changes = self._changes
        if key in changes:
            return changes[key] is not None
        return key in self._base

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator:
        for key, _ in self._pairs():
            yield key

    def _pairs(self) -> Iterator[tuple[object, object]]:
        changes, base = self._changes, self._base
        for key, value in base.items():
            if key in changes:
                value = changes[key]
                if value is None:
                    continue
            yield key, value
        for key, value in changes.items():
            if value is not None and key not in base:
                yield key, value

    def values(self) -> list:  # type: ignore[override]  # a list serves every caller (they iterate, sort or count)
        return [value for _, value in self._pairs()]

    def items(self) -> list:  # type: ignore[override]
        return list(self._pairs())


def carry_name_index(old: MetadataView, new: MetadataView, changed: list[str]) -> None:
    """Give `new` the name index of `old` updated for the changed ids, if `old` had built
    one: the changes are layered over the old index (Layered), not a copy of 10,000 names."""
    names = old.__dict__.get("_by_name")
    if names is None:
        return
    updates: dict[str, SnapshotRecord | None] = {}
    for snap_id in changed:
        before, after = old.snapshots.get(snap_id), new.snapshots.get(snap_id)
        if before is not None:
            holder = updates[before.name] if before.name in updates else names.get(before.name)
            if holder is before:
                updates[before.name] = None
        if after is not None:
            updates[after.name] = after
    new.__dict__["_by_name"] = Layered.carried(names, updates)  # what cached_property itself would store
