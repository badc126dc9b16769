"""Telling mounts that a domain changed, so the kernel never serves an old answer.

A mount lets the kernel keep entries and attributes (that is what makes `ls -l` of
10,000 snapshots fast), so it must drop them the moment another process changes the
store. Each mount listens on an abstract unix socket and registers it as a file in the
store's run/ directory; whoever changes a domain (the command line, the API, another
mount) tells every registered mount the domain's name once its lock is released, and,
unless told not to wait, waits for the mount's answer, which comes only after the
kernel has dropped what it held for that domain. So when a command returns, every
mount's next stat, ls or cat sees what it did.

A registration left by a mount that died is removed by the first process that finds
nobody listening on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

RUN_DIR = "run"
ANSWER_TIMEOUT = 2.0  # a mount that answers later is logged and not waited for
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
        self._socket.bind(_address(self.token))
        self._socket.listen(64)
        os.makedirs(run_dir(store_root), mode=0o755, exist_ok=True)
        with open(self._registration, "x"):
            pass

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._registration)
        self._socket.close()

    async def serve(self, domain_changed: Callable[[str], Awaitable[None]]) -> None:
        """Answer each message once domain_changed(name) has returned."""
        listener = trio.socket.from_stdlib_socket(self._socket)
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(self._answer, connection, domain_changed)

    @staticmethod
    async def _answer(connection: trio.socket.SocketType, domain_changed: Callable[[str], Awaitable[None]]) -> None:
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


async def tell_mounts(store_root: str, domain: str, exclude: str | None = None) -> None:
    """Tell every registered mount (but `exclude`) that `domain` changed; wait for each
    answer unless DO_NOT_WAIT is set."""
    try:
        tokens = os.listdir(run_dir(store_root))
    except FileNotFoundError:
        return
    wait = not DO_NOT_WAIT.get()
    for token in tokens:
        if token != exclude and "." not in token:
            await _tell(store_root, token, domain, wait)


async def _tell(store_root: str, token: str, domain: str, wait: bool) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                await sock.connect(_address(token))
                await sock.send(domain.encode("utf-8") + b"\n")
                if wait:
                    await _read_line(sock)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(os.path.join(run_dir(store_root), token))  # its mount is gone
        except (OSError, trio.TooSlowError) as exc:
            log.warning("mount %s did not confirm that it dropped its caches for %s: %s", token, domain, exc)


async def _read_line(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await sock.recv(MAX_MESSAGE)
        if not chunk or len(data) > MAX_MESSAGE:
            raise ConnectionResetError("the message ended early")
        data += chunk
    return data[:-1]
