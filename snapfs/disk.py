"""A snapshot's disk as plain bytes, for backup tools: reads straight from the layer
files (`qemu-img map`, then pread), qemu's own reader (a private qemu-nbd) for compressed
clusters, and the extents a snapshot changed since its parent.

A frozen chain never changes its content, so its `qemu-img map` is computed once per
open disk (at its first read) and each read becomes `pread` on the right layer at the
mapped offset; unallocated and zero extents read as zeros. Compressed clusters have no
offset: those are read through a read-only qemu-nbd, started on demand. A .map names the
layer file and offset of each data extent that lies uncompressed in a layer file of the
store, so a backup tool holding the .raw open may copy those bytes from the file itself.

An open disk holds every file of its chain open and holds QEMU's reader locks on them,
so an operation that would rewrite one of those files (a merge that commits into it)
is refused with EBUSY while the disk is open, and a file that is renamed over or
deleted meanwhile keeps serving the bytes it had.

The busy policy: what is left is an operation that had already passed that check when
the disk was opened, e.g. a merge of S that has committed its dependent into L(S) (L(S)
then holds S + D) but not yet removed S. Its journal names L(S), so opening or mapping
a snapshot whose chain an unfinished operation names is refused (EBUSY, recorded in
last-error) instead of serving bytes that may not be S's; a snapshot gone meanwhile is
ENOENT.

The entry points take the domain (`open_disk`, `changes`): the filesystem reaches a
snapshot's bytes only through them, never through qemu directly.
"""

from __future__ import annotations

import bisect
import errno
import os
import shutil
import signal
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from . import layerlock, qemu
from .errors import SnapfsError, busy, io_error, not_found, single

if TYPE_CHECKING:
    from .domain import DomainCore


# ---- the entry points: a snapshot's disk, reached through its domain ----------------------
async def open_disk(dom: DomainCore, snap_id: str, target: str) -> SnapshotDisk:
    """Snapshot `snap_id`'s disk `target`, opened for reading until close() (see the module
    docstring for what an open disk holds and what is refused meanwhile)."""
    layer = _layer(dom, snap_id, target)
    _refuse_while_changing(dom, snap_id, target, [layer], "open")
    try:
        disk = await SnapshotDisk.open(layer, mapped=False)
    except SnapfsError as exc:
        _refuse_if_gone_or_changing(dom, snap_id, target, [layer], "open")
        if exc.errno == errno.EBUSY:  # qemu's message names a layer file: name the snapshot
            _refuse_while_written(dom, snap_id, target, "open")
        raise
    try:
        _refuse_if_gone_or_changing(dom, snap_id, target, disk.chain, "open")
    except BaseException:
        with trio.CancelScope(shield=True):
            await disk.close()
        raise
    return disk


async def changes(dom: DomainCore, snap_id: str, target: str, whole: bool = False) -> list[dict]:
    """What L(S) of disk `target` holds against its backing (see changed_extents), or with
    `whole` where S's whole image holds data (see data_extents). The extents are S's for
    as long as the domain's metadata keeps the generation it had before the call (a merge
    of S's parent changes both)."""
    layer = _layer(dom, snap_id, target)
    _refuse_while_changing(dom, snap_id, target, [layer], "read")
    try:
        extents = await (data_extents(layer, _layer_names(dom, target)) if whole else changed_extents(layer))
    except SnapfsError as exc:
        _refuse_if_gone_or_changing(dom, snap_id, target, [layer], "read")
        if exc.errno == errno.EBUSY:
            _refuse_while_written(dom, snap_id, target, "read")
        raise
    _refuse_if_gone_or_changing(dom, snap_id, target, [layer], "read")
    return extents


def _layer_names(dom: DomainCore, target: str) -> dict[str, str]:
    """{real path: basename} of disk `target`'s layer files that /<dom>/disks/ shows."""
    owners, targets = dom.view().layer_files(), {disk.target for disk in dom.disks}
    return {
        os.path.normpath(dom.files.layer_path(target, name)): name
        for name, owner in owners.items()
        if owner == target and name not in targets  # /<dom>/disks/<target> is the live link
    }


