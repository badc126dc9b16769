"""A minimal NBD client over a qemu-nbd export: qemu's own reader, for what snapfs
cannot read straight from a file (compressed clusters).

The server is `qemu-nbd --read-only` on a unix socket in a private directory, started
on demand; only the fixed-newstyle handshake with NBD_OPT_EXPORT_NAME and simple
replies to NBD_CMD_READ are spoken (no structured replies are asked for).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile

import trio

from .errors import io_error
from .qemu import start_nbd_server

_INIT_MAGIC = b"NBDMAGIC"
_OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_EXPORT_NAME = 1
_REQUEST_MAGIC = 0x25609513
_REPLY_MAGIC = 0x67446698
_CMD_READ = 0
_CMD_DISC = 2
_MAX_REQUEST = 32 << 20


def _gone(pid: int) -> bool:
    """Exited (a zombie has closed its files and released its locks too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def _end_process(pid: int, wait: float = 5.0) -> None:
    """SIGTERM qemu-nbd (not our child: it forked) and wait until it is gone, so its
    image locks are released when stop() returns."""
    try:
        os.kill(pid, signal.SIGTERM)
        with trio.move_on_after(wait):
            while not _gone(pid):
                await trio.sleep(0.01)
            return
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class NbdReader:
    """Reads of one image (with its backing chain) through a private qemu-nbd."""

    def __init__(self, image: str) -> None:
        self.image = image
        self._dir = ""
        self._pid = 0
        self._stream: trio.SocketStream | None = None
        self._lock = trio.Lock()
        self._cookie = 0
        self.size = 0

    async def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="snapfs-nbd-")
        socket_path = os.path.join(self._dir, "nbd.sock")
        try:
            self._pid = await start_nbd_server(self.image, socket_path, os.path.join(self._dir, "pid"))
            self._stream = await trio.open_unix_socket(socket_path)
            await self._handshake()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise

    async def _receive(self, count: int) -> bytes:
        assert self._stream is not None
        chunks, needed = [], count
        while needed:
            chunk = await self._stream.receive_some(min(needed, 1 << 20))
            if not chunk:
                raise io_error(f"qemu-nbd for {self.image} closed the connection.")
            chunks.append(chunk)
            needed -= len(chunk)
        return b"".join(chunks)

    async def _handshake(self) -> None:
        assert self._stream is not None
        magic, opts_magic, flags = struct.unpack(">8sQH", await self._receive(18))
        if magic != _INIT_MAGIC or opts_magic != _OPTS_MAGIC or not flags & _FLAG_FIXED_NEWSTYLE:
            raise io_error(f"qemu-nbd for {self.image} does not speak fixed-newstyle NBD.")
        client_flags = _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)
        await self._stream.send_all(struct.pack(">I", client_flags))
        await self._stream.send_all(struct.pack(">QII", _OPTS_MAGIC, _OPT_EXPORT_NAME, 0))
        self.size, _ = struct.unpack(">QH", await self._receive(10))
        if not flags & _FLAG_NO_ZEROES:
            await self._receive(124)

    async def read(self, offset: int, length: int) -> bytes:
        pieces = []
        async with self._lock:
            while length:
                count = min(length, _MAX_REQUEST)
                pieces.append(await self._read_once(offset, count))
                offset += count
                length -= count
        return b"".join(pieces)

    async def _read_once(self, offset: int, length: int) -> bytes:
        assert self._stream is not None
        self._cookie += 1
        await self._stream.send_all(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_READ, self._cookie, offset, length))
        magic, error, cookie = struct.unpack(">IIQ", await self._receive(16))
        if magic != _REPLY_MAGIC or cookie != self._cookie:
            raise io_error(f"qemu-nbd for {self.image} sent a reply snapfs does not understand.")
        if error:
            raise io_error(f"qemu-nbd could not read {length} bytes at {offset} of {self.image} (error {error}).")
        return await self._receive(length)

    async def stop(self) -> None:
        if self._stream is not None:
            try:
                await self._stream.send_all(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            self._stream = None
        if self._pid:
            await _end_process(self._pid)
            self._pid = 0
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
