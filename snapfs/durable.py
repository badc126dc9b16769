"""Durable files: atomic replacement, fsyncs (now or batched), and flock-based locks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import AsyncIterator

from .errors import CorruptError, busy, not_found

TYPE_CHECKING = False  # not typing's: the reading verbs load this module
if TYPE_CHECKING:
    import queue


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSyncs:
    """Directories whose entries a journalled operation changed and has not fsynced yet.

    A step's rename is durable once its directory is fsynced; the journal only needs that
    before it records the step as done (and before it is cleared). So the steps between
    two journal writes leave their directories here, and flush() fsyncs each once, just
    before the journal is written: on ext4 the first fsync commits them all, the others
    find nothing to do. Files themselves are still fsynced before they are renamed into
    place, so a path never holds a half-written file."""

    def __init__(self) -> None:
        self.dirs: set[str] = set()

    def add(self, directory: str) -> None:
        self.dirs.add(directory)

    def flush(self) -> None:
        while self.dirs:
            fsync_dir(self.dirs.pop())


def sync_dir_of(path: str, syncs: DirSyncs | None) -> None:
    """fsync path's directory now, or leave it to syncs.flush()."""
    if syncs is None:
        fsync_dir(os.path.dirname(path))
    else:
        syncs.add(os.path.dirname(path))


def atomic_write(path: str, data: bytes, syncs: DirSyncs | None = None) -> None:
    """Replace path with data: write a temporary beside it, fsync, rename. A failure
    (ENOSPC, EIO) removes the temporary and leaves path as it was."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        unlink_if_present(tmp)
        raise
    sync_dir_of(path, syncs)


def write_json(path: str, obj: object, syncs: DirSyncs | None = None) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode(), syncs)


def read_json(path: str) -> dict:
    """A JSON object from path; CorruptError (EUCLEAN, naming the file) if it holds
    anything else. FileNotFoundError passes through."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptError(path, "not valid JSON" if data.strip() else "empty") from exc
    if not isinstance(obj, dict):
        raise CorruptError(path, "not a JSON object")
    return obj


def unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def unlink_freeing_later(path: str) -> None:
    """unlink_if_present, with the file's blocks freed later, once free_unlinked() is called
    (after the operation: domain.py). Freeing is what takes time (0.1-0.35 s for a 256 MiB
    layer here), the filesystem does it at the last close, not at the unlink, and a later
    fsync waits for it: so the file is held open across the unlink and closed by a thread
    once the operation's last fsync is done. The name is gone when this returns, as with
    unlink_if_present; a crash before the close frees the blocks all the same (the kernel
    closes a dead process's files; after a power cut, the filesystem's orphan list)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:  # not a regular file we may open: unlinked as it is
        unlink_if_present(path)
        return
    try:
        unlink_if_present(path)
    except BaseException:
        os.close(fd)
        raise
    with _closing_guard:
        _unlinked.append((os.getpid(), fd))


def free_unlinked() -> None:
    """Close, in a thread of this process, the files unlink_freeing_later kept open (a
    forked child's inherited ones are its parent's to close)."""
    with _closing_guard:
        mine = [fd for pid, fd in _unlinked if pid == os.getpid()]
        _unlinked.clear()
    if mine:
        closer = _closer()
        for fd in mine:
            closer.put(fd)


_unlinked: list[tuple[int, int]] = []  # (the process that unlinked, the file still open)
_closing: tuple[int, queue.SimpleQueue[int]] | None = None  # (the process it belongs to, its queue)
_closing_guard = threading.Lock()


def _closer() -> queue.SimpleQueue[int]:
    """This process's queue of files to close (a daemon thread closes them in order; one
    left at exit is closed by the kernel)."""
    import queue  # here, not at the top: the reading verbs load this module and never delete

    global _closing
    with _closing_guard:
        if _closing is None or _closing[0] != os.getpid():  # a forked child has no thread
            fds: queue.SimpleQueue[int] = queue.SimpleQueue()
            threading.Thread(target=_close_all, args=(fds,), name="snapfs-free", daemon=True).start()
            _closing = (os.getpid(), fds)
        return _closing[1]


def _close_all(fds: queue.SimpleQueue[int]) -> None:
    while True:
        with contextlib.suppress(OSError):
            os.close(fds.get())


@contextlib.asynccontextmanager
async def flocked(path: str, busy_message: str, wait: float) -> AsyncIterator[None]:
    """An exclusive flock on `path`, polled without blocking the event loop; EBUSY with
    `busy_message` after `wait` seconds."""
    import trio  # here, not at the top: the reading verbs load this module and never lock

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise not_found(busy_message) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy(busy_message) from None
                await trio.sleep(0.02)
        yield
    finally:
        os.close(fd)
