"""Telling mounts that a domain changed, so the kernel never serves an old answer.

A mount lets the kernel keep entries and attributes (that is what makes `ls -l` of
10,000 snapshots fast), so it must drop them the moment another process changes the
store. Each mount listens on an abstract unix socket and registers it as a file in the
store's run/ directory; whoever changes a domain (the command line, the API, another
mount) tells every registered mount the domain's name once its lock is released, and,
unless told not to wait, waits for the mount's answer, which comes only after the
kernel has dropped what it held for that domain. So when a command returns, every
mount's next stat, ls or cat sees what it did.

A live mount holds an flock on its registration file; a registration whose socket does
not answer and whose lock nobody holds belongs to a mount that died, and is removed by
the first process that finds it. (Abstract sockets live in one network namespace: a
process in another one cannot reach the mount, logs that, and leaves it registered.)
Telling never fails the change that was made: problems are logged.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio  # imported where used: the store's reading verbs load this module, never trio

log = logging.getLogger(__name__)

RUN_DIR = "run"
ANSWER_TIMEOUT = 5.0  # for all mounts together; one that answers later is logged and not waited for
MAX_MESSAGE = 4096
_SOCKET_PREFIX = b"\0snapfs-mount-"

# Set while the kernel holds a directory lock of this mount for the request being served
# (mkdir, rmdir, rename): waiting for another mount then could wait on a mount that waits
# for this one, so the news is sent without waiting for the answer.
DO_NOT_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("snapfs_notify_do_not_wait", default=False)


def run_dir(store_root: str) -> str:
    return os.path.join(store_root, RUN_DIR)


def _address(token: str) -> bytes:
    return _SOCKET_PREFIX + token.encode("ascii")


class MountListener:
    """A mount's end: a listening socket, registered in the store while it is open."""

    def __init__(self, store_root: str) -> None:
        self.token = uuid.uuid4().hex
        self._registration = os.path.join(run_dir(store_root), self.token)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._lock_fd = -1
        try:
            self._socket.bind(_address(self.token))
            self._socket.listen(64)
            _make_run_dir(run_dir(store_root))
            self._lock_fd = os.open(self._registration, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # held while the mount lives
        except BaseException:
            self.close()
            raise

    def unregister(self) -> None:
        """Nobody needs to tell this mount anything any more (idempotent)."""
        if self._lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._registration)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Unregister and close the socket (once serve() has ended)."""
        self.unregister()
        self._socket.close()

    async def serve(self, domain_changed: Callable[[str], Awaitable[None]]) -> None:
        """Answer each message once domain_changed(name) has returned."""
        import trio

        listener = trio.socket.from_stdlib_socket(self._socket)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    connection, _ = await listener.accept()
                except OSError as exc:  # EMFILE and the like: never let it end the mount
                    log.warning("accepting a change notice failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._answer, connection, domain_changed)

    @staticmethod
    async def _answer(connection: trio.socket.SocketType, domain_changed: Callable[[str], Awaitable[None]]) -> None:
        import trio

        with connection:
            try:
                with trio.fail_after(ANSWER_TIMEOUT):
                    message = await _read_line(connection)
                await domain_changed(message.decode("utf-8"))
                await connection.send(b"ok\n")
            except (OSError, UnicodeDecodeError, trio.TooSlowError):
                pass  # the sender went away or sent nothing useful: nothing to answer
            except Exception:
                log.exception("dropping the kernel's caches after a change failed")


class Announcer:
    """A store's subscriber (catalog.StoreCore.subscribe) that tells the registered mounts
    of every change, except the one whose token is `exclude_token`: the mount of this
    process, which has its own subscription and needs no telling through a socket."""

    def __init__(self, store_root: str, exclude_token: str | None = None) -> None:
        self.store_root = store_root
        self.exclude_token = exclude_token

    async def __call__(self, domain: str) -> None:
        await tell_mounts(self.store_root, domain, exclude=self.exclude_token)


async def tell_mounts(store_root: str, domain: str, exclude: str | None = None) -> None:
    """Tell every registered mount (but `exclude`) that `domain` changed, all at once;
    wait for their answers (ANSWER_TIMEOUT in all) unless DO_NOT_WAIT is set. Never raises."""
    try:
        tokens = [t for t in os.listdir(run_dir(store_root)) if t != exclude and "." not in t]
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot list the mounts of %s: %s", store_root, exc)
        return
    if not tokens:
        return
    import trio

    wait = not DO_NOT_WAIT.get()
    with trio.move_on_after(ANSWER_TIMEOUT) as scope:
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(_tell, store_root, token, domain, wait)
    if scope.cancelled_caught:
        log.warning(
            "a mount of %s did not confirm in %.0f s that it dropped its caches for %s",
            store_root,
            ANSWER_TIMEOUT,
            domain,
        )


async def _tell(store_root: str, token: str, domain: str, wait: bool) -> None:
    import trio

    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(_address(token))
            await sock.send(domain.encode("utf-8") + b"\n")
            if wait:
                await _read_line(sock)
    except ConnectionRefusedError:
        _remove_if_dead(os.path.join(run_dir(store_root), token))
    except OSError as exc:
        log.warning("mount %s did not confirm that it dropped its caches for %s: %s", token, domain, exc)


def _remove_if_dead(registration: str) -> None:
    """Remove a registration nobody answers on, unless its mount still holds its lock
    (a live mount in another network namespace)."""
    try:
        fd = os.open(registration, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(registration)
    except OSError:
        pass  # held (alive), gone already, or not ours to remove
    finally:
        os.close(fd)


def _make_run_dir(path: str) -> None:
    """run/, writable by the store's owner only, readable by all (whatever the umask)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    os.chmod(path, 0o755)


async def _read_line(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await sock.recv(MAX_MESSAGE)
        if not chunk or len(data) > MAX_MESSAGE:
            raise ConnectionResetError("the message ended early")
        data += chunk
    return data[:-1]
