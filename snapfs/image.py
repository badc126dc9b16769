"""A snapshot's disk as plain bytes, for backup tools: reads straight from the layer
files, and the extents a snapshot changed since its parent.

A frozen chain never changes its content, so its `qemu-img map` is computed once per
open image and each read becomes `pread` on the right layer at the mapped offset;
unallocated and zero extents read as zeros. Compressed clusters have no offset: those
are read through qemu's own reader (a private read-only qemu-nbd, started on demand).

An open image holds every file of its chain open and holds QEMU's reader locks on them,
so an operation that would rewrite one of those files (a merge that commits into it)
is refused with EBUSY while the image is open, and a file that is renamed over or
deleted meanwhile keeps serving the bytes it had.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import trio

from . import qemu
from .nbd import NbdReader


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    depth: int
    data: bool
    zero: bool
    offset: int | None

    @classmethod
    def from_map(cls, entry: dict) -> Extent:
        return cls(entry["start"], entry["length"], entry["depth"], entry["data"], entry["zero"], entry.get("offset"))


class SnapshotImage:
    """One open snapshot disk (a layer file and its backing chain)."""

    def __init__(self, top: str, extents: list[Extent], fds: list[int]) -> None:
        self.top = top
        self.extents = extents
        self._starts = [e.start for e in extents]
        self._fds = fds
        self.size = extents[-1].start + extents[-1].length if extents else 0
        self._nbd: NbdReader | None = None
        self._nbd_lock = trio.Lock()

    @classmethod
    async def open(cls, top: str) -> SnapshotImage:
        fds: list[int] = []
        try:
            for path, _ in await qemu.backing_chain(top):
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                qemu.hold_read_locks(fds[-1], path)
            extents = [Extent.from_map(e) for e in await qemu.extent_map(top)]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(top, extents, fds)

    async def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        pieces: list[bytes] = []
        index = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        position = offset
        while position < end:
            extent = self.extents[index]
            count = min(end, extent.start + extent.length) - position
            pieces.append(await self._read_extent(extent, position, count))
            position += count
            index += 1
        return b"".join(pieces)

    async def _read_extent(self, extent: Extent, position: int, count: int) -> bytes:
        if not extent.data:
            return bytes(count)
        if extent.offset is not None:
            fd, where = self._fds[extent.depth], extent.offset + position - extent.start
            return await trio.to_thread.run_sync(os.pread, fd, count, where)
        return await (await self._nbd_reader()).read(position, count)

    async def _nbd_reader(self) -> NbdReader:
        async with self._nbd_lock:
            if self._nbd is None:
                reader = NbdReader(self.top)
                await reader.start()
                self._nbd = reader
            return self._nbd

    async def close(self) -> None:
        if self._nbd is not None:
            await self._nbd.stop()
            self._nbd = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []


async def changed_extents(top: str) -> list[dict]:
    """What the layer itself holds: the extents whose content differs from its backing
    (the parent snapshot, or the base image for a root), as an incremental backup must
    copy them: {"start", "length", "zero"}; neighbours of one kind are joined."""
    found: list[dict] = []
    for entry in await qemu.extent_map(top):
        if entry["depth"] != 0 or not (entry["data"] or entry["zero"]):
            continue
        zero = not entry["data"]
        last = found[-1] if found else None
        if last and last["zero"] == zero and last["start"] + last["length"] == entry["start"]:
            last["length"] += entry["length"]
        else:
            found.append({"start": entry["start"], "length": entry["length"], "zero": zero})
    return found
