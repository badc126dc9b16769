"""The pyfuse3 handlers (DESIGN section 2): inodes and handles <-> vfs calls, errors -> errnos.

What the tree holds and shows is vfs.py's; what the kernel keeps, and forgets after a
change, is kcache.py's; what bytes written to control, compression and description
become is writes.py's; a snapshot's disk bytes come from the opener given to SnapFS
(disk.open_disk); every snapshot rule is the core's. This module keeps the handle table
and maps every error to an errno: a SnapfsError to its own, anything unexpected to EIO
plus a last-error line; nothing escapes into pyfuse3.main.

Files are opened with direct_io, so content is never cached, but for two kinds: a .raw
(whose content never changes, see RAW_DIRECT_IO) and the metadata files of PAGE_CACHED.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyfuse3
import trio

from .errors import DependentsError, SnapfsError
from .kcache import KernelCache, notify_without_waiting
from .vfs import DIRECTORIES, SYMLINKS, WRITABLE, Kind, Node, Reading, Tree, memory_file
from .writes import Writes, Written, record_refusal, refusal

if TYPE_CHECKING:
    from .domain import DomainCore

log = logging.getLogger(__name__)

FUSEError = pyfuse3.FUSEError
T = TypeVar("T")

# A .raw is read with direct_io: each read(2) reaches read() here in requests of up to
# 1 MiB (max_pages: libfuse asks for 256 pages, the kernel's limit), straight into the
# reader's buffer. Measured on a 1 GiB disk, half data, 4 MiB reads, 2 cores: 2.1-2.8
# GB/s; through the page cache it was 0.4-0.5 GB/s (128 KiB readahead requests) and 1.0-1.4
# GB/s with the bdi's read_ahead_kb raised to 4 MiB (two copies and page-cache
# bookkeeping per byte). Backup tools read each snapshot once, and the layer files are in
# the host's page cache anyway, so the FUSE page cache would only hold a second copy.
#
# keep_cache is still safe, and is set, for what does go through the page cache (a
# read-only mmap of a .raw): a .raw's inode is keyed on the snapshot's id, never its name,
# and the content of a snapshot id never changes while it exists (its chain is frozen:
# merges, rebases and recompressions keep every surviving snapshot's content, and the core
# refuses any that would rewrite a file of an open disk). A snapshot merged away and a
# new one made under the same name is a new id, so a new inode with an empty cache:
# cached pages can never be another snapshot's bytes. Inode numbers are never reused.
RAW_DIRECT_IO = True

# Metadata files whose content changes only with the domain's metadata, so with a change
# that is announced: opened for reading, they are read through the page cache (a `cat` is
# an open, a flush and a release; no read, and no getattr, as a read from the cache leaves
# atime alone) and the kernel drops their pages with their attributes (KernelCache.forget).
# Not job and last-error (they change with no announcement), nor a .changes or .map (a read may
# wait for a layer's lock, which an operation announcing a change may hold, while the
# kernel holds the page the invalidation waits for).
PAGE_CACHED = {Kind.DOMAIN_XML, Kind.SNAP_XML, Kind.STATE, Kind.DESCRIPTION, Kind.COMPRESSION, Kind.CONTROL}

# `rm -rf` of a snapshot tries every file in it: the same refusal within this many seconds
# of the last is recorded in last-error once, not once per file.
REPEAT_SECONDS = 2.0


class OpenDisk(Protocol):
    """A snapshot's disk opened for one file handle (disk.SnapshotDisk)."""

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def close(self) -> None: ...


# Opens snapshot `snap_id`'s disk `target` of a domain: disk.open_disk.
DiskOpener = Callable[["DomainCore", str, str], Awaitable[OpenDisk]]