def _layer(dom: DomainCore, snap_id: str, target: str) -> str:
    if snap_id not in dom.view().snapshots:
        raise not_found(f"Domain {dom.name!r} has no such snapshot (it may have been merged or discarded).")
    if all(disk.target != target for disk in dom.disks):
        raise not_found(f"Domain {dom.name!r} has no disk {target!r}.")
    return dom.layer_path(target, snap_id)


def _refuse_if_gone_or_changing(dom: DomainCore, snap_id: str, target: str, paths: list[str], what: str) -> None:
    """ENOENT if the snapshot is gone now, EBUSY if an unfinished operation names one of `paths`."""
    if snap_id not in dom.view().snapshots:
        raise not_found(f"Domain {dom.name!r} has no such snapshot (it may have been merged or discarded).")
    _refuse_while_changing(dom, snap_id, target, paths, what)


def _refuse_while_changing(dom: DomainCore, snap_id: str, target: str, paths: list[str], what: str) -> None:
    operation = dom.operation_naming(paths)
    if operation is None:
        return
    record = dom.view().snapshots.get(snap_id)
    name = record.name if record else snap_id
    message = (
        f"Disk {target} of snapshot {name!r} cannot be {'opened' if what == 'open' else 'read'} while the "
        f"unfinished {operation} changes its files; try again when it is done."
    )
    dom.record_error(what, message)
    raise busy(message)


def _refuse_while_written(dom: DomainCore, snap_id: str, target: str, what: str) -> None:
    record = dom.view().snapshots.get(snap_id)
    name = record.name if record else snap_id
    message = (
        f"Disk {target} of snapshot {name!r} cannot be {'opened' if what == 'open' else 'read'} while another "
        "process writes its files (a merge in progress or a running QEMU); try again when it is done."
    )
    dom.record_error(what, message)
    raise busy(message)


# ---- an open disk: the map, pread, and qemu-nbd for compressed clusters -------------------
@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    depth: int
    data: bool
    offset: int | None

    @classmethod
    def from_map(cls, entry: dict) -> Extent:
        return cls(entry["start"], entry["length"], entry["depth"], entry["data"], entry.get("offset"))


class SnapshotDisk:
    """One open snapshot disk (a layer file and its backing chain)."""

    def __init__(self, top: str, extents: list[Extent] | None, fds: list[int], chain: list[str] | None = None) -> None:
        self.top = top
        self.chain = chain or [top]  # the files read, top first (index = an extent's depth)
        self._fds = fds
        self._nbd: NbdReader | None = None
        self._nbd_lock = trio.Lock()
        self._map_lock = trio.Lock()
        self._mapped(extents)

    def _mapped(self, extents: list[Extent] | None) -> None:
        self.extents = extents
        self._starts = [e.start for e in extents or ()]
        self.size = extents[-1].start + extents[-1].length if extents else 0

    @classmethod
    async def open(cls, top: str, mapped: bool = True) -> SnapshotDisk:
        """Open top's chain and hold QEMU's reader locks on it; unless `mapped`, its map is
        made at the first read (a backup tool that reads the layer files a .map names
        never reads the .raw it holds open). While the locks are held no file of the chain
        can be written, renamed over or replaced, so a later map is the same."""
        fds: list[int] = []
        chain: list[str] = []
        try:
            for path in await _chain_of(top):
                chain.append(path)
                # a layer (beside top) is never a symlink; the base image outside the store may be one
                fds.append(layerlock.open_regular(path, follow=os.path.dirname(path) != os.path.dirname(top)))
                qemu.hold_read_locks(fds[-1], path)
            extents = [Extent.from_map(e) for e in await qemu.extent_map(top)] if mapped else None
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
        if self.extents is None:
            async with self._map_lock:
                if self.extents is None:
                    self._mapped([Extent.from_map(e) for e in await qemu.extent_map(self.top)])
        assert self.extents is not None
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
            view[position - offset : position - offset + count] = await self._read_compressed(position, count)
        return buffer

    async def _read_compressed(self, offset: int, length: int) -> bytes:
        """Bytes through qemu-nbd, within NBD_ANSWER_SECONDS: a qemu-nbd that hangs, or one
        whose connection broke, is stopped and the next read starts a new one."""
        reader = None
        try:
            with trio.fail_after(NBD_ANSWER_SECONDS):
                reader = await self._nbd_reader()
                return await reader.read(offset, length)
        except trio.TooSlowError:
            await self._drop_nbd(reader)
            raise io_error(
                f"qemu-nbd reading {self.top} did not answer within {NBD_ANSWER_SECONDS:g} s; "
                "the next read starts a new one."
            ) from None
        except SnapfsError:
            await self._drop_nbd(reader)
            raise

    async def _nbd_reader(self) -> NbdReader:
        async with self._nbd_lock:
            if self._nbd is None:
                reader = NbdReader(self.top)
                await reader.start()
                self._nbd = reader
            return self._nbd

    async def _drop_nbd(self, reader: NbdReader | None) -> None:
        with trio.CancelScope(shield=True):
            async with self._nbd_lock:
                if reader is not None and self._nbd is reader:
                    self._nbd = None
                    await reader.stop()

    async def close(self) -> None:
        if self._nbd is not None:
            await self._nbd.stop()
            self._nbd = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# The chains qemu-img info gave, by top layer: {top: (check_chain's chain then, qemu's files)}.
