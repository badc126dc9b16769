"""The mount's lifecycle: check the mountpoint, recover the store, mount, serve, unmount.

`run_mount` daemonizes by default: the parent returns only once the filesystem is
mounted (or with the sentence saying why it is not), so `snapfs mount DIR && ls DIR`
works. SIGINT and SIGTERM end the loop with pyfuse3.terminate() and unmount cleanly;
`fusermount3 -u DIR` ends it too.

For tests and systemd: python -m snapfs.mount STORE MOUNTPOINT --foreground [--read-only]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import logging.handlers
import os
import resource
import signal
import sys
from collections.abc import Callable

import pyfuse3
import trio

from .catalog import StoreCore
from .domain import DomainCore
from .errors import SnapfsError
from .fs import SnapFS
from .kcache import KernelCache
from .notify import MountListener
from .vfs import Tree
from .writes import Writes

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Large reads: the kernel caps a request at max_pages, which libfuse 3 negotiates as 256
# pages (1 MiB, also the kernel's fs.fuse.max_pages_limit), and at max_read, unlimited by
# default. So a .raw read with a buffer of 1 MiB or more arrives as 1 MiB requests
# (direct_io, see fs.RAW_DIRECT_IO; measured). The max_read=N mount option cannot be
# passed through pyfuse3: libfuse refuses it unless init() sets conn->max_read too, which
# pyfuse3 does not expose ("init() and fuse_session_new() requested different maximum
# read size"); nor can pyfuse3 raise max_readahead.
_operations: SnapFS | None = None  # the mounted filesystem, for the cleanup at the end
_kcache: KernelCache | None = None  # what its kernel holds, forgotten on every change heard of
_listener: MountListener | None = None  # where other processes tell us of their changes


class MountError(Exception):
    """A mount refused before it started: one sentence for stderr."""


def check_mountpoint(mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        raise MountError(f"Mountpoint {path} does not exist; create an empty directory first.") from None
    except NotADirectoryError:
        raise MountError(f"Mountpoint {path} is not a directory.") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"Mountpoint {path} is a mount left behind by a crash; clear it with fusermount3 -u {path}."
            ) from None
        raise MountError(f"Mountpoint {path} cannot be used: {exc.strerror}.") from None
    if os.path.ismount(path):
        raise MountError(f"Mountpoint {path} is already a mount point.")
    if names:
        raise MountError(f"Mountpoint {path} is not empty; snapfs mounts only on an empty directory.")
    return path


def mount_options(store_root: str, allow_other: bool, read_only: bool = False) -> set[str]:
    """default_permissions; the store's path as the source findmnt and df show (libfuse
    splits options at commas, so a comma or backslash in it is escaped); `ro` makes the
    kernel refuse every change with EROFS before it reaches a handler."""
    source = os.path.abspath(store_root).replace("\\", "\\\\").replace(",", "\\,")
    options = set(pyfuse3.default_options)
    options |= {f"fsname={source}", "subtype=snapfs"}
    if allow_other:
        options.add("allow_other")
    if read_only:
        options.add("ro")
    return options


def open_store(store_root: str) -> StoreCore:
    """The store to mount; a path that is not one is refused, never made into one (only
    define makes a store, as for every other verb)."""
    if not os.path.isdir(store_root):
        raise MountError(f"Store {os.path.abspath(store_root)} does not exist.")
    if not os.path.isdir(os.path.join(store_root, "domains")):
        raise MountError(
            f"There is no snapfs store at {os.path.abspath(store_root)} (check --store or $SNAPFS_STORE; "
            "define creates a store)."
        )
    try:
        return StoreCore(store_root)
    except SnapfsError as exc:
        raise MountError(exc.message) from None


def recover(store_root: str) -> None:
    """Finish any operation a crash interrupted, before anything is served."""

    async def _recover() -> None:
        await open_store(store_root).recover()

    try:
        trio.run(_recover)
    except SnapfsError as exc:
        raise MountError(f"Recovering store {store_root} failed: {exc.message}") from None


def mount(store_root: str, mountpoint: str, allow_other: bool, read_only: bool = False) -> None:
    """Mount (pyfuse3.init) after recovery; requests queue in the kernel until serve().
    A read-only mount still recovers the store (an interrupted operation is finished, so
    what it serves is a consistent state) and still hears of every change."""
    path = check_mountpoint(mountpoint)
    recover(store_root)
    global _operations, _kcache, _listener
    store = open_store(store_root)
    kcache = _kcache = KernelCache()
    tree = Tree(store, DomainCore.disk_changes)
    operations = _operations = SnapFS(tree, kcache, Writes(tree), DomainCore.open_disk, read_only=read_only)
    try:
        _listener = MountListener(store.root)
    except OSError as exc:
        # Nobody could tell this mount of a change: the kernel may keep nothing, so every
        # path is looked up again (slower, never stale).
        log.warning("cannot register in %s/run (%s): serving without kernel caches", store_root, exc.strerror)
        kcache.cache_seconds = 0
    _wire_announcements(store, kcache, _listener)
    try:
        pyfuse3.init(operations, path, mount_options(store.root, allow_other, read_only))
    except RuntimeError as exc:
        _unregister()
        raise MountError(f"Cannot mount on {path}: {exc}.") from None


def _wire_announcements(store: StoreCore, kcache: KernelCache, listener: MountListener | None) -> None:
    """The one place where the mount hears of changes: those made through this process's
    core reach kcache.forget directly; other processes tell every registered mount
    through notify.py, except this one (its listener's token), which heard already.
    (listener.serve(kcache.forget), started in _serve, answers them.)"""
    store.subscribe(kcache.forget)
    store.announcer.exclude_token = listener.token if listener is not None else None


def _unregister() -> None:
    if _listener is not None:
        _listener.close()


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        if _listener is not None and _kcache is not None:
            nursery.start_soon(_listener.serve, _kcache.forget)
        try:
            await pyfuse3.main()
        finally:
            if _listener is not None:
                _listener.unregister()  # first: whoever tells us of a change from now on need not wait
            nursery.cancel_scope.cancel()
            if _operations is not None:
                with trio.CancelScope(shield=True):
                    await _operations.close_disks()  # their qemu-nbd servers outlive us otherwise


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def raise_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: qemu-img (started from here) opens every
    layer of a chain, and chains may be MAX_CHAIN_SNAPSHOTS deep."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def serve() -> int:
    """Run the loop until a signal or an unmount, then unmount cleanly."""
    raise_file_limit()
    code = 0
    try:
        trio.run(_serve)
    except BaseException:
        log.exception("the filesystem loop failed")
        code = 1
    finally:
        _unregister()
        pyfuse3.close(unmount=True)
    return code


def run_mount(store_root: str, mountpoint: str, foreground: bool, allow_other: bool, read_only: bool = False) -> int:
    """Mount store_root on mountpoint; 0 when mounted (daemon) or cleanly unmounted.
    read_only: every change through the mount is refused with EROFS (backup hosts)."""
    if foreground:
        try:
            mount(store_root, mountpoint, allow_other, read_only)
        except MountError as exc:
            print(f"snapfs: {exc}", file=sys.stderr)
            return 1
        return serve()
    return _daemonize(lambda: mount(store_root, mountpoint, allow_other, read_only))


def _daemonize(do_mount: Callable[[], None]) -> int:
    """Fork; the child mounts, tells the parent through a pipe, detaches and serves."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        print(f"snapfs: {message or 'the mount process ended without mounting.'}", file=sys.stderr)
        return 1
    os.close(read_end)
    os._exit(_daemon_child(do_mount, write_end))


def _daemon_child(do_mount: Callable[[], None], report_fd: int) -> int:
    os.setsid()
    try:
        do_mount()
    except MountError as exc:
        _report(report_fd, str(exc))
        return 1
    except Exception as exc:  # a sentence for the parent, never a silent exit
        _report(report_fd, f"The mount failed: {exc}.")
        return 1
    _detach_stdio()
    _report(report_fd, "ok")
    return serve()


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message.encode("utf-8"))
        os.close(fd)


def _detach_stdio() -> None:
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    logging.getLogger().handlers.clear()
    if os.path.exists("/dev/log"):
        with contextlib.suppress(OSError):
            handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(logging.Formatter("snapfs[%(process)d]: %(message)s"))
            logging.getLogger().addHandler(handler)


def setup_logging() -> None:
    level = logging.DEBUG if os.environ.get("SNAPFS_DEBUG") else logging.WARNING
    logging.basicConfig(level=level, format="snapfs: %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapfs.mount", description="Mount a snapfs store.")
    parser.add_argument("store")
    parser.add_argument("mountpoint")
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--read-only", action="store_true", help="refuse every change with EROFS")
    args = parser.parse_args(argv)
    setup_logging()
    return run_mount(args.store, args.mountpoint, args.foreground, args.allow_other, args.read_only)


if __name__ == "__main__":
    sys.exit(main())
