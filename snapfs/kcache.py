"""What the kernel holds for a mount, and what a change makes it forget.

The kernel knows the tree's nodes by inode numbers, handed out here and never reused for
another node (a snapshot's nodes are keyed on its id, so a rename keeps them). It keeps
the entries and attributes it is given for CACHE_SECONDS (that is what makes `ls -l` of
10,000 snapshots fast) and drops them the moment they may have changed: every change of
a domain, made by this mount or by any other process, reaches forget() (through the
core, or notify.py for other processes) before the call that made it returns, and the
kernel is told to forget every entry, attribute and cached page of that domain it was
given (metadata files are read through the page cache: fs.PAGE_CACHED). An
answer computed from what was read before a change was heard of (the epoch moved
meanwhile) is given without timeouts.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import defaultdict
from collections.abc import Iterator

import pyfuse3
import trio

from . import notify
from .vfs import ROOT, VOLATILE, Attributes, Node

# How long the kernel may keep an entry or attributes. Every change is invalidated
# explicitly (forget), so this bounds only what no process announced: a change by a
# process killed before it could tell the mounts, or an edit of the store by hand.
CACHE_SECONDS = 5.0


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
            raise pyfuse3.FUSEError(errno.ENOENT) from None


class KernelCache:
    """The inodes, and the entries and attributes handed to the kernel with a timeout
    (per domain), and the count of changes heard of (the epoch)."""

    def __init__(self, cache_seconds: float = CACHE_SECONDS) -> None:
        self.inodes = InodeTable()
        self.epoch = 0  # changes heard of (forget calls)
        self.cache_seconds = cache_seconds  # 0 when changes cannot be heard of (mount.py)
        self._entries: defaultdict[str, set[tuple[int, bytes]]] = defaultdict(set)
        self._inodes: defaultdict[str, set[int]] = defaultdict(set)
        self._pages: defaultdict[str, set[int]] = defaultdict(set)  # inodes whose content it may cache
        self._invalidating = trio.CapacityLimiter(4)  # never the threads that store I/O needs
        self._uid = os.getuid()
        self._gid = os.getgid()

    def entry(self, node: Node, attrs: Attributes, epoch: int) -> pyfuse3.EntryAttributes:
        """The node's attributes for the kernel, to keep CACHE_SECONDS (noted, so that
        forget() can drop them) unless a change was heard of since `epoch`, when they were
        read: an answer that may be out of date is given with no timeout. The attributes
        of a volatile file (its size changes without a change of the domain's metadata)
        are never kept."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self.inodes.inode(node)
        entry.generation = 0
        if epoch == self.epoch and self.cache_seconds:
            entry.entry_timeout = self.cache_seconds
            entry.attr_timeout = 0 if node.kind in VOLATILE else self.cache_seconds
            if node.dom:
                self._inodes[node.dom].add(entry.st_ino)
        else:
            entry.entry_timeout = entry.attr_timeout = 0
        entry.st_mode = attrs.mode
        entry.st_nlink = attrs.nlink
        entry.st_size = attrs.size
        entry.st_blocks = attrs.blocks
        entry.st_uid, entry.st_gid = attrs.owner or (self._uid, self._gid)
        entry.st_blksize = 4096
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attrs.time_ns
        return entry

    def keeps_pages(self, node: Node) -> bool:
        """Whether the kernel may keep the content of the node's file in its page cache
        until forget() (noted, so that forget() drops it): only while changes are heard of."""
        if not self.cache_seconds or not node.dom:
            return False
        self._pages[node.dom].add(self.inodes.inode(node))
        return True

    def note_entry(self, parent: Node, name: bytes, child: Node, entry: pyfuse3.EntryAttributes) -> None:
        """An entry (name in parent) handed to the kernel: noted if it may keep it."""
        if entry.entry_timeout:
            self.note_name(child.dom, self.inodes.inode(parent), name)

    def note_name(self, dom: str, parent_inode: int, name: bytes) -> None:
        """A name the kernel will hold for domain `dom` (a rename's new name is noted
        first: the kernel moves the entry there once it returns, and a change heard of
        while the rename awaits must drop it too)."""
        self._entries[dom].add((parent_inode, name))

    async def forget(self, dom: str) -> None:
        """Make the kernel forget every entry and attribute it was given for domain `dom`,
        before returning. An answer being computed meanwhile from what was read before is
        given without timeouts (the epoch moved, see timeouts()).

        Attributes are invalidated in a thread (the kernel's call may wait). An entry's
        invalidation waits for requests the kernel is serving in its directory, so it is
        queued instead (pyfuse3 does it right after) when this runs inside a request for
        which the kernel holds such a lock itself (notify.DO_NOT_WAIT): mkdir, rmdir and
        rename change only the entry the kernel updates itself. No handler that runs while
        the kernel holds a directory lock (lookup, readdir, mkdir, rmdir, rename) may wait
        for another request's change to be announced (see SnapFS.lookup)."""
        self.epoch += 1
        inodes = self._inodes.pop(dom, set())
        pages = self._pages.pop(dom, set())
        entries = self._entries.pop(dom, set())
        if notify.DO_NOT_WAIT.get():
            for parent_inode, name in entries:
                pyfuse3.invalidate_entry_async(parent_inode, name, ignore_enoent=True)
            entries = set()
        if inodes or pages or entries:
            await trio.to_thread.run_sync(_invalidate, inodes - pages, pages, entries, limiter=self._invalidating)


def _invalidate(inodes: set[int], pages: set[int], entries: set[tuple[int, bytes]]) -> None:
    """Tell the kernel to forget attributes, attributes and cached content, and entries (in
    a worker thread: it may wait, for a page being read, see SnapFS.read)."""
    for inode in inodes:
        with contextlib.suppress(OSError):  # ENOENT: the kernel has forgotten it already
            pyfuse3.invalidate_inode(inode, attr_only=True)
    for inode in pages:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(inode, attr_only=False)
    for parent_inode, name in entries:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry(parent_inode, name)


@contextlib.contextmanager
def notify_without_waiting() -> Iterator[None]:
    """For a request during which the kernel holds a lock of one of our directories or
    of the node itself: see KernelCache.forget and notify.DO_NOT_WAIT."""
    token = notify.DO_NOT_WAIT.set(True)
    try:
        yield
    finally:
        notify.DO_NOT_WAIT.reset(token)