_CHAINS: OrderedDict[str, tuple[list[tuple[str, str]], list[str]]] = OrderedDict()
CHAINS_KEPT = 4096


async def _chain_of(top: str) -> list[str]:
    """The files of top's chain, top first, as `qemu-img info --backing-chain` names them
    (the index is `depth` in `qemu-img map`). qemu finds them from the same headers
    layerlock.check_chain reads (the backing names), so its answer is reused for as long
    as check_chain, run every time, finds the same chain: opening a .raw again costs no
    qemu-img run. qemu's answer is kept only where it names the files check_chain found."""
    checked = await trio.to_thread.run_sync(layerlock.check_chain, top)
    kept = _CHAINS.get(top)
    if kept is not None and kept[0] == checked:
        _CHAINS.move_to_end(top)
        return kept[1]
    chain = [path for path, _ in await qemu.backing_chain(top)]
    if chain == [os.path.abspath(path) for path, _ in checked]:  # else the chain changed meanwhile: keep nothing
        _CHAINS[top] = (checked, chain)
        if len(_CHAINS) > CHAINS_KEPT:
            _CHAINS.popitem(last=False)
    return chain


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


async def data_extents(top: str, names: dict[str, str] | None = None) -> list[dict]:
    """Where the image (the layer through its whole chain) holds data, as a full backup
    must copy it: {"start", "length"}, neighbours joined; everything else reads as zeros.

    With `names` ({real path: basename}, the layer files /<dom>/disks/ shows), an extent
    whose data lies uncompressed in one of them also says where: "file" (that basename)
    and "offset" (where in that file), so a backup tool may copy it from the file itself;
    neighbours are then joined only where they are contiguous in the same file."""
    entries, chain = await _map_and_chain(top, bool(names))
    found: list[dict] = []
    for entry in entries:
        if not entry["data"] or entry["zero"]:
            continue
        extent = {"start": entry["start"], "length": entry["length"]}
        depth = entry["depth"]
        name = (names or {}).get(os.path.normpath(chain[depth])) if depth < len(chain) else None
        if name is not None and "offset" in entry and not entry.get("compressed"):
            extent.update(file=name, offset=entry["offset"])
        if found and _continues(found[-1], extent):
            found[-1]["length"] += extent["length"]
        else:
            found.append(extent)
    return found


def _continues(last: dict, extent: dict) -> bool:
    """Whether `extent` carries on where `last` ends, in the image and in the file it names."""
    if last["start"] + last["length"] != extent["start"] or last.get("file") != extent.get("file"):
        return False
    return "offset" not in last or last["offset"] + last["length"] == extent["offset"]


async def _map_and_chain(top: str, with_chain: bool) -> tuple[list[dict], list[str]]:
    """`qemu-img map` of top and, if asked, its chain (index = depth), run side by side."""
    if not with_chain:
        return await qemu.extent_map(top), []
    chain: list[str] = []

    async def read_chain() -> None:
        chain.extend(path for path, _ in await qemu.backing_chain(top))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_chain)
            entries = await qemu.extent_map(top)
    except BaseExceptionGroup as group:
        raise single(group)  # noqa: B904  (a SnapfsError stays one: callers catch it)
    return entries, chain


