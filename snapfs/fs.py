"""The FUSE view (DESIGN section 2): paths and inodes <-> core calls, errno mapping.

A thin adapter in the manner of borg's vfs.py and s3ql's fs.py: every snapshot rule lives
in domain.py. This module only knows the shape of the tree, which file is writable, how
bytes arriving through write() become a call, and which errno the kernel gets.

    /<dom>/xml, current -> snapshots/<name>, last-error, job, snapshots/, disks/<target> -> live layer
    /<dom>/snapshots/<name>/xml, description, state, parent -> ../<p>, compression, control
    /<dom>/snapshots/<name>/disks/<target>.raw, <target>.changes   (for backup tools)

A .raw is served by a SnapshotImage (image.py) opened per file handle and closed on
release; a .changes is computed with qemu-img map once per generation of the domain.

The kernel keeps entries and attributes (CACHE_SECONDS) and drops them the moment they
may have changed: every change of a domain, made here or by any other process, reaches
domain_changed() (through the core, or notify.py for other processes) before the call
that made it returns, and the kernel is told to forget every entry and attribute of that
domain it was given. Files are opened with direct_io, so content is never cached; a .raw
(whose content never changes) is the one exception, see RAW_DIRECT_IO.

Writes: `control` and `compression` act in write() itself (one value per write, offset
ignored). `description` collects what is written since open and is stored on the close()
that follows a write (FUSE flush; a flush before any write does nothing) or, for an
O_TRUNC without a write, at release.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import errno
import functools
import json
import logging
import os
import stat
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import pyfuse3
import trio

from . import notify
from .domain import CONTROL_WORDS, MAX_DESCRIPTION_BYTES, DomainCore, StoreCore
from .errors import DependentsError, SnapfsError
from .image import SnapshotImage, changed_extents
from .store import DiskRecord, MetadataView, SnapshotRecord

log = logging.getLogger(__name__)

FUSEError = pyfuse3.FUSEError
T = TypeVar("T")


class Kind(enum.Enum):
    ROOT = "root"
    DOMAIN = "domain"
    DOMAIN_XML = "xml"
    CURRENT = "current"
    LAST_ERROR = "last-error"
    JOB = "job"
    SNAPSHOTS = "snapshots"
    SNAPSHOT = "snapshot"
    SNAP_XML = "snapshot xml"
    DESCRIPTION = "description"
    STATE = "state"
    PARENT = "parent"
    COMPRESSION = "compression"
    CONTROL = "control"
    DISKS = "disks"  # /<dom>/snapshots/<name>/disks/
    RAW = "disk image"  # .../disks/<target>.raw
    CHANGES = "changed extents"  # .../disks/<target>.changes
    LIVE_DISKS = "live disks"  # /<dom>/disks/
    LIVE_DISK = "live disk"  # /<dom>/disks/<target> -> the live layer


DOMAIN_ENTRIES = {
    "xml": Kind.DOMAIN_XML,
    "current": Kind.CURRENT,
    "last-error": Kind.LAST_ERROR,
    "job": Kind.JOB,
    "snapshots": Kind.SNAPSHOTS,
    "disks": Kind.LIVE_DISKS,
}
SNAPSHOT_ENTRIES = {
    "xml": Kind.SNAP_XML,
    "description": Kind.DESCRIPTION,
    "state": Kind.STATE,
    "parent": Kind.PARENT,
    "compression": Kind.COMPRESSION,
    "control": Kind.CONTROL,
    "disks": Kind.DISKS,
}
DISK_SUFFIXES = {".raw": Kind.RAW, ".changes": Kind.CHANGES}
DIRECTORIES = {Kind.ROOT, Kind.DOMAIN, Kind.SNAPSHOTS, Kind.SNAPSHOT, Kind.DISKS, Kind.LIVE_DISKS}
SYMLINKS = {Kind.CURRENT, Kind.PARENT, Kind.LIVE_DISK}
DISK_FILES = {Kind.RAW, Kind.CHANGES, Kind.LIVE_DISK}
WRITABLE = {Kind.DESCRIPTION, Kind.COMPRESSION, Kind.CONTROL}
XML_CACHE_SIZE = 4096
CHANGES_CACHE_SIZE = 4096
RECORD_FIELDS = tuple(f.name for f in fields(SnapshotRecord))
CONTROL_TEXT = (" ".join(CONTROL_WORDS) + "\n").encode()
# How long the kernel may keep an entry or attributes. Every change is invalidated
# explicitly (domain_changed), so this bounds only what no process announced: a change
# by a process killed before it could tell the mounts, or an edit of the store by hand.
CACHE_SECONDS = 5.0
# Files whose size changes without a change of the domain's metadata (progress, the
# latest refusal): their attributes are never kept.
VOLATILE = {Kind.JOB, Kind.LAST_ERROR}
ACTS_IN_WRITE = {Kind.COMPRESSION: "compression", Kind.CONTROL: "control"}
# A .raw is read with direct_io: each read(2) reaches read() here in requests of up to
# 1 MiB (max_pages: libfuse asks for 256 pages, the kernel's limit), straight into the
# reader's buffer. Measured on a 1 GiB image, half data, 4 MiB reads, 2 cores: 2.1-2.8
# GB/s; through the page cache it was 0.4-0.5 GB/s (128 KiB readahead requests) and 1.0-1.4
# GB/s with the bdi's read_ahead_kb raised to 4 MiB (two copies and page-cache
# bookkeeping per byte). Backup tools read each snapshot once, and the layer files are in
# the host's page cache anyway, so the FUSE page cache would only hold a second copy.
#
# keep_cache is still safe, and is set, for what does go through the page cache (a
# read-only mmap of a .raw): a .raw's inode is keyed on the snapshot's id, never its name,
# and the content of a snapshot id never changes while it exists (its chain is frozen:
# merges, rebases and recompressions keep every surviving snapshot's content, and the core
# refuses any that would rewrite a file of an open image). A snapshot merged away and a
# new one made under the same name is a new id, so a new inode with an empty cache:
# cached pages can never be another snapshot's bytes. Inode numbers are never reused.
RAW_DIRECT_IO = True


@dataclass(frozen=True)
class Node:
    """What an inode stands for. Snapshot nodes are keyed on the snapshot's id, never
    its name, so a rename keeps every inode under it."""

    kind: Kind
    dom: str = ""
    snap: str = ""
    disk: str = ""  # the target (vda) of a disk's file or link

    def child(self, kind: Kind, disk: str = "") -> Node:
        return Node(kind, self.dom, self.snap, disk)


ROOT = Node(Kind.ROOT)


class InodeTable:
    """Stable inode numbers for nodes; a number is never reused for another node."""

    def __init__(self) -> None:
        self._by_node: dict[Node, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._by_inode: dict[int, Node] = {pyfuse3.ROOT_INODE: ROOT}
        self._next = pyfuse3.ROOT_INODE + 1

    def inode(self, node: Node) -> int:
        number = self._by_node.get(node)
        if number is None:
            number = self._next
            self._next += 1
            self._by_node[node] = number
            self._by_inode[number] = node
        return number

    def node(self, inode: int) -> Node:
        try:
            return self._by_inode[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None


@dataclass
class FileHandle:
    node: Node
    writable: bool
    content: bytes = b""
    # description only: what was written since open, stored on close (flush) or release
    written: bytearray = field(default_factory=bytearray)
    dirty: bool = False  # O_TRUNC, a truncate or a write: the value is to be stored
    unsaved: bool = False  # written since the last store: stored at the next flush (close)
    refused: bool = False  # a write or a store was refused: nothing more is stored
    refused_errno: int = 0  # control/compression: a write was refused; later writes get the same
    image: SnapshotImage | None = None  # a .raw: the open snapshot disk it reads from


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[bytes, Node]] = field(default_factory=list)
    epoch: int = 0  # the filesystem's epoch when the entries were read


class Now:
    """One request's reading of the store: each domain is resolved, and its metadata
    read, at most once per request (a listing or a lookup asks for them many times)."""

    __slots__ = ("store", "known", "computed", "epoch", "_cores", "_views", "_names")

    def __init__(self, store: StoreCore, known: dict[str, DomainCore], epoch: int) -> None:
        self.store = store
        self.known = known  # the filesystem's domains seen so far, by name
        self.epoch = epoch  # the filesystem's count of changes heard of when this began
        self._cores: dict[str, DomainCore] = {}
        self._views: dict[str, MetadataView] = {}
        self._names: list[str] | None = None
        self.computed: dict[Node, bytes] = {}  # .changes files computed in this request

    def domain(self, name: str) -> DomainCore:
        """The domain if it exists now (ENOENT otherwise). A name seen before needs only
        the existence check (one stat); a new one goes through the store's checks."""
        core = self._cores.get(name)
        if core is None:
            core = self.known.get(name)
            if core is None or not core.files.exists():
                self.known.pop(name, None)
                core = self.known[name] = self.store.domain(name)
            self._cores[name] = core
        return core

    def view(self, name: str) -> MetadataView:
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self.domain(name).view()
        return view

    def domain_names(self) -> list[str]:
        if self._names is None:
            self._names = self.store.domain_names()
        return self._names


