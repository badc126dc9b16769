"""What the mounted tree looks like (DESIGN section 2), as plain data: nodes, entries,
attributes, contents and symlink targets, read from the core. No FUSE and no kernel
here (fs.py turns this into handlers; kcache.py keeps what the kernel holds), so the
whole tree can be checked without a mount:

    /<dom>/xml, current -> snapshots/<name>, last-error, job, snapshots/, disks/<target> -> live layer
    /<dom>/disks/<uuid>.qcow2 -> every real layer file of every disk, so that a relative
                                 backing name resolves next to disks/<target> (qemu-img)
    /<dom>/snapshots/<name>/xml, description, state, parent -> ../<p>, compression, control
    /<dom>/snapshots/<name>/disks/<target>.raw, <target>.changes, <target>.map   (for backup tools)

Every error is a SnapfsError with its errno (ENOENT for what does not exist now). Reads
never wait for a domain lock: metadata is replaced atomically, so a reading sees the
state before or after an operation.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from . import runtime
from .errors import SnapfsError, io_error, not_found
from .records import DiskRecord, MetadataView, SnapshotRecord, has_memory
from .rules import CONTROL_WORDS

if TYPE_CHECKING:
    from .catalog import StoreCore
    from .domain import DomainCore


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
    MAP = "data extents"  # .../disks/<target>.map
    LIVE_DISKS = "live disks"  # /<dom>/disks/
    LIVE_DISK = "live disk"  # /<dom>/disks/<target> -> the live layer
    DOMAIN_STATE = "domain state"  # /<dom>/state: running, paused, shut off
    DOMAIN_CONTROL = "domain control"  # /<dom>/control: start, shutdown, destroy
    MEMORY = "saved memory"  # /<dom>/snapshots/<name>/memory (a snapshot with memory only)
    LAYER = "layer file"  # /<dom>/disks/<basename> -> a real layer file (node.disk: its basename)


DOMAIN_ENTRIES = {
    "xml": Kind.DOMAIN_XML,
    "current": Kind.CURRENT,
    "last-error": Kind.LAST_ERROR,
    "job": Kind.JOB,
    "snapshots": Kind.SNAPSHOTS,
    "disks": Kind.LIVE_DISKS,
    "state": Kind.DOMAIN_STATE,
    "control": Kind.DOMAIN_CONTROL,
}
SNAPSHOT_ENTRIES = {
    "xml": Kind.SNAP_XML,
    "description": Kind.DESCRIPTION,
    "state": Kind.STATE,
    "parent": Kind.PARENT,
    "compression": Kind.COMPRESSION,
    "control": Kind.CONTROL,
    "disks": Kind.DISKS,
    "memory": Kind.MEMORY,
}
DISK_SUFFIXES = {".raw": Kind.RAW, ".changes": Kind.CHANGES, ".map": Kind.MAP}
EXTENTS = {Kind.CHANGES, Kind.MAP}  # JSON lines computed by a qemu-img run (load)
DIRECTORIES = {Kind.ROOT, Kind.DOMAIN, Kind.SNAPSHOTS, Kind.SNAPSHOT, Kind.DISKS, Kind.LIVE_DISKS}
SYMLINKS = {Kind.CURRENT, Kind.PARENT, Kind.LIVE_DISK, Kind.LAYER}
WRITABLE = {Kind.DESCRIPTION, Kind.COMPRESSION, Kind.CONTROL, Kind.DOMAIN_CONTROL}
# Files whose size changes without a change of the domain's metadata (progress, the
# latest refusal): their attributes must never be kept.
VOLATILE = {Kind.JOB, Kind.LAST_ERROR, Kind.DOMAIN_STATE}
XML_CACHE_SIZE = 4096
CHANGES_CACHE_SIZE = 4096
RECORD_FIELDS = tuple(f.name for f in fields(SnapshotRecord))
CONTROL_TEXT = (" ".join(CONTROL_WORDS) + "\n").encode()
DOMAIN_CONTROL_TEXT = (" ".join(runtime.CONTROL_WORDS) + "\n").encode()

# A snapshot's changed extents of one disk, or with True its data extents: disk.changes(dom, snap_id, target, whole).
ChangesReader = Callable[["DomainCore", str, str, bool], Awaitable[list[dict]]]


@dataclass(frozen=True)
class Node:
    """What an entry of the tree stands for. Snapshot nodes are keyed on the snapshot's
    id, never its name, so a rename keeps every node under it."""

    kind: Kind
    dom: str = ""
    snap: str = ""
    disk: str = ""  # the target (vda) of a disk's file or link

    def child(self, kind: Kind, disk: str = "") -> Node:
        return Node(kind, self.dom, self.snap, disk)


ROOT = Node(Kind.ROOT)


@dataclass(frozen=True, slots=True)
class Attributes:
    """What stat shows of a node (owner, inode number and cache times are the mount's)."""

    mode: int
    size: int
    nlink: int
    time_ns: int  # atime, mtime and ctime alike
    owner: tuple[int, int] | None = None  # (uid, gid) when not the mount's: a disk's are its layer's
    allocated: int | None = None  # bytes that hold data, when not all of them (a .raw)

    @property
    def blocks(self) -> int:
        return ((self.size if self.allocated is None else self.allocated) + 511) // 512


def text_file(text: str) -> bytes:
    """A one-value file: the text and a newline, nothing when empty."""
    return (text + "\n").encode("utf-8") if text else b""


def document(text: str) -> bytes:
    """A document (XML, a last-error line) that carries its own final newline."""
    return (text if not text or text.endswith("\n") else text + "\n").encode("utf-8")


def gone() -> SnapfsError:
    return not_found("No such file or directory (it may have been merged, discarded or undefined).")


class Reading:
    """One request's reading of the store: each domain is resolved, and its metadata
    read, at most once per reading (a listing or a lookup asks for them many times)."""

    __slots__ = ("store", "known", "changes", "allocated", "_cores", "_views", "_names")

    def __init__(self, store: StoreCore, known: dict[str, DomainCore]) -> None:
        self.store = store
        self.known = known  # the tree's domains seen so far, by name
        self._cores: dict[str, DomainCore] = {}
        self._views: dict[str, MetadataView] = {}
        self._names: list[str] | None = None
        self.changes: dict[Node, bytes] = {}  # .changes and .map files, /<dom>/state, loaded for this reading
        self.allocated: dict[Node, int] = {}  # the data bytes of the .raw files loaded for this reading

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


class Tree:
    """The tree of a store: what exists, what it shows, what a read returns."""

    def __init__(self, store: StoreCore, read_changes: ChangesReader) -> None:
        self.store = store
        self._read_changes = read_changes
        self._known: dict[str, DomainCore] = {}
        self._started_ns = time.time_ns()
        self._xml_cache: OrderedDict[Node, tuple[tuple, bytes]] = OrderedDict()
        self._domain_xml: dict[str, tuple[tuple, bytes]] = {}
        self._changes: OrderedDict[Node, tuple[tuple, bytes]] = OrderedDict()

    def reading(self) -> Reading:
        return Reading(self.store, self._known)

    def domain(self, node: Node) -> DomainCore:
        """The node's domain, for an operation on it."""
        return self.store.domain(node.dom)

    # ---- what exists -------------------------------------------------------------------
    @staticmethod
    def snapshot(node: Node, now: Reading) -> SnapshotRecord:
        record = now.view(node.dom).snapshots.get(node.snap)
        if record is None:
            raise gone()
        return record

    def check(self, node: Node, now: Reading) -> None:
        """ENOENT unless the node exists now."""
        if node.kind is Kind.ROOT:
            return
        if node.kind in SYMLINKS:
            if self.readlink(node, now) is None:
                raise gone()
            return
        if node.snap:
            self.snapshot(node, now)
        else:
            now.domain(node.dom)
        if node.disk:
            self.disk(node, now)

    @staticmethod
    def disk(node: Node, now: Reading) -> DiskRecord:
        """The disk a disk file or link is about (ENOENT if the domain has no such disk)."""
        for disk in now.domain(node.dom).disks:
            if disk.target == node.disk:
                return disk
        raise gone()

    def readlink(self, node: Node, now: Reading) -> str | None:
        """A symlink's target, or None where the link is absent (no current, a root's parent)."""
        if node.kind is Kind.LIVE_DISK:
            self.disk(node, now)
            return now.domain(node.dom).live_path(node.disk)  # absolute: qemu-img info works on it
        if node.kind is Kind.LAYER:
            target = now.view(node.dom).layer_files().get(node.disk)
            return None if target is None else now.domain(node.dom).files.layer_path(target, node.disk)
        view = now.view(node.dom)
        if node.kind is Kind.CURRENT:
            current = view.snapshots.get(view.current) if view.current else None
            return f"snapshots/{current.name}" if current else None
        record = self.snapshot(node, now)
        parent = view.snapshots.get(record.parent) if record.parent else None
        return f"../{parent.name}" if parent else None

    def entries(self, node: Node, now: Reading) -> Iterator[tuple[str, Node]]:
        """The directory's entries as they are now."""
        if node.kind is Kind.ROOT:
            for name in now.domain_names():
                yield name, Node(Kind.DOMAIN, name)
        elif node.kind is Kind.DOMAIN:
            for name, kind in DOMAIN_ENTRIES.items():
                if kind is not Kind.CURRENT or self.readlink(node.child(kind), now) is not None:
                    yield name, node.child(kind)
        elif node.kind is Kind.SNAPSHOTS:
            view = now.view(node.dom)
            for record in view.in_order():
                yield record.name, Node(Kind.SNAPSHOT, node.dom, record.id)
        elif node.kind is Kind.SNAPSHOT:
            has_parent = self.snapshot(node, now).parent is not None
            for name, kind in SNAPSHOT_ENTRIES.items():
                if kind is Kind.MEMORY and memory_file(node, now) is None:
                    continue
                if kind is not Kind.PARENT or has_parent:
                    yield name, node.child(kind)
        elif node.kind is Kind.DISKS:
            self.snapshot(node, now)
            for disk in now.domain(node.dom).disks:
                for suffix, kind in DISK_SUFFIXES.items():
                    yield disk.target + suffix, node.child(kind, disk.target)
        elif node.kind is Kind.LIVE_DISKS:
            targets = [disk.target for disk in now.domain(node.dom).disks]
            for target in targets:
                yield target, node.child(Kind.LIVE_DISK, target)
            for name in sorted(now.view(node.dom).layer_files()):
                if name not in targets:
                    yield name, node.child(Kind.LAYER, name)
        else:
            raise SnapfsError(errno.ENOTDIR, f"{self.path(node, now)} is not a directory.")

    def find(self, parent: Node, name: str, now: Reading) -> Node | None:
        """The entry `name` of directory `parent` now, or None."""
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
            return self._find_disk_file(parent, name, now)
        else:
            raise SnapfsError(errno.ENOTDIR, f"{self.path(parent, now)} is not a directory.")
        if kind is None or (kind is Kind.MEMORY and memory_file(parent, now) is None):
            return None
        child = parent.child(kind)
        if kind in SYMLINKS and self.readlink(child, now) is None:
            return None
        return child

    @staticmethod
    def _find_disk_file(parent: Node, name: str, now: Reading) -> Node | None:
        """<target>.raw / <target>.changes in a snapshot's disks/, <target> in /<dom>/disks/."""
        targets = {disk.target for disk in now.domain(parent.dom).disks}
        if parent.kind is Kind.LIVE_DISKS:
            if name in targets:
                return parent.child(Kind.LIVE_DISK, name)
            return parent.child(Kind.LAYER, name) if name in now.view(parent.dom).layer_files() else None
        target, dot, suffix = name.rpartition(".")
        kind = DISK_SUFFIXES.get(dot + suffix)
        return parent.child(kind, target) if kind is not None and target in targets else None

    @staticmethod
    def parent_of(node: Node) -> Node:
        if node.kind in (Kind.ROOT, Kind.DOMAIN):
            return ROOT
        if node.kind is Kind.SNAPSHOT:
            return Node(Kind.SNAPSHOTS, node.dom)
        if node.kind in DISK_SUFFIXES.values():
            return Node(Kind.DISKS, node.dom, node.snap)
        if node.kind in (Kind.LIVE_DISK, Kind.LAYER):
            return Node(Kind.LIVE_DISKS, node.dom)
        if node.snap:
            return Node(Kind.SNAPSHOT, node.dom, node.snap)
        return Node(Kind.DOMAIN, node.dom)

    def path(self, node: Node, now: Reading | None = None) -> str:
        """A readable path for messages."""
        if node.kind is Kind.ROOT:
            return "/"
        parts = [node.dom]
        if node.kind is not Kind.DOMAIN:
            if node.snap:
                record = (now or self.reading()).view(node.dom).snapshots.get(node.snap)
                parts += ["snapshots", record.name if record else node.snap]
                if node.kind in DISK_SUFFIXES.values():
                    parts += ["disks", node.disk + _entry_name(DISK_SUFFIXES, node.kind)]
                elif node.kind is not Kind.SNAPSHOT:
                    parts.append(_entry_name(SNAPSHOT_ENTRIES, node.kind))
            else:
                parts.append(_entry_name(DOMAIN_ENTRIES, Kind.LIVE_DISKS if node.disk else node.kind))
                if node.disk:
                    parts.append(node.disk)
        return "/" + "/".join(parts)

    # ---- what it shows -------------------------------------------------------------------
    def attributes(self, node: Node, now: Reading) -> Attributes:
        """The node's attributes now. A .changes or .map must have been loaded (load) first;
        a .raw shows its data as its blocks once loaded, all its size before."""
        stamp = self.snapshot(node, now).creation_time * 1_000_000_000 if node.snap else self._started_ns
        if node.kind in DIRECTORIES:
            mode = stat.S_IFDIR | (0o755 if node.kind is Kind.SNAPSHOTS else 0o555)
            return Attributes(mode, 0, self._directory_links(node, now), stamp)
        if node.kind in SYMLINKS:
            target = self.readlink(node, now)
            if target is None:
                raise gone()
            return Attributes(stat.S_IFLNK | 0o777, len(target.encode("utf-8")), 1, stamp)
        if node.kind is Kind.RAW:
            mode, owner = self._layer_access(node, now)
            size, allocated = self.disk(node, now).size, now.allocated.get(node)  # the virtual size
            return Attributes(mode, size, 1, stamp, owner, allocated)
        if node.kind is Kind.MEMORY:
            path = memory_file(node, now)
            if path is None:
                raise gone()
            st = os.stat(path)
            return Attributes(stat.S_IFREG | (st.st_mode & 0o444), st.st_size, 1, stamp, (st.st_uid, st.st_gid))
        if node.kind in EXTENTS:
            mode, owner = self._layer_access(node, now)
            return Attributes(mode, len(self.content(node, now)), 1, stamp, owner)
        mode = stat.S_IFREG | (0o644 if node.kind in WRITABLE else 0o444)
        return Attributes(mode, len(self.content(node, now)), 1, stamp)

    @staticmethod
    def _layer_access(node: Node, now: Reading) -> tuple[int, tuple[int, int] | None]:
        """A snapshot disk's file is readable by whom its layer file in the store is (its
        read bits, owner and group), so --allow-other shares what the store's owner chose."""
        try:
            st = os.stat(now.domain(node.dom).layer_path(node.disk, node.snap))
        except OSError:
            return stat.S_IFREG | 0o400, None
        return stat.S_IFREG | (st.st_mode & 0o444), (st.st_uid, st.st_gid)

    @staticmethod
    def _directory_links(node: Node, now: Reading) -> int:
        """2 + the number of subdirectories; 1 ("not counted", as btrfs and many FUSE
        filesystems report) for the mount's root. The root is never looked up, so its
        attributes come only from getattr, which the kernel asks before every path it
        resolves unless it may keep them: with nothing in them that can change, the
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

    def content(self, node: Node, now: Reading) -> bytes:
        """What a read of a regular file returns, computed now (never waits for a lock).
        A .changes must have been loaded (load) first; a .raw is read through disk.py."""
        if node.kind is Kind.DOMAIN_XML:
            return self._domain_xml_bytes(node, now)
        if node.kind is Kind.LAST_ERROR:
            return document(now.domain(node.dom).last_error())
        if node.kind is Kind.JOB:
            return document(now.domain(node.dom).job())
        if node.kind is Kind.CONTROL:
            return CONTROL_TEXT
        if node.kind is Kind.DOMAIN_CONTROL:
            return DOMAIN_CONTROL_TEXT
        if node.kind is Kind.SNAP_XML:
            return self._snapshot_xml_bytes(node, now)
        if node.kind in EXTENTS or node.kind is Kind.DOMAIN_STATE:
            data = now.changes.get(node)
            if data is None:  # every path that sizes or reads a .changes or .map loads it first
                raise io_error(f"{self.path(node, now)} was read before it was computed.")
            return data
        if node.kind in (Kind.DESCRIPTION, Kind.STATE, Kind.COMPRESSION):
            record = self.snapshot(node, now)
            values = {
                Kind.DESCRIPTION: record.description,
                Kind.STATE: record.state,
                Kind.COMPRESSION: record.compression,
            }
            return text_file(values[node.kind])
        raise SnapfsError(errno.EINVAL, f"{self.path(node, now)} has no content of its own.")

    def _domain_xml_bytes(self, node: Node, now: Reading) -> bytes:
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

    def _snapshot_xml_bytes(self, node: Node, now: Reading) -> bytes:
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

    async def load(self, node: Node, now: Reading) -> None:
        """Compute what the node's size and content need that takes a qemu-img run (a
        .changes or .map file, a .raw's blocks) or a question to QEMU (/<dom>/state), once per
        reading; nothing for every other node. A .raw whose map cannot be read now (an
        operation changes its chain) shows all its size as allocated, and its stat is not
        refused."""
        if node.kind in EXTENTS and node not in now.changes:
            now.changes[node] = await self._changes_bytes(node, now)
        elif node.kind is Kind.DOMAIN_STATE and node not in now.changes:
            # asked of QEMU on every reading (the file is volatile and read with direct_io)
            now.changes[node] = text_file(await runtime.state_word(now.domain(node.dom).files))
        elif node.kind is Kind.RAW and node not in now.allocated:
            dom, map_node = now.domain(node.dom), node.child(Kind.MAP, node.disk)
            if dom.operation_naming([dom.layer_path(node.disk, node.snap)]) is not None:
                return  # a stat is not refused, nor recorded in last-error
            try:
                await self.load(map_node, now)
            except SnapfsError:
                return
            now.allocated[node] = sum(json.loads(line)["length"] for line in now.changes[map_node].splitlines())

    async def _changes_bytes(self, node: Node, now: Reading) -> bytes:
        """<target>.changes: what L(S) holds against its backing, as JSON lines; <target>.map:
        where S's whole image holds data.

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
            return cached[1]
        extents = await self._read_changes(dom, node.snap, node.disk, node.kind is Kind.MAP)
        data = "".join(json.dumps(extent) + "\n" for extent in extents).encode("ascii")
        after = dom.view()
        if after.generation == view.generation and after.epoch == view.epoch:
            self._changes[node] = (key, data)
            if len(self._changes) > CHANGES_CACHE_SIZE:
                self._changes.popitem(last=False)
        return data


def memory_file(node: Node, now: Reading) -> str | None:
    """The saved memory of the node's snapshot (its file in the store), or None."""
    record = now.view(node.dom).snapshots.get(node.snap)
    if record is None or not has_memory(record):
        return None
    path = now.domain(node.dom).files.memory(record.id)
    return path if os.path.exists(path) else None


def _entry_name(table: dict[str, Kind], kind: Kind) -> str:
    return next(name for name, k in table.items() if k is kind)