# ---- NBD: qemu's own reader, for what cannot be read straight from a file -------------------
# Only the fixed-newstyle handshake with NBD_OPT_EXPORT_NAME and simple replies to
# NBD_CMD_READ are spoken (no structured replies are asked for); the server is
# `qemu-nbd --read-only` on a unix socket in a private directory.
_INIT_MAGIC = b"NBDMAGIC"
_OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_EXPORT_NAME = 1
_REQUEST_MAGIC = 0x25609513
_REPLY_MAGIC = 0x67446698
_CMD_READ = 0
_CMD_DISC = 2
_MAX_REQUEST = 32 << 20


async def _end_process(pid: int, wait: float = 5.0) -> None:
    """SIGTERM qemu-nbd (not our child: it forked) and wait until it is gone, so its
    image locks are released when stop() returns; SIGKILL if it does not end in `wait`."""
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        if await _ended_within(pid, wait):
            return
        os.kill(pid, signal.SIGKILL)
        await _ended_within(pid, wait)  # a SIGKILLed process is not gone at once either
    except ProcessLookupError:
        pass


async def _ended_within(pid: int, wait: float) -> bool:
    with trio.move_on_after(wait):
        while not qemu.process_ended(pid):
            await trio.sleep(0.01)
        return True
    return False


NBD_ANSWER_SECONDS = 30.0  # a 1 MiB read of compressed clusters takes milliseconds


class NbdReader:
    """Reads of one image (with its backing chain) through a private qemu-nbd."""

    def __init__(self, image: str) -> None:
        self.image = image
        self._dir = ""
        self._pid = 0
        self._stream: trio.SocketStream | None = None
        self._lock = trio.Lock()
        self._cookie = 0

    async def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="snapfs-nbd-")
        socket_path = os.path.join(self._dir, "nbd.sock")
        try:
            self._pid = await qemu.start_nbd_server(self.image, socket_path, os.path.join(self._dir, "pid"))
            self._stream = await trio.open_unix_socket(socket_path)
            await self._handshake()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise

    async def _receive(self, count: int) -> bytes:
        assert self._stream is not None
        chunks, needed = [], count
        while needed:
            chunk = await self._stream.receive_some(min(needed, 1 << 20))
            if not chunk:
                raise io_error(f"qemu-nbd for {self.image} closed the connection.")
            chunks.append(chunk)
            needed -= len(chunk)
        return b"".join(chunks)

    async def _handshake(self) -> None:
        assert self._stream is not None
        magic, opts_magic, flags = struct.unpack(">8sQH", await self._receive(18))
        if magic != _INIT_MAGIC or opts_magic != _OPTS_MAGIC or not flags & _FLAG_FIXED_NEWSTYLE:
            raise io_error(f"qemu-nbd for {self.image} does not speak fixed-newstyle NBD.")
        client_flags = _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)
        await self._stream.send_all(struct.pack(">I", client_flags))
        await self._stream.send_all(struct.pack(">QII", _OPTS_MAGIC, _OPT_EXPORT_NAME, 0))
        await self._receive(10)  # the export's size and flags: the map gave the size
        if not flags & _FLAG_NO_ZEROES:
            await self._receive(124)

    async def read(self, offset: int, length: int) -> bytes:
        pieces = []
        async with self._lock:
            while length:
                count = min(length, _MAX_REQUEST)
                pieces.append(await self._read_once(offset, count))
                offset += count
                length -= count
        return b"".join(pieces)

    async def _read_once(self, offset: int, length: int) -> bytes:
        assert self._stream is not None
        self._cookie += 1
        await self._stream.send_all(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_READ, self._cookie, offset, length))
        magic, error, cookie = struct.unpack(">IIQ", await self._receive(16))
        if magic != _REPLY_MAGIC or cookie != self._cookie:
            raise io_error(f"qemu-nbd for {self.image} sent a reply snapfs does not understand.")
        if error:
            raise io_error(f"qemu-nbd could not read {length} bytes at {offset} of {self.image} (error {error}).")
        return await self._receive(length)

    async def stop(self) -> None:
        if self._stream is not None:
            try:
                await self._stream.send_all(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            self._stream = None
        if self._pid:
            await _end_process(self._pid)
            self._pid = 0
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
