"""The per-disk layer tree: which file backs which, and what depends on what.

The metadata tree (parent links) and the file tree (backing links) are the same tree,
so every answer here is read off the metadata; nothing here touches a file.
"""

from __future__ import annotations

import os

from .store import LIVE, DiskRecord, DomainFiles, MetadataView

LIVE_DEPENDENT = LIVE


def backing_for(files: DomainFiles, disk: DiskRecord, snap_id: str | None) -> tuple[str, str]:
    """The backing link (as written in an overlay's header) and format for a layer that
    sits on snapshot `snap_id`, or on the base image when `snap_id` is None.

    Layers of one disk share a directory, so in-store links are bare basenames; the base
    image, outside the store, is linked by absolute path.
    """
    if snap_id is None:
        return disk.base, disk.format
    return os.path.basename(files.layer(disk.target, snap_id)), "qcow2"


def dependents(view: MetadataView, snap_id: str) -> list[str]:
    """What sits directly on L(S): child snapshots' ids, and LIVE when current = S."""
    found = [child.id for child in view.children(snap_id)]
    if view.current == snap_id:
        found.append(LIVE_DEPENDENT)
    return found


def subtree(view: MetadataView, snap_id: str) -> list[str]:
    """S and every descendant, parents before children."""
    order = [snap_id]
    for node in order:
        order.extend(child.id for child in view.children(node))
    return order


def ancestors(view: MetadataView, snap_id: str | None) -> list[str]:
    """snap_id and its ancestors up to the root (empty for None)."""
    chain: list[str] = []
    while snap_id is not None and snap_id in view.snapshots and snap_id not in chain:
        chain.append(snap_id)
        snap_id = view.snapshots[snap_id].parent
    return chain


def live_descends_from(view: MetadataView, snap_id: str) -> bool:
    return snap_id in ancestors(view, view.current)
