"""The write protocol of the mount's writable files (DESIGN section 2, sysfs rules): what
bytes written through an open `control`, `compression` or `description` become, and when.

- `control` and `compression` act in write() itself: one value per write, the offset is
  ignored (`>>` writes at st_size), and a refused write makes every later write through
  the same open file refused the same way (Python's buffered close() sends it again).
- `description` collects what is written since open, checked at each write by the
  core's validator (so the `echo` that caused a refusal gets it), and is stored on the
  close() that follows a write (FUSE flush; a flush before any write does nothing, as the
  shell flushes once before it writes) or, for an O_TRUNC without a write, at release.
  Readers of that snapshot's description and xml wait for a store still running.

fs.py calls these from its handlers; every refusal made here is recorded in last-error.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from . import runtime
from .errors import DependentsError, SnapfsError
from .rules import validate_description
from .vfs import WRITABLE, Kind, Node, Tree

log = logging.getLogger(__name__)

ACTS_IN_WRITE = {Kind.COMPRESSION: "compression", Kind.CONTROL: "control", Kind.DOMAIN_CONTROL: "control"}


@dataclass
class Written:
    """What was written through one open file."""

    data: bytearray = field(default_factory=bytearray)  # description: since open
    dirty: bool = False  # O_TRUNC, a truncate or a write: the value is to be stored
    unsaved: bool = False  # written since the last store: stored at the next flush (close)
    refused: bool = False  # a write or a store was refused: nothing more is stored
    refused_errno: int = 0  # control/compression: a write was refused; later writes get the same


def record_refusal(tree: Tree, dom_name: str, operation: str, err: int, message: str) -> None:
    """Log a refusal and put it in the domain's last-error (best effort)."""
    log.info("%s refused (%s): %s", operation, errno.errorcode.get(err, err), message)
    if not dom_name:
        return
    try:
        tree.store.domain(dom_name).record_error(operation, message)
    except Exception:  # the domain may be gone; last-error is best effort
        log.exception("cannot record the refusal in last-error")


def refusal(tree: Tree, node: Node, err: int, operation: str, message: str) -> SnapfsError:
    """A refusal made by the filesystem itself, recorded in last-error: raise it."""
    record_refusal(tree, node.dom, operation, err, message)
    return SnapfsError(err, message)


def description_so_far(data: bytes) -> str:
    """What `data` (written since open) would store, checked now by the core's validator:
    UTF-8 so far, no control characters, at most the limit (a trailing newline is
    dropped; bytes of a character not yet complete are counted)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        text = decoder.decode(data, final=False)
    except UnicodeDecodeError:
        raise SnapfsError(errno.EINVAL, "A description must be UTF-8 text.") from None
    pending = len(decoder.getstate()[0])
    if text.endswith("\n") and not pending:
        text = text[:-1]
    return validate_description(text + " " * pending)


class PendingStores:
    """Description stores still running after a close(), per snapshot: FUSE sends release
    asynchronously, so close() returns before the value is stored, and the next cat of
    description or xml waits for it here (not for the domain lock)."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], list[trio.Event]] = {}

    def storing(self, node: Node) -> bool:
        """Whether a store that changes what `node` shows is still running."""
        return node.kind in (Kind.DESCRIPTION, Kind.SNAP_XML) and bool(self._events.get((node.dom, node.snap)))

    async def settled(self, node: Node) -> bool:
        """Wait for the stores of this node's snapshot; True if it waited (what was read
        before is then out of date). Never called from lookup (see SnapFS.lookup)."""
        waited = False
        if self.storing(node):
            for event in list(self._events.get((node.dom, node.snap), ())):
                await event.wait()
                waited = True
        return waited

    @contextlib.asynccontextmanager
    async def store(self, node: Node) -> AsyncIterator[None]:
        key = (node.dom, node.snap)
        event = trio.Event()
        self._events.setdefault(key, []).append(event)  # before any await
        try:
            yield
        finally:
            event.set()
            waiting = self._events.get(key, [])
            if event in waiting:
                waiting.remove(event)
            if not waiting:
                self._events.pop(key, None)


