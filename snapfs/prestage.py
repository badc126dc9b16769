"""Pre-staging: each disk's next live layer made ahead of time, off the user's path.

A create freezes the live layer under the real name it already has, so the next live
layer's backing is known as soon as a create or a revert is done: an empty overlay on the
live file's name. It is made (engines/qemu_img.py QemuImgEngine.prestage) in
`staged/<target>.qcow2`, outside `layers/`, so nothing takes it for a layer; the next
create's overlay step renames it into place instead of running `qemu-img create`, after
checking it still fits (backing, size, empty, intact). A stale or broken one is never
used: it is replaced by the next pre-staging, removed with the domain.

It runs after an operation's result is durable and its lock released, in a thread of the
process that made the change (the mount daemon, an API user's process, the command line,
whose exit waits for it), under the domain's lock taken without waiting: a domain busy
with another operation is left to that operation's own pre-staging. The next operation
of the same process waits for it (DomainFiles.locked) instead of polling the lock.
SNAPFS_PRESTAGE=0 turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading

_threads: dict[str, threading.Thread] = {}
_guard = threading.Lock()


def enabled() -> bool:
    return os.environ.get("SNAPFS_PRESTAGE", "1") != "0"


def start(domain_path: str) -> None:
    """Pre-stage the domain's next live layers in a thread of this process (once at a time)."""
    if not enabled():
        return
    with _guard:
        running = _threads.get(domain_path)
        if running is not None and running.is_alive():
            return
        thread = threading.Thread(target=_run, args=(domain_path,), name="snapfs-prestage")
        _threads[domain_path] = thread
        thread.start()


def wait_now(domain_path: str) -> None:
    """Block until this process's pre-staging on the domain (if any) is done."""
    thread = _threads.get(domain_path)
    if thread is not None and thread is not threading.current_thread():
        thread.join()


async def wait_for(domain_path: str) -> None:
    """wait_now without blocking the event loop (nothing to wait for: no thread hop)."""
    thread = _threads.get(domain_path)
    if thread is None or thread is threading.current_thread() or not thread.is_alive():
        return
    import trio

    await trio.to_thread.run_sync(wait_now, domain_path)


def _run(domain_path: str) -> None:
    import trio

    with contextlib.suppress(Exception):  # best effort: a create without one makes its own overlay
        trio.run(prestage, domain_path)


async def prestage(domain_path: str) -> None:
    """Make the next live layer of every disk of the domain at `domain_path`, if the domain
    is free (its lock is taken without waiting), its journal done and its live layers known.
    A fresh DomainFiles: the thread shares no metadata cache with the process's readers."""
    from .engines.qemu_img import QemuImgEngine
    from .store import DomainFiles

    files = DomainFiles(domain_path)
    async with files.locked(wait=0):
        if files.read_journal() is not None:
            return
        disks = files.record().disks
        live = files.live_names()
        if not live or any(d.target not in live for d in disks):
            return
        await QemuImgEngine().prestage(files, disks, live)
