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
