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
import errno
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

    def __init__(self, top: str, extents: list[Extent], fds: list[int], chain: list[str] | None = None) -> None:
        self.top = top
        self.chain = chain or [top]  # the files read, top first (index = an extent's depth)
        self.extents = extents
        self._starts = [e.start for e in extents]
        self._fds = fds
        self.size = extents[-1].start + extents[-1].length if extents else 0
        self._nbd: NbdReader | None = None
        self._nbd_lock = trio.Lock()

    @classmethod
    async def open(cls, top: str) -> SnapshotImage:
        fds: list[int] = []
        chain: list[str] = []
        try:
            for path, _ in await qemu.backing_chain(top):
                chain.append(path)
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                qemu.hold_read_locks(fds[-1], path)
            extents = [Extent.from_map(e) for e in await qemu.extent_map(top)]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(top, extents, fds, chain)

    async def read(self, offset: int, length: int) -> bytearray | memoryview:
        """The bytes at [offset, offset + length), short only at the end of the disk.

        One buffer is filled in place and returned as is (converting a fresh MiB to
        bytes costs more than reading it): unallocated and zero extents stay zero;
        extents with a file offset are read with preadv, first without blocking
        (RWF_NOWAIT: what the page cache holds, in the event loop), the rest in one
        worker thread per call (a thread hop costs more than a page-cache pread of a
        MiB); compressed extents come from qemu-nbd."""
        end = min(offset + length, self.size)
        if end <= offset:
            return bytearray()
        index = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        first = self.extents[index]
        if not first.data and end <= first.start + first.length and end - offset <= len(_ZEROS):
            return _ZEROS_VIEW[: end - offset]  # all zeros: no buffer to allocate or fill
        buffer = bytearray(end - offset)
        view = memoryview(buffer)
        direct: list[tuple[int, int, memoryview]] = []  # (fd, file offset, where to)
        compressed: list[tuple[int, int]] = []  # (disk offset, length)
        position = offset
        while position < end:
            extent = self.extents[index]
            count = min(end, extent.start + extent.length) - position
            if extent.data and extent.offset is not None:
                where = extent.offset + position - extent.start
                direct.append((self._fds[extent.depth], where, view[position - offset : position - offset + count]))
            elif extent.data:
                compressed.append((position, count))
            position += count
            index += 1
        direct = _pread_cached(direct)
        if direct:
            await trio.to_thread.run_sync(_pread_all, direct)
        for position, count in compressed:
            view[position - offset : position - offset + count] = await (await self._nbd_reader()).read(position, count)
        return buffer

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


_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_ZEROS = b"\0" * (1 << 20)  # written once (not calloc'd), so its pages are real: copying from it faults nothing
_ZEROS_VIEW = memoryview(_ZEROS)


def _pread_cached(pieces: list[tuple[int, int, memoryview]]) -> list[tuple[int, int, memoryview]]:
    """Read what the page cache holds without blocking; the pieces (or their rest) left."""
    if not _NOWAIT:
        return pieces
    for index, (fd, where, into) in enumerate(pieces):
        done = 0
        while done < len(into):
            try:
                count = os.preadv(fd, [into[done:]], where + done, _NOWAIT)
            except (BlockingIOError, OSError):
                count = 0  # EAGAIN (not cached), or NOWAIT unsupported here: the thread reads it
            if count == 0:
                return [(fd, where + done, into[done:]), *pieces[index + 1 :]]
            done += count
    return []


def _pread_all(pieces: list[tuple[int, int, memoryview]]) -> None:
    for fd, where, into in pieces:
        done = 0
        while done < len(into):
            count = os.preadv(fd, [into[done:]], where + done)
            if count == 0:  # a layer shorter than its map says: never hand out zeros for data
                raise OSError(errno.EIO, "short read from a layer file")
            done += count


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