class Writes:
    """The write protocol, for the handlers of fs.py (see the module docstring)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.pending = PendingStores()

    def opened(self, node: Node, truncate: bool) -> Written:
        """An open for writing; O_TRUNC of a description stores the empty value at release."""
        return Written(dirty=truncate and node.kind is Kind.DESCRIPTION)

    async def write(self, node: Node, written: Written, buf: bytes) -> int:
        if node.kind is Kind.DESCRIPTION:
            self._add_description(node, written, buf)
            return len(buf)
        if written.refused_errno:
            # Python's buffered close() sends a refused write again: acting on it would
            # do what the caller is told was refused. One refusal per open, like sysfs.
            raise SnapfsError(written.refused_errno, "refused already")
        try:
            await self._act_on_word(node, ACTS_IN_WRITE[node.kind], buf)
        except SnapfsError as exc:
            written.refused_errno = exc.errno
            raise
        return len(buf)  # the offset is ignored: each write is one value (sysfs)

    async def _act_on_word(self, node: Node, operation: str, buf: bytes) -> None:
        try:
            word = buf.decode("utf-8").strip()
        except UnicodeDecodeError:
            message = f"What was written to {self.tree.path(node)} is not UTF-8 text."
            raise refusal(self.tree, node, errno.EINVAL, operation, message) from None
        dom = self.tree.domain(node)
        try:
            if node.kind is Kind.DOMAIN_CONTROL:
                await runtime.control(dom, word)
            elif node.kind is Kind.CONTROL:
                await dom.control(node.snap, word)
            else:
                await dom.set_compression(node.snap, word)
        except DependentsError as exc:
            raise SnapfsError(errno.EBUSY, exc.message) from exc  # a control write: EBUSY

    def _add_description(self, node: Node, written: Written, buf: bytes) -> None:
        """Accumulate a description; refuse at write time what could never be stored."""
        data = written.data + buf
        try:
            description_so_far(bytes(data))
        except SnapfsError as exc:
            written.refused = True
            raise refusal(self.tree, node, exc.errno, "description", exc.message) from None
        written.data = data
        written.dirty = written.unsaved = True

    async def flush(self, node: Node, written: Written) -> None:
        """close(): a description written since the last store is stored now, so close()
        reports the outcome and returns only once the value is in the store."""
        if written.unsaved and not written.refused:
            await self._store_description(node, written)

    async def release(self, node: Node, written: Written) -> None:
        """Store what is still unstored, e.g. `: > description` (O_TRUNC, no write)."""
        if written.dirty and not written.refused:
            await self._store_description(node, written)

    async def truncate(self, node: Node, size: int, written: Written | None) -> None:
        """A truncate to 0 through an open file empties what it wrote; without one it
        stores the empty description. Control and compression ignore it."""
        path = self.tree.path(node)
        if node.kind not in WRITABLE:
            raise refusal(self.tree, node, errno.EACCES, "truncate", f"{path} is read-only.")
        if size != 0:
            message = f"{path} can only be emptied, not truncated to {size} bytes."
            raise refusal(self.tree, node, errno.EINVAL, "truncate", message)
        if node.kind is not Kind.DESCRIPTION:
            return  # control and compression act on a write, never on a truncate
        if written is not None:
            written.data.clear()
            written.dirty = True
        else:
            await self.tree.domain(node).set_description(node.snap, "")

    async def _store_description(self, node: Node, written: Written) -> None:
        """set_description with what was written since open; readers of this snapshot's
        description and xml wait for it (PendingStores.settled)."""
        async with self.pending.store(node):
            try:
                try:
                    text = bytes(written.data).decode("utf-8")
                except UnicodeDecodeError:
                    message = "A description must be UTF-8 text; it ends mid-character."
                    raise refusal(self.tree, node, errno.EINVAL, "description", message) from None
                await self.tree.domain(node).set_description(node.snap, text.removesuffix("\n"))
            except BaseException:
                written.refused = True  # reported once; release does not try again
                raise
            written.dirty = written.unsaved = False