class MemoryFile:
    """A snapshot's saved memory, read from its file in the store (opened once: a merge
    that deletes it meanwhile leaves this handle reading what it opened)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    async def open(cls, tree: Tree, node: Node) -> MemoryFile:
        path = memory_file(node, tree.reading())
        if path is None:
            raise SnapfsError(errno.ENOENT, f"{tree.path(node)} is gone.")
        return cls(await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))

    async def read(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, length, offset)

    async def close(self) -> None:
        os.close(self.fd)


@dataclass
class FileHandle:
    node: Node
    written: Written | None = None  # opened for writing: what was written (writes.py)
    content: bytes = b""  # what read() serves, computed at offset 0
    disk: OpenDisk | None = None  # a .raw: the open snapshot disk it reads from
    cached: bool = False  # read through the page cache (PAGE_CACHED)
    epoch: int = -1  # the kernel cache's epoch when `content` was computed (a cached file)


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[bytes, Node]] = field(default_factory=list)
    epoch: int = 0  # the kernel cache's epoch when the entries were read


def decode_name(name: bytes) -> str | None:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return None


def handler(by_handle: bool = False) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Map errors for pyfuse3: a SnapfsError becomes its errno (refusals made here were
    recorded in last-error where they were made, the core's by the core), anything
    unexpected becomes EIO plus a last-error line. Nothing else may reach pyfuse3.main."""

    def decorate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(self: SnapFS, *args: Any) -> T:
            try:
                return await fn(self, *args)
            except FUSEError:
                raise
            except SnapfsError as exc:
                raise FUSEError(exc.errno) from None
            except Exception as exc:
                log.exception("%s failed unexpectedly", fn.__name__)
                message = f"{fn.__name__} failed unexpectedly: {type(exc).__name__}: {exc}"
                record_refusal(self.tree, self.domain_of(args[0], by_handle), fn.__name__, errno.EIO, message)
                raise FUSEError(errno.EIO) from None

        return wrapper

    return decorate


class SnapFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self, tree: Tree, kcache: KernelCache, writes: Writes, open_disk: DiskOpener, read_only: bool = False
    ) -> None:
        super().__init__()
        self.tree = tree
        self.kcache = kcache
        self.writes = writes
        self.open_disk = open_disk
        self.inodes = kcache.inodes
        self.pending = writes.pending
        self.read_only = read_only  # mounted with -o ro: the kernel refuses changes first
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self._repeated: tuple[str, str, str] | None = None  # the last refusal recorded by refused_once
        self._repeated_at = 0.0

    # ---- errors -----------------------------------------------------------------------
    def domain_of(self, key: object, by_handle: bool) -> str:
        """The domain a request was about (for last-error), or '' at the root."""
        try:
            if by_handle:
                handle = self._handles.get(int(key))  # type: ignore[arg-type]
                return handle.node.dom if handle else ""
            return self.inodes.node(int(key)).dom  # type: ignore[arg-type]
        except (FUSEError, TypeError, ValueError):
            return ""

    def refused(self, node: Node, err: int, operation: str, message: str) -> SnapfsError:
        """A refusal made by the filesystem itself, recorded in last-error: raise it."""
        return refusal(self.tree, node, err, operation, message)

    def refused_once(self, node: Node, err: int, operation: str, message: str) -> SnapfsError:
        """refused(), but the same refusal again within REPEAT_SECONDS of the last, while
        last-error still holds it, is not recorded again (`rm -rf` asks once per file)."""
        key, now = (node.dom, operation, message), time.monotonic()
        repeated = key == self._repeated and now - self._repeated_at < REPEAT_SECONDS and self._still_recorded(key)
        self._repeated, self._repeated_at = key, now
        return SnapfsError(err, message) if repeated else self.refused(node, err, operation, message)

    def _still_recorded(self, key: tuple[str, str, str]) -> bool:
        dom, operation, message = key
        try:
            line = self.tree.store.domain(dom).last_error()
        except SnapfsError:
            return False
        return line.rstrip("\n").endswith(f"{operation}: {' '.join(message.split())}")

    def refuse_if_read_only(self, node: Node, operation: str) -> None:
        """EROFS on a read-only mount. The kernel refuses first (`ro`); this holds after a
        `mount -o remount,rw` too. Not recorded in last-error, as the kernel's EROFS is not."""
        if self.read_only:
            log.info("%s refused: %s is on a read-only mount", operation, self.tree.path(node))
            raise SnapfsError(errno.EROFS, f"{self.tree.path(node)} is on a read-only mount.")

    # ---- the tree as the kernel sees it ----------------------------------------------------
    async def attrs(self, node: Node, now: Reading, epoch: int) -> pyfuse3.EntryAttributes:
        """The node's attributes for the kernel (kcache.KernelCache.entry), read now; `epoch`
        is the kernel cache's when `now` began. A .changes is loaded first."""
        await self.tree.load(node, now)
        return self.kcache.entry(node, self.tree.attributes(node, now), epoch)

    def found(self, parent: Node, name: bytes, now: Reading) -> Node:
        text = decode_name(name)
        child = self.tree.find(parent, text, now) if text is not None else None
        if child is None:
            raise FUSEError(errno.ENOENT)
        return child

    # ---- lookups and attributes -----------------------------------------------------------
    @handler()
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        now, epoch = self.tree.reading(), self.kcache.epoch
        self.tree.check(parent, now)
        if name == b".":
            return await self.attrs(parent, now, epoch)
        if name == b"..":
            return await self.attrs(self.tree.parent_of(parent), now, epoch)
        child = self.found(parent, name, now)
        entry = await self.attrs(child, now, epoch)
        if self.pending.storing(child):
            # Never wait here: the kernel holds the directory's lock during a lookup, and
            # the store ends by making the kernel drop entries of that directory. The
            # answer is given without timeouts instead: the getattr or open that follows
            # waits for the store (settled) and sees its result.
            entry.entry_timeout = entry.attr_timeout = 0
        else:
            self.kcache.note_entry(parent, name, child, entry)
        return entry

    @handler()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        now, epoch = self.tree.reading(), self.kcache.epoch
        self.tree.check(node, now)
        if await self.pending.settled(node):
            now, epoch = self.tree.reading(), self.kcache.epoch
        return await self.attrs(node, now, epoch)

    @handler()
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        self.tree.check(node, self.tree.reading())
        self.refuse_if_read_only(node, "setattr")
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise self.refused(node, errno.EPERM, "setattr", f"The mode and owner of {self.tree.path(node)} are fixed.")
        if fields.update_size:
            await self.truncate(node, attr.st_size, fh)
        # atime/mtime updates (touch) are accepted and ignored
        return await self.attrs(node, self.tree.reading(), self.kcache.epoch)

    async def truncate(self, node: Node, size: int, fh: int | None) -> None:
        handle = self._handles.get(fh) if fh is not None else None
        written = handle.written if isinstance(handle, FileHandle) else None
        await self.writes.truncate(node, size, written)

    @handler()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        if node.kind not in SYMLINKS:
            raise FUSEError(errno.EINVAL)
        target = self.tree.readlink(node, self.tree.reading())
        if target is None:
            raise FUSEError(errno.ENOENT)
        return target.encode("utf-8")

    @handler()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The store's filesystem (what `df` of the mount should say: the snapshots' space)."""
        store = await trio.to_thread.run_sync(os.statvfs, self.tree.store.root)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, name, getattr(store, name))
        data.f_namemax = 255
        return data

    # ---- directories ------------------------------------------------------------------
    @handler()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.node(inode)
        self.tree.check(node, self.tree.reading())
        if node.kind not in DIRECTORIES:
            raise FUSEError(errno.ENOTDIR)
        return self.new_handle(DirHandle(node))

    @handler(by_handle=True)
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise FUSEError(errno.EBADF)
        now = self.tree.reading()
        if start_id == 0:
            handle.entries = [(name.encode("utf-8"), node) for name, node in self.tree.entries(handle.node, now)]
            handle.epoch = self.kcache.epoch
        # the names were read at the first call: answers may be kept only if nothing changed since
        for index in range(start_id, len(handle.entries)):
            name, node = handle.entries[index]
            try:
                attrs = await self.attrs(node, now, handle.epoch)
            except (FUSEError, SnapfsError):
                continue  # gone since the listing started
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            self.kcache.note_entry(handle.node, name, node, attrs)

    @handler(by_handle=True)
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # ---- files ------------------------------------------------------------------------
    @handler()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        now = self.tree.reading()
        self.tree.check(node, now)
        if node.kind in DIRECTORIES:
            raise FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable:
            self.refuse_if_read_only(node, "open")
        if writable and node.kind not in WRITABLE:
            raise self.refused(node, errno.EACCES, "open", f"{self.tree.path(node, now)} is read-only.")
        await self.pending.settled(node)
        handle = FileHandle(node, self.writes.opened(node, bool(flags & os.O_TRUNC)) if writable else None)
        if node.kind is Kind.MEMORY:
            handle.disk = await MemoryFile.open(self.tree, node)
            return pyfuse3.FileInfo(fh=self.new_handle(handle), direct_io=True, keep_cache=False)
        if node.kind is Kind.RAW:
            handle.disk = await self.open_disk(self.tree.reading().domain(node.dom), node.snap, node.disk)
            return pyfuse3.FileInfo(fh=self.new_handle(handle), direct_io=RAW_DIRECT_IO, keep_cache=True)
        if not writable and node.kind in PAGE_CACHED and self.kcache.keeps_pages(node):
            handle.cached = True
            return pyfuse3.FileInfo(fh=self.new_handle(handle), direct_io=False, keep_cache=True)
        return pyfuse3.FileInfo(fh=self.new_handle(handle), direct_io=True, keep_cache=False)

    @handler(by_handle=True)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.file_handle(fh)
        if handle.disk is not None:
            try:
                return await handle.disk.read(off, size)  # type: ignore[return-value]  # any buffer will do
            except OSError as exc:
                message = f"Reading {self.tree.path(handle.node)} at {off} failed: {exc.strerror or exc}."
                raise self.refused(handle.node, errno.EIO, "read", message) from None
        if handle.cached:
            return self.read_cached(handle, off, size)
        if off == 0:
            await self.pending.settled(handle.node)
            now = self.tree.reading()
            await self.tree.load(handle.node, now)
            handle.content = self.tree.content(handle.node, now)
        return handle.content[off : off + size]

    def read_cached(self, handle: FileHandle, off: int, size: int) -> bytes:
        """A read for the page cache: computed from the store now, with no await between
        the reading and the reply (pyfuse3 replies as this returns), so a change announced
        before the reply finds these pages to drop, and one announced after finds them
        noted. It never waits for a pending store (the kernel holds the pages being read
        while that store's announcement waits for them); the store's announcement drops
        what this read gives. Content kept by the handle is used only while no change was
        heard of."""
        self.kcache.keeps_pages(handle.node)
        if off == 0 or handle.epoch != self.kcache.epoch:
            handle.content = self.tree.content(handle.node, self.tree.reading())
            handle.epoch = self.kcache.epoch
        return handle.content[off : off + size]

    @handler(by_handle=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.file_handle(fh)
        if handle.written is None or handle.node.kind not in WRITABLE:
            raise self.refused(handle.node, errno.EACCES, "write", f"{self.tree.path(handle.node)} is read-only.")
        return await self.writes.write(handle.node, handle.written, buf)

    @handler(by_handle=True)
    async def flush(self, fh: int) -> None:
        """close(): see writes.Writes.flush (FUSE sends release asynchronously, after
        close() has returned, so close() reports what flush did)."""
        handle = self._handles.get(fh)
        if isinstance(handle, FileHandle) and handle.written is not None:
            await self.writes.flush(handle.node, handle.written)

    @handler(by_handle=True)
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Values are stored when they are acted on (control, compression) or on close."""

    @handler(by_handle=True)
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if not isinstance(handle, FileHandle):
            return
        if handle.disk is not None:
            disk, handle.disk = handle.disk, None
            with trio.CancelScope(shield=True):
                await disk.close()  # releases its files and locks: merges may go on
        if handle.written is not None:
            await self.writes.release(handle.node, handle.written)

    async def close_disks(self) -> None:
        """Close every open snapshot disk (at unmount): their helper servers outlive us otherwise."""
        for handle in list(self._handles.values()):
            if isinstance(handle, FileHandle) and handle.disk is not None:
                disk, handle.disk = handle.disk, None
                with contextlib.suppress(Exception):
                    await disk.close()

    # ---- handles ----------------------------------------------------------------------
    def new_handle(self, handle: FileHandle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def file_handle(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise FUSEError(errno.EBADF)
        return handle

    # ---- snapshot directories -----------------------------------------------------------
    @handler()
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self.tree.check(parent, self.tree.reading())
        self.refuse_if_read_only(parent, "mkdir")
        if parent.kind is not Kind.SNAPSHOTS:
            where = self.tree.path(parent)
            message = f"Directories are made only in snapshots/ (mkdir = create a snapshot), not in {where}."
            raise self.refused(parent, errno.EACCES, "mkdir", message)
        text = decode_name(name)
        if text is None:
            raise self.refused(parent, errno.EINVAL, "create", f"A snapshot name must be UTF-8: {name!r}.")
        with notify_without_waiting():
            record = await self.tree.domain(parent).create(name=text, disk_only=True)  # instant, as in ZFS
        node = Node(Kind.SNAPSHOT, parent.dom, record.id)
        entry = self.kcache.entry(node, self.tree.attributes(node, self.tree.reading()), self.kcache.epoch)
        self.kcache.note_entry(parent, name, node, entry)
        return entry

    @handler()
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.node(parent_inode)
        now = self.tree.reading()
        self.tree.check(parent, now)
        child = self.found(parent, name, now)
        self.refuse_if_read_only(child, "rmdir")
        if parent.kind is not Kind.SNAPSHOTS:
            message = f"Only snapshots can be removed (rmdir = discard), not {self.tree.path(child, now)}."
            raise self.refused(parent, errno.EACCES, "rmdir", message)
        try:
            with notify_without_waiting():
                await self.tree.domain(parent).discard(child.snap)
        except DependentsError as exc:
            raise FUSEError(errno.ENOTEMPTY) from exc

    @handler()
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self.inodes.node(parent_inode_old)
        new_parent = self.inodes.node(parent_inode_new)
        now = self.tree.reading()
        self.tree.check(old_parent, now)
        source = self.found(old_parent, name_old, now)
        self.refuse_if_read_only(source, "rename")
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise self.refused(old_parent, errno.EINVAL, "rename", "Snapshots cannot be exchanged (RENAME_EXCHANGE).")
        if old_parent.kind is not Kind.SNAPSHOTS or new_parent != old_parent:
            message = f"{self.tree.path(source, now)} can only be renamed within its own snapshots/ directory."
            raise self.refused(old_parent, errno.EPERM, "rename", message)
        new_text = decode_name(name_new)
        if new_text is None:
            raise self.refused(old_parent, errno.EINVAL, "rename", f"A snapshot name must be UTF-8: {name_new!r}.")
        if name_new == name_old:
            return
        # Noted first: the kernel moves the entry there once this returns, and a change
        # heard of while the rename awaits must drop it too.
        self.kcache.note_name(source.dom, parent_inode_new, name_new)
        with notify_without_waiting():
            await self.tree.domain(old_parent).rename(source.snap, new_text)  # EEXIST: never replaces

    # ---- everything else is refused -------------------------------------------------------
    @handler()
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.inodes.node(parent_inode)
        self.refuse_if_read_only(parent, "create")
        raise self.refused(parent, errno.EACCES, "create", f"Files cannot be created in {self.tree.path(parent)}.")

    @handler()
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self.refuse_if_read_only(parent, "mknod")
        raise self.refused(parent, errno.EACCES, "mknod", f"Files cannot be created in {self.tree.path(parent)}.")

    @handler()
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self.refuse_if_read_only(parent, "symlink")
        message = f"Symbolic links cannot be created in {self.tree.path(parent)}."
        raise self.refused(parent, errno.EACCES, "symlink", message)

    @handler()
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        self.refuse_if_read_only(node, "link")
        raise self.refused(node, errno.EPERM, "link", f"{self.tree.path(node)} cannot be hard-linked.")

    @handler()
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """EPERM (as sysfs: no file here is ever removed; "Permission denied" would suggest
        that root may), with what to do instead, recorded once per `rm -rf`."""
        parent = self.inodes.node(parent_inode)
        self.refuse_if_read_only(parent, "unlink")
        raise self.refused_once(parent, errno.EPERM, "unlink", self.unlink_refusal(parent))

    def unlink_refusal(self, parent: Node) -> str:
        now = self.tree.reading()
        if not parent.snap:
            return f"Files in {self.tree.path(parent, now)} cannot be removed."
        snapshot = self.tree.path(Node(Kind.SNAPSHOT, parent.dom, parent.snap), now)
        return (
            f"Files in snapshot {snapshot} cannot be removed: rmdir {snapshot} discards the snapshot, "
            f"echo merge > {snapshot}/control removes it and keeps its changes."
        )