def _invalidate(inodes: set[int], entries: set[tuple[int, bytes]]) -> None:
    """Tell the kernel to forget attributes and entries (in a worker thread: it may wait)."""
    for inode in inodes:
        with contextlib.suppress(OSError):  # ENOENT: the kernel has forgotten it already
            pyfuse3.invalidate_inode(inode, attr_only=True)
    for parent_inode, name in entries:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry(parent_inode, name)


@contextlib.contextmanager
def notify_without_waiting() -> Iterator[None]:
    """For a request during which the kernel holds a lock of one of our directories or
    of the node itself: see SnapFS.domain_changed and notify.DO_NOT_WAIT."""
    token = notify.DO_NOT_WAIT.set(True)
    try:
        yield
    finally:
        notify.DO_NOT_WAIT.reset(token)


class Refusal(Exception):
    """A refusal made by the filesystem itself: an errno, and a sentence for last-error."""

    def __init__(self, err: int, operation: str, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.operation = operation
        self.message = message


def handler(by_handle: bool = False) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Map errors for pyfuse3: a core error or a Refusal becomes its errno, anything
    unexpected becomes EIO plus a last-error line. Nothing else may reach pyfuse3.main."""

    def decorate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(self: SnapFS, *args: Any) -> T:
            try:
                return await fn(self, *args)
            except FUSEError:
                raise
            except Refusal as exc:
                self.record_refusal(self.domain_of(args[0], by_handle), exc)
                raise FUSEError(exc.errno) from None
            except SnapfsError as exc:
                raise FUSEError(exc.errno) from None
            except Exception as exc:
                log.exception("%s failed unexpectedly", fn.__name__)
                message = f"{fn.__name__} failed unexpectedly: {type(exc).__name__}: {exc}"
                self.record_refusal(self.domain_of(args[0], by_handle), Refusal(errno.EIO, fn.__name__, message))
                raise FUSEError(errno.EIO) from None

        return wrapper

    return decorate


def operation_naming(dom: DomainCore, paths: list[str]) -> str | None:
    """The unfinished operation of the domain (its journal) whose steps name one of
    `paths`, or None. The journal is written before the first step of an operation and
    removed after the last, and names (relative to the domain directory) every file a
    step writes, renames or deletes; a "backing" is only read."""
    try:
        journal = dom.files.read_journal()
    except (OSError, ValueError):
        return "operation"  # being replaced right now: some operation is running
    if not journal:
        return None
    wanted = {os.path.realpath(path) for path in paths}
    for step in journal.get("steps", ()):
        for key, value in step.items() if isinstance(step, dict) else ():
            if key == "backing" or not isinstance(value, str):
                continue
            if os.path.realpath(os.path.join(dom.files.path, value)) in wanted:
                return str(journal.get("operation", "operation"))
    return None


def decode_name(name: bytes) -> str | None:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_file(text: str) -> bytes:
    """A one-value file: the text and a newline, nothing when empty."""
    return (text + "\n").encode("utf-8") if text else b""


def document(text: str) -> bytes:
    """A document (XML, a last-error line) that carries its own final newline."""
    return (text if not text or text.endswith("\n") else text + "\n").encode("utf-8")


class SnapFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, store: StoreCore) -> None:
        super().__init__()
        self.store = store
        self.inodes = InodeTable()
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self._pending: dict[tuple[str, str], list[trio.Event]] = {}
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._started_ns = time.time_ns()
        self._xml_cache: OrderedDict[Node, tuple[tuple, bytes]] = OrderedDict()
        self._domain_xml: dict[str, tuple[tuple, bytes]] = {}
        self._changes: OrderedDict[Node, tuple[tuple, bytes]] = OrderedDict()
        self._known: dict[str, DomainCore] = {}
        self._epoch = 0  # changes heard of (domain_changed calls)
        self._invalidating = trio.CapacityLimiter(4)  # never the threads that store I/O needs
        self.cache_seconds = CACHE_SECONDS  # 0 when changes cannot be heard of (mount.py)
        self._kernel_entries: defaultdict[str, set[tuple[int, bytes]]] = defaultdict(set)
        self._kernel_inodes: defaultdict[str, set[int]] = defaultdict(set)
        store.subscribe(self.domain_changed)

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

    def record_refusal(self, dom_name: str, refusal: Refusal) -> None:
        log.info(
            "%s refused (%s): %s", refusal.operation, errno.errorcode.get(refusal.errno, refusal.errno), refusal.message
        )
        if not dom_name:
            return
        try:
            self.store.domain(dom_name).record_error(refusal.operation, refusal.message)
        except Exception:  # the domain may be gone; last-error is best effort
            log.exception("cannot record the refusal in last-error")

    # ---- the tree ---------------------------------------------------------------------
    def now(self) -> Now:
        return Now(self.store, self._known, self._epoch)

    # ---- what the kernel keeps ------------------------------------------------------------
    def kernel_entry(self, parent: Node, name: bytes, child: Node, entry: pyfuse3.EntryAttributes) -> None:
        """Note an entry handed to the kernel with a timeout, so a change can drop it."""
        if entry.entry_timeout:
            self._kernel_entries[child.dom].add((self.inodes.inode(parent), name))

    async def domain_changed(self, dom: str) -> None:
        """Make the kernel forget every entry and attribute it was given for domain
        `dom`, before returning. An answer being computed meanwhile from what was read
        before is given without timeouts (the epoch moved, see attributes()).

        Attributes are invalidated in a thread (the kernel's call may wait). An entry's
        invalidation waits for requests the kernel is serving in its directory, so it is
        queued instead (pyfuse3 does it right after) when this runs inside a request for
        which the kernel holds such a lock itself (notify.DO_NOT_WAIT): mkdir, rmdir and
        rename change only the entry the kernel updates itself. No handler that runs while
        the kernel holds a directory lock (lookup, readdir, mkdir, rmdir, rename) may wait
        for another request's change to be announced (see lookup)."""
        self._epoch += 1
        inodes = self._kernel_inodes.pop(dom, set())
        entries = self._kernel_entries.pop(dom, set())
        if notify.DO_NOT_WAIT.get():
            for parent_inode, name in entries:
                pyfuse3.invalidate_entry_async(parent_inode, name, ignore_enoent=True)
            entries = set()
        if inodes or entries:
            await trio.to_thread.run_sync(_invalidate, inodes, entries, limiter=self._invalidating)

    def domain(self, node: Node) -> DomainCore:
        return self.store.domain(node.dom)

    @staticmethod
    def snapshot(node: Node, now: Now) -> SnapshotRecord:
        record = now.view(node.dom).snapshots.get(node.snap)
        if record is None:
            raise FUSEError(errno.ENOENT)
        return record

    def check(self, node: Node, now: Now) -> None:
        """ENOENT unless the node exists now."""
        if node.kind is Kind.ROOT:
            return
        if node.kind in SYMLINKS:
            if self.symlink_target(node, now) is None:
                raise FUSEError(errno.ENOENT)
            return
        if node.snap:
            self.snapshot(node, now)
        else:
            now.domain(node.dom)
        if node.disk:
            self.disk(node, now)

    @staticmethod
    def disk(node: Node, now: Now) -> DiskRecord:
        """The disk a disk file or link is about (ENOENT if the domain has no such disk)."""
        for disk in now.domain(node.dom).disks:
            if disk.target == node.disk:
                return disk
        raise FUSEError(errno.ENOENT)

    @classmethod
    def symlink_target(cls, node: Node, now: Now) -> str | None:
        if node.kind is Kind.LIVE_DISK:
            cls.disk(node, now)
            return now.domain(node.dom).live_path(node.disk)  # absolute: qemu-img info works on it
        view = now.view(node.dom)
        if node.kind is Kind.CURRENT:
            current = view.snapshots.get(view.current) if view.current else None
            return f"snapshots/{current.name}" if current else None
        record = view.snapshots.get(node.snap)
        if record is None:
            raise FUSEError(errno.ENOENT)
        parent = view.snapshots.get(record.parent) if record.parent else None
        return f"../{parent.name}" if parent else None

    def entries(self, node: Node, now: Now) -> Iterator[tuple[str, Node]]:
        """The directory's entries as they are now."""
        if node.kind is Kind.ROOT:
            for name in now.domain_names():
                yield name, Node(Kind.DOMAIN, name)
        elif node.kind is Kind.DOMAIN:
            for name, kind in DOMAIN_ENTRIES.items():
                if kind is not Kind.CURRENT or self.symlink_target(node.child(kind), now) is not None:
                    yield name, node.child(kind)
        elif node.kind is Kind.SNAPSHOTS:
            view = now.view(node.dom)
            for record in sorted(view.snapshots.values(), key=lambda r: (r.creation_time, r.name)):
                yield record.name, Node(Kind.SNAPSHOT, node.dom, record.id)
        elif node.kind is Kind.SNAPSHOT:
            has_parent = self.snapshot(node, now).parent is not None
            for name, kind in SNAPSHOT_ENTRIES.items():
                if kind is not Kind.PARENT or has_parent:
                    yield name, node.child(kind)
        elif node.kind is Kind.DISKS:
            self.snapshot(node, now)
            for disk in now.domain(node.dom).disks:
                for suffix, kind in DISK_SUFFIXES.items():
                    yield disk.target + suffix, node.child(kind, disk.target)
        elif node.kind is Kind.LIVE_DISKS:
            for disk in now.domain(node.dom).disks:
                yield disk.target, node.child(Kind.LIVE_DISK, disk.target)
        else:
            raise FUSEError(errno.ENOTDIR)

    def find(self, parent: Node, name: str, now: Now) -> Node | None:
        if parent.kind is Kind.ROOT:
            try:
                now.domain(name)
            except SnapfsError:
                return None
            return Node(Kind.DOMAIN, name)
        if parent.kind is Kind.DOMAIN:
            kind = DOMAIN_ENTRIES.get(name)
        elif parent.kind is Kind.SNAPSHOTS:
            record = now.view(parent.dom).by_name(name)
            return Node(Kind.SNAPSHOT, parent.dom, record.id) if record else None
        elif parent.kind is Kind.SNAPSHOT:
            kind = SNAPSHOT_ENTRIES.get(name)
        elif parent.kind in (Kind.DISKS, Kind.LIVE_DISKS):
            return self.find_disk_file(parent, name, now)
        else:
            raise FUSEError(errno.ENOTDIR)
        if kind is None:
            return None
        child = parent.child(kind)
        if kind in SYMLINKS and self.symlink_target(child, now) is None:
            return None
        return child

    @staticmethod
    def find_disk_file(parent: Node, name: str, now: Now) -> Node | None:
        """<target>.raw / <target>.changes in a snapshot's disks/, <target> in /<dom>/disks/."""
        targets = {disk.target for disk in now.domain(parent.dom).disks}
        if parent.kind is Kind.LIVE_DISKS:
            return parent.child(Kind.LIVE_DISK, name) if name in targets else None
        target, dot, suffix = name.rpartition(".")
        kind = DISK_SUFFIXES.get(dot + suffix)
        return parent.child(kind, target) if kind is not None and target in targets else None

    def parent_of(self, node: Node) -> Node:
        if node.kind in (Kind.ROOT, Kind.DOMAIN):
            return ROOT
        if node.kind is Kind.SNAPSHOT:
            return Node(Kind.SNAPSHOTS, node.dom)
        if node.kind in (Kind.RAW, Kind.CHANGES):
            return Node(Kind.DISKS, node.dom, node.snap)
        if node.kind is Kind.LIVE_DISK:
            return Node(Kind.LIVE_DISKS, node.dom)
        if node.snap:
            return Node(Kind.SNAPSHOT, node.dom, node.snap)
        return Node(Kind.DOMAIN, node.dom)

    def content(self, node: Node, now: Now) -> bytes:
        """What a read of a regular file returns, computed now (never waits for a lock)."""
        if node.kind is Kind.DOMAIN_XML:
            return self.domain_xml(node, now)
        if node.kind is Kind.LAST_ERROR:
            return document(now.domain(node.dom).last_error())
        if node.kind is Kind.JOB:
            return document(now.domain(node.dom).job())
        if node.kind is Kind.CONTROL:
            return CONTROL_TEXT
        if node.kind is Kind.SNAP_XML:
            return self.snapshot_xml(node, now)
        if node.kind is Kind.CHANGES:
            return self.cached_changes(node, now)
        record = self.snapshot(node, now)
        values = {Kind.DESCRIPTION: record.description, Kind.STATE: record.state, Kind.COMPRESSION: record.compression}
        return text_file(values[node.kind])

    def domain_xml(self, node: Node, now: Now) -> bytes:
        """The domain XML, built once per defined domain: it depends only on domain.xml
        and the disks, fixed from define to undefine; a domain defined again under the
        same name has a new epoch."""
        dom = now.domain(node.dom)
        key = (dom, now.view(node.dom).epoch)
        cached = self._domain_xml.get(node.dom)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = document(dom.domain_xml())
        self._domain_xml[node.dom] = (key, data)
        return data

    def snapshot_xml(self, node: Node, now: Now) -> bytes:
        """The snapshot XML, built once per content: it depends on the snapshot's record,
        its parent's name and the domain (fixed for a DomainCore and epoch): that is the
        cache key, so any change (this snapshot's or its parent's) gives a new text, while
        a change elsewhere in the domain keeps it. stat gives its exact size on every call."""
        dom = now.domain(node.dom)
        view = now.view(node.dom)
        record = self.snapshot(node, now)
        parent = view.snapshots.get(record.parent) if record.parent else None
        key = (dom, view.epoch, *(getattr(record, name) for name in RECORD_FIELDS), parent.name if parent else None)
        cached = self._xml_cache.get(node)
        if cached is not None and cached[0] == key:
            self._xml_cache.move_to_end(node)
            return cached[1]
        data = document(dom.snapshot_xml(node.snap))
        if dom.view() is not view:
            return data  # changed meanwhile by another process: not known to match the key
        self._xml_cache[node] = (key, data)
        if len(self._xml_cache) > XML_CACHE_SIZE:
            self._xml_cache.popitem(last=False)
        return data

    def attributes(self, node: Node, now: Now) -> pyfuse3.EntryAttributes:
        """The node's attributes now, for the kernel to keep CACHE_SECONDS (noted, so that
        domain_changed can make it forget them) unless a change was heard of since `now`
        read the store: an answer that may be out of date is given with no timeout."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self.inodes.inode(node)
        entry.generation = 0
        if now.epoch == self._epoch and self.cache_seconds:
            entry.entry_timeout = self.cache_seconds
            entry.attr_timeout = 0 if node.kind in VOLATILE else self.cache_seconds
            if node.dom:
                self._kernel_inodes[node.dom].add(entry.st_ino)
        else:  # a change was heard of since `now` read the store: may be out of date
            entry.entry_timeout = entry.attr_timeout = 0
        entry.st_uid = self._uid
        entry.st_gid = self._gid
        entry.st_blksize = 4096
        stamp = self._started_ns
        if node.snap:
            stamp = self.snapshot(node, now).creation_time * 1_000_000_000
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = stamp
        if node.kind in DIRECTORIES:
            writable = node.kind is Kind.SNAPSHOTS
            entry.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            entry.st_nlink = self.directory_links(node, now)
            entry.st_size = 0
        elif node.kind in SYMLINKS:
            target = self.symlink_target(node, now)
            if target is None:
                raise FUSEError(errno.ENOENT)
            entry.st_mode = stat.S_IFLNK | 0o777
            entry.st_nlink = 1
            entry.st_size = len(target.encode("utf-8"))
        elif node.kind is Kind.RAW:
            self.snapshot(node, now)
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = self.disk(node, now).size  # the virtual size
        else:
            entry.st_mode = stat.S_IFREG | (0o644 if node.kind in WRITABLE else 0o444)
            entry.st_nlink = 1
            entry.st_size = len(self.content(node, now))
        entry.st_blocks = (entry.st_size + 511) // 512
        return entry

    @staticmethod
    def directory_links(node: Node, now: Now) -> int:
        """2 + the number of subdirectories; 1 ("not counted", as btrfs and many FUSE
        filesystems report) for the mount's root. The root is never looked up, so its
        attributes come only from getattr, which the kernel asks before every path it
        resolves here unless it may keep them: with nothing in them that can change, the
        root's attributes are kept, and no stat can see an old link count."""
        if node.kind is Kind.ROOT:
            return 1
        if node.kind is Kind.DOMAIN:
            return 4  # snapshots/ and disks/
        if node.kind is Kind.SNAPSHOTS:
            return 2 + len(now.view(node.dom).snapshots)
        if node.kind is Kind.SNAPSHOT:
            return 3  # disks/
        return 2

    async def attrs(self, node: Node, now: Now) -> pyfuse3.EntryAttributes:
        """attributes(), after computing what its size needs that takes a qemu-img run."""
        if node.kind is Kind.CHANGES:
            await self.changes(node, now)
        return self.attributes(node, now)

    # ---- snapshot disks: changed extents and images ---------------------------------------
    def cached_changes(self, node: Node, now: Now) -> bytes:
        """A .changes file's bytes as changes() computed them in this request."""
        data = now.computed.get(node)
        if data is None:  # every path that sizes or reads a .changes awaits changes() first
            raise FUSEError(errno.EIO)
        return data

    async def changes(self, node: Node, now: Now) -> bytes:
        """<target>.changes: what L(S) holds against its backing, as JSON lines.

        Computed once per generation of the domain (every change of the metadata bumps
        it) and cached: a merge of S's parent moves the parent's changes into L(S) and
        changes S's parent in the same operation, so a new generation covers every way
        L(S)'s extents can change while S exists."""
        dom = now.domain(node.dom)
        view = now.view(node.dom)
        self.snapshot(node, now)
        self.disk(node, now)
        key = (dom, view.epoch, view.generation)
        cached = self._changes.get(node)
        if cached is not None and cached[0] == key:
            self._changes.move_to_end(node)
            now.computed[node] = cached[1]
            return cached[1]
        layer = dom.layer_path(node.disk, node.snap)
        self.refuse_while_changing(node, dom, [layer], "read")
        try:
            extents = await changed_extents(layer)
        except SnapfsError:
            self.refuse_if_gone_or_changing(node, dom, [layer], "read")
            raise
        data = "".join(json.dumps(extent) + "\n" for extent in extents).encode("ascii")
        after = self.refuse_if_gone_or_changing(node, dom, [layer], "read")
        if after.generation == view.generation and after.epoch == view.epoch:
            self._changes[node] = (key, data)
            if len(self._changes) > CHANGES_CACHE_SIZE:
                self._changes.popitem(last=False)
        now.computed[node] = data
        return data

    async def open_image(self, node: Node, now: Now) -> SnapshotImage:
        """The snapshot disk behind a .raw, opened for one file handle.

        Once open, the image holds every file of its chain open and holds QEMU's reader
        locks on them: the core's in-use check refuses (EBUSY, with a sentence) any
        operation that would rewrite one of them (a merge or discard of S or of an
        ancestor, a recompression), and a file renamed over or deleted meanwhile keeps
        serving the bytes it had. What remains is an operation that had already passed
        that check when the image was opened: a merge of S that has committed its
        dependent into L(S) (L(S) then holds S + D) but not yet removed S. Its journal
        names L(S), so an open that finds an unfinished operation naming a file of its
        chain is refused (EBUSY) instead of serving bytes that may not be S's."""
        dom = now.domain(node.dom)
        self.snapshot(node, now)
        self.disk(node, now)
        layer = dom.layer_path(node.disk, node.snap)
        self.refuse_while_changing(node, dom, [layer], "open")
        try:
            image = await SnapshotImage.open(layer)
        except SnapfsError:
            self.refuse_if_gone_or_changing(node, dom, [layer], "open")
            raise
        try:
            self.refuse_if_gone_or_changing(node, dom, image.chain, "open")
        except BaseException:
            with trio.CancelScope(shield=True):
                await image.close()
            raise
        return image

    def refuse_if_gone_or_changing(self, node: Node, dom: DomainCore, paths: list[str], what: str) -> MetadataView:
        """ENOENT if the snapshot is gone now, EBUSY if an unfinished operation names one
        of `paths`; the fresh view otherwise."""
        view = dom.view()
        if node.snap not in view.snapshots:
            raise FUSEError(errno.ENOENT)
        self.refuse_while_changing(node, dom, paths, what)
        return view

    def refuse_while_changing(self, node: Node, dom: DomainCore, paths: list[str], what: str) -> None:
        operation = operation_naming(dom, paths)
        if operation is not None:
            raise Refusal(
                errno.EBUSY,
                what,
                f"{self.path(node)} cannot be {'opened' if what == 'open' else 'read'} while the unfinished "
                f"{operation} changes its files; try again when it is done.",
            )

    # ---- pending description stores -----------------------------------------------------
    def storing(self, node: Node) -> bool:
        """Whether a description store that changes what `node` shows is still running."""
        return node.kind in (Kind.DESCRIPTION, Kind.SNAP_XML) and bool(self._pending.get((node.dom, node.snap)))

    async def settled(self, node: Node) -> bool:
        """Wait for description stores of this snapshot still running after a close();
        True if it waited (what was read before is then out of date).

        FUSE sends release asynchronously: close() returns before the value is stored,
        so the next cat of description or xml waits for it here (not for the domain lock).
        Never called from lookup (see there).
        """
        waited = False
        if self.storing(node):
            for event in list(self._pending.get((node.dom, node.snap), ())):
                await event.wait()
                waited = True
        return waited

    async def close_images(self) -> None:
        """Close every open snapshot image (at unmount): stops their qemu-nbd servers."""
        for handle in list(self._handles.values()):
            if isinstance(handle, FileHandle) and handle.image is not None:
                image, handle.image = handle.image, None
                with contextlib.suppress(Exception):
                    await image.close()

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

    # ---- lookups and attributes -----------------------------------------------------------
    @handler()
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        now = self.now()
        self.check(parent, now)
        if name == b".":
            return await self.attrs(parent, now)
        if name == b"..":
            return await self.attrs(self.parent_of(parent), now)
        text = decode_name(name)
        child = self.find(parent, text, now) if text is not None else None
        if child is None:
            raise FUSEError(errno.ENOENT)
        entry = await self.attrs(child, now)
        if self.storing(child):
            # Never wait here: the kernel holds the directory's lock during a lookup, and
            # the store ends by making the kernel drop entries of that directory. The
            # answer is given without timeouts instead: the getattr or open that follows
            # waits for the store (settled) and sees its result.
            entry.entry_timeout = entry.attr_timeout = 0
        else:
            self.kernel_entry(parent, name, child, entry)
        return entry

    @handler()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        now = self.now()
        self.check(node, now)
        if await self.settled(node):
            now = self.now()
        return await self.attrs(node, now)

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
        self.check(node, self.now())
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise Refusal(errno.EPERM, "setattr", f"The mode and owner of {self.path(node)} are fixed.")
        if fields.update_size:
            await self.truncate(node, attr.st_size, fh)
        return await self.attrs(node, self.now())  # atime/mtime updates (touch) are accepted and ignored

    async def truncate(self, node: Node, size: int, fh: int | None) -> None:
        if node.kind not in WRITABLE:
            raise Refusal(errno.EACCES, "truncate", f"{self.path(node)} is read-only.")
        if size != 0:
            raise Refusal(
                errno.EINVAL, "truncate", f"{self.path(node)} can only be emptied, not truncated to {size} bytes."
            )
        if node.kind is not Kind.DESCRIPTION:
            return  # control and compression act on a write, never on a truncate
        if fh is not None and isinstance(self._handles.get(fh), FileHandle):
            handle = self.file_handle(fh)
            handle.written.clear()
            handle.dirty = True
        else:
            await self.domain(node).set_description(node.snap, "")

    @handler()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        if node.kind not in SYMLINKS:
            raise FUSEError(errno.EINVAL)
        target = self.symlink_target(node, self.now())
        if target is None:
            raise FUSEError(errno.ENOENT)
        return target.encode("utf-8")

    @handler()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    def path(self, node: Node) -> str:
        """A readable path for messages."""
        if node.kind is Kind.ROOT:
            return "/"
        parts = [node.dom]
        if node.kind is not Kind.DOMAIN:
            if node.snap:
                record = self.now().view(node.dom).snapshots.get(node.snap)
                parts += ["snapshots", record.name if record else node.snap]
                if node.kind in (Kind.RAW, Kind.CHANGES):
                    parts += ["disks", node.disk + (".raw" if node.kind is Kind.RAW else ".changes")]
                elif node.kind is not Kind.SNAPSHOT:
                    parts.append(self._entry_name(SNAPSHOT_ENTRIES, node.kind))
            else:
                parts.append(self._entry_name(DOMAIN_ENTRIES, Kind.LIVE_DISKS if node.disk else node.kind))
                if node.disk:
                    parts.append(node.disk)
        return "/" + "/".join(parts)

    @staticmethod
    def _entry_name(table: dict[str, Kind], kind: Kind) -> str:
        return next(name for name, k in table.items() if k is kind)

    # ---- directories ------------------------------------------------------------------
    @handler()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.node(inode)
        self.check(node, self.now())
        if node.kind not in DIRECTORIES:
            raise FUSEError(errno.ENOTDIR)
        return self.new_handle(DirHandle(node))

    @handler(by_handle=True)
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise FUSEError(errno.EBADF)
        now = self.now()
        if start_id == 0:
            handle.entries = [(name.encode("utf-8"), node) for name, node in self.entries(handle.node, now)]
            handle.epoch = now.epoch
        else:  # the names were read at the first call: answers may be kept only if nothing changed since
            now.epoch = handle.epoch
        for index in range(start_id, len(handle.entries)):
            name, node = handle.entries[index]
            try:
                attrs = await self.attrs(node, now)
            except (FUSEError, SnapfsError, Refusal):
                continue  # gone since the listing started
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            self.kernel_entry(handle.node, name, node, attrs)

    @handler(by_handle=True)
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # ---- files ------------------------------------------------------------------------
    @handler()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        self.check(node, self.now())
        if node.kind in DIRECTORIES:
            raise FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable and node.kind not in WRITABLE:
            raise Refusal(errno.EACCES, "open", f"{self.path(node)} is read-only.")
        await self.settled(node)
        handle = FileHandle(node, writable)
        if writable and flags & os.O_TRUNC and node.kind is Kind.DESCRIPTION:
            handle.dirty = True
        if node.kind is Kind.RAW:
            handle.image = await self.open_image(node, self.now())
            return pyfuse3.FileInfo(fh=self.new_handle(handle), direct_io=RAW_DIRECT_IO, keep_cache=True)
        fh = self.new_handle(handle)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @handler(by_handle=True)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.file_handle(fh)
        if handle.image is not None:
            try:
                return await handle.image.read(off, size)
            except OSError as exc:
                raise Refusal(
                    errno.EIO, "read", f"Reading {self.path(handle.node)} at {off} failed: {exc.strerror or exc}."
                ) from None
        if off == 0:
            await self.settled(handle.node)
            now = self.now()
            if handle.node.kind is Kind.CHANGES:
                await self.changes(handle.node, now)
            handle.content = self.content(handle.node, now)
        return handle.content[off : off + size]

    @handler(by_handle=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.file_handle(fh)
        node = handle.node
        if not handle.writable or node.kind not in WRITABLE:
            raise Refusal(errno.EACCES, "write", f"{self.path(node)} is read-only.")
        if node.kind is Kind.DESCRIPTION:
            try:
                self.add_description(handle, buf)
            except Refusal:
                handle.refused = True
                raise
            return len(buf)
        operation = ACTS_IN_WRITE[node.kind]
        if handle.refused_errno:
            # Python's buffered close() sends a refused write again: acting on it would
            # do what the caller is told was refused. One refusal per open, like sysfs.
            raise FUSEError(handle.refused_errno)
        try:
            await self.act_on_word(handle, node, operation, buf)
        except (FUSEError, SnapfsError, Refusal) as exc:
            handle.refused_errno = exc.errno
            raise
        return len(buf)  # the offset is ignored: each write is one value (sysfs)

    async def act_on_word(self, handle: FileHandle, node: Node, operation: str, buf: bytes) -> None:
        try:
            word = buf.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Refusal(
                errno.EINVAL, operation, f"What was written to {self.path(node)} is not UTF-8 text."
            ) from None
        dom = self.domain(node)
        try:
            if node.kind is Kind.CONTROL:
                await dom.control(node.snap, word)
            else:
                await dom.set_compression(node.snap, word)
        except DependentsError as exc:
            raise FUSEError(errno.EBUSY) from exc

    def add_description(self, handle: FileHandle, buf: bytes) -> None:
        """Accumulate a description; refuse at write time what could never be stored."""
        data = handle.written + buf
        size = len(data)
        too_big = size > MAX_DESCRIPTION_BYTES + 1 or (size == MAX_DESCRIPTION_BYTES + 1 and not data.endswith(b"\n"))
        if too_big:
            raise Refusal(
                errno.EFBIG,
                "description",
                f"A description is at most {MAX_DESCRIPTION_BYTES} bytes; this write would make it {size}.",
            )
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        try:
            decoder.decode(bytes(data), final=False)
        except UnicodeDecodeError:
            raise Refusal(errno.EINVAL, "description", "A description must be UTF-8 text.") from None
        handle.written = data
        handle.dirty = handle.unsaved = True

    @handler(by_handle=True)
    async def flush(self, fh: int) -> None:
        """close(): a description written through this handle is stored now, so close()
        reports the outcome and returns only once the value is in the store (FUSE sends
        release asynchronously, after close() has returned). A flush with nothing written
        since the last store does nothing: the shell flushes once before it writes."""
        handle = self._handles.get(fh)
        if isinstance(handle, FileHandle) and handle.unsaved and not handle.refused:
            await self.store_description(handle)

    @handler(by_handle=True)
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Values are stored when they are acted on (control, compression) or on close."""

    @handler(by_handle=True)
    async def release(self, fh: int) -> None:
        """Store what is still unstored, e.g. `: > description` (O_TRUNC, no write)."""
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle) and handle.image is not None:
            image, handle.image = handle.image, None
            with trio.CancelScope(shield=True):
                await image.close()  # releases its files and QEMU locks: merges may go on
        if isinstance(handle, FileHandle) and handle.dirty and not handle.refused:
            await self.store_description(handle)

    async def store_description(self, handle: FileHandle) -> None:
        """set_description with what was written since open; readers of this snapshot's
        description and xml wait for it (see settled())."""
        key = (handle.node.dom, handle.node.snap)
        event = trio.Event()
        self._pending.setdefault(key, []).append(event)  # before any await
        try:
            await self._store_description(handle)
        except BaseException:
            handle.refused = True  # reported once; release does not try again
            raise
        finally:
            event.set()
            waiting = self._pending.get(key, [])
            if event in waiting:
                waiting.remove(event)
            if not waiting:
                self._pending.pop(key, None)

    async def _store_description(self, handle: FileHandle) -> None:
        node = handle.node
        try:
            text = bytes(handle.written).decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal(
                errno.EINVAL, "description", "A description must be UTF-8 text; it ends mid-character."
            ) from None
        if text.endswith("\n"):
            text = text[:-1]
        await self.domain(node).set_description(node.snap, text)
        handle.dirty = handle.unsaved = False

    # ---- snapshot directories -----------------------------------------------------------
    @handler()
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self.check(parent, self.now())
        if parent.kind is not Kind.SNAPSHOTS:
            raise Refusal(
                errno.EACCES,
                "mkdir",
                f"Directories are made only in snapshots/ (mkdir = create a snapshot), not in {self.path(parent)}.",
            )
        text = decode_name(name)
        if text is None:
            raise Refusal(errno.EINVAL, "create", f"A snapshot name must be UTF-8: {name!r}.")
        with notify_without_waiting():
            record = await self.domain(parent).create(name=text)
        node = Node(Kind.SNAPSHOT, parent.dom, record.id)
        entry = self.attributes(node, self.now())
        self.kernel_entry(parent, name, node, entry)
        return entry

    @handler()
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.node(parent_inode)
        now = self.now()
        self.check(parent, now)
        text = decode_name(name)
        child = self.find(parent, text, now) if text is not None else None
        if child is None:
            raise FUSEError(errno.ENOENT)
        if parent.kind is not Kind.SNAPSHOTS:
            raise Refusal(
                errno.EACCES, "rmdir", f"Only snapshots can be removed (rmdir = discard), not {self.path(child)}."
            )
        try:
            with notify_without_waiting():
                await self.domain(parent).discard(child.snap)
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
        now = self.now()
        self.check(old_parent, now)
        old_text, new_text = decode_name(name_old), decode_name(name_new)
        source = self.find(old_parent, old_text, now) if old_text is not None else None
        if source is None:
            raise FUSEError(errno.ENOENT)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise Refusal(errno.EINVAL, "rename", "Snapshots cannot be exchanged (RENAME_EXCHANGE).")
        if old_parent.kind is not Kind.SNAPSHOTS or new_parent != old_parent:
            raise Refusal(
                errno.EPERM, "rename", f"{self.path(source)} can only be renamed within its own snapshots/ directory."
            )
        if new_text is None:
            raise Refusal(errno.EINVAL, "rename", f"A snapshot name must be UTF-8: {name_new!r}.")
        if new_text == old_text:
            return
        # Noted first: the kernel moves the entry there once this returns, and a change
        # heard of while the rename awaits must drop it too.
        self._kernel_entries[source.dom].add((parent_inode_new, name_new))
        with notify_without_waiting():
            await self.domain(old_parent).rename(source.snap, new_text)  # EEXIST: never replaces

    # ---- everything else is refused -------------------------------------------------------
    @handler()
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.inodes.node(parent_inode)
        raise Refusal(errno.EACCES, "create", f"Files cannot be created in {self.path(parent)}.")

    @handler()
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        raise Refusal(errno.EACCES, "mknod", f"Files cannot be created in {self.path(parent)}.")

    @handler()
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.node(parent_inode)
        raise Refusal(errno.EACCES, "symlink", f"Symbolic links cannot be created in {self.path(parent)}.")

    @handler()
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        raise Refusal(errno.EPERM, "link", f"{self.path(node)} cannot be hard-linked.")

    @handler()
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.inodes.node(parent_inode)
        raise Refusal(errno.EACCES, "unlink", f"Files in {self.path(parent)} cannot be removed.")
