"""Async wrappers over qemu-img: the only module that runs it, or knows qemu's lock bytes.

Every call goes through `trio.run_process`, so a long commit never blocks the event loop.
Failures become `SnapfsError`: qemu's image lock -> EBUSY, anything else -> EIO, each
carrying qemu's own message.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import signal
import struct
import subprocess
from collections.abc import Callable, Iterable

import trio

from .durable import unlink_if_present
from .errors import SnapfsError, single

QEMU_IMG = os.environ.get("SNAPFS_QEMU_IMG", "qemu-img")
LOCK_ERRORS = ('Failed to get "write" lock', 'Failed to get shared "write" lock')
_ENV = {**os.environ, "LC_ALL": "C"}


def _qemu_message(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    return " ".join(line for line in lines if line) or "no message"


def _error_for(what: str, stderr: bytes) -> SnapfsError:
    message = _qemu_message(stderr)
    if any(text in message for text in LOCK_ERRORS):
        return SnapfsError(errno.EBUSY, f"{what}: the image is in use by another process (qemu: {message})")
    return SnapfsError(errno.EIO, f"{what} failed (qemu: {message})")


# A progress callback, given to a long commit, rebase or conversion, is called with
# qemu-img's percentage (0-100) as it goes.
Progress = Callable[[float], None]
_PROGRESS_VERBS = ("commit", "rebase", "convert")
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that spawned it ends, so no
    qemu-img keeps writing a layer for a snapfs that was killed. The parent is the
    *thread*: children are spawned from the trio thread (_Child), never from one of trio's
    worker threads, which end after 10 s idle."""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _failed(what: str, stderr: bytes) -> SnapfsError:
    """qemu's failure as a SnapfsError; a full filesystem keeps its errno (ENOSPC)."""
    error = _error_for(what, stderr)
    if error.errno == errno.EIO and "No space left on device" in error.message:
        error.errno = errno.ENOSPC
    return error


class _Child:
    """A child process spawned from the trio thread (a fork and an exec: milliseconds),
    its output pipes as trio streams, waited for through a pidfd. Killed and reaped if the
    caller is cancelled or fails."""

    def __init__(self, argv: list[str], what: str) -> None:
        _libc()  # loaded here, not in the forked child
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_ENV,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError as exc:
            raise SnapfsError(errno.EIO, f"{what} failed: {argv[0]} is not installed") from exc
        self.stdout = self._stream(self.popen.stdout)
        self.stderr = self._stream(self.popen.stderr)

    @staticmethod
    def _stream(pipe) -> trio.lowlevel.FdStream:
        fd = os.dup(pipe.fileno())
        pipe.close()
        return trio.lowlevel.FdStream(fd)

    async def wait(self) -> int:
        pidfd = os.pidfd_open(self.popen.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return self.popen.wait()

    async def run(self, on_stdout: Callable[[bytes], None], on_stderr: Callable[[bytes], None]) -> int:
        """Feed its output to the callbacks until it ends; its exit status."""

        async def pump(stream: trio.lowlevel.FdStream, feed: Callable[[bytes], None]) -> None:
            async with stream:
                while chunk := await stream.receive_some(1 << 16):
                    feed(chunk)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, self.stdout, on_stdout)
                nursery.start_soon(pump, self.stderr, on_stderr)
            return await self.wait()
        except BaseException as caught:
            self.popen.kill()
            with trio.CancelScope(shield=True):
                await self.wait()
            if isinstance(caught, BaseExceptionGroup):
                raise single(caught)  # noqa: B904  (the leaf keeps its own traceback)
            raise


async def _run(
    program: str, args: list[str], what: str, ok: tuple[int, ...] = (0,), report: Progress | None = None
) -> tuple[int, bytes]:
    if report is not None and program == QEMU_IMG and args[0] in _PROGRESS_VERBS:
        return await _run_reporting(program, [args[0], "-p", *(a for a in args[1:] if a != "-q")], what, ok, report)
    out, err = bytearray(), bytearray()
    code = await _Child([program, *args], what).run(out.extend, err.extend)
    if code not in ok:
        raise _failed(what, bytes(err))
    return code, bytes(out)


async def _run_reporting(
    program: str, args: list[str], what: str, ok: tuple[int, ...], report: Callable[[float], None]
) -> tuple[int, bytes]:
    """Run qemu-img -p, passing each percentage it prints to `report`."""
    errors = bytearray()
    pending = [b""]

    def read_progress(chunk: bytes) -> None:
        *lines, pending[0] = re.split(rb"[\r\n]", pending[0] + chunk)
        for match in (_PERCENT.search(line) for line in lines):
            if match:
                report(float(match.group(1)))

    code = await _Child([program, *args], what).run(read_progress, errors.extend)
    if code not in ok:
        raise _failed(what, bytes(errors))
    return code, b""


async def qemu_img(
    args: list[str], what: str, ok: tuple[int, ...] = (0,), progress: Progress | None = None
) -> tuple[int, bytes]:
    return await _run(QEMU_IMG, args, what, ok, progress)


async def info(path: str, fmt: str | None = None) -> dict:
    """`qemu-img info` of one image (no chain)."""
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    _, out = await qemu_img([*args, path], f"reading {path}")
    return json.loads(out)


async def probe_format(path: str) -> str:
    """The format qemu-img sees; called once, at define time."""
    return (await info(path))["format"]


async def virtual_size(path: str, fmt: str) -> int:
    return int((await info(path, fmt))["virtual-size"])


async def create_overlay(path: str, backing: str, backing_fmt: str, size: int) -> None:
    """An empty qcow2 on `backing`. With -u and the size given, the chain is not opened."""
    await qemu_img(
        ["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt, path, str(size)],
        f"creating {path}",
    )


async def commit_into_backing(top: str, progress: Progress | None = None) -> None:
    """Write top's clusters into its backing file; top is left as it was (-d)."""
    await qemu_img(
        ["commit", "-q", "-f", "qcow2", "-d", top], f"merging {top} into its backing file", progress=progress
    )


async def rebase_safe(path: str, backing: str, backing_fmt: str, progress: Progress | None = None) -> None:
    """Safe-mode rebase: copies into `path` whatever differs, so its content is unchanged."""
    await qemu_img(
        ["rebase", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path], f"rebasing {path}", progress=progress
    )


async def same_content(a: str, b: str) -> bool:
    """Whether two images (each with its backing chain) read the same; qcow2 both."""
    code, _ = await qemu_img(
        ["compare", "-q", "-f", "qcow2", "-F", "qcow2", a, b], f"comparing {a} with {b}", ok=(0, 1)
    )
    return code == 0


async def convert_layer(
    src: str, dst: str, backing: str, backing_fmt: str, compression: str, progress: Progress | None = None
) -> None:
    """Rewrite the top layer `src` as `dst` on the same backing, compressed or not.

    Only clusters allocated in `src` itself are written (-B keeps the backing).
    """
    args = ["convert", "-q", "-t", "writeback", "-f", "qcow2", "-O", "qcow2"]
    if compression != "none":
        args += ["-c", "-o", f"compression_type={'zlib' if compression == 'gzip' else compression}"]
    args += ["-B", backing, "-F", backing_fmt, src, dst]
    try:
        await qemu_img(args, f"recompressing {src}", progress=progress)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(unlink_if_present, dst)
        raise


async def check_and_repair(path: str) -> None:
    """`qemu-img check -r all`: clears a dirty flag left by a crash during a commit."""
    await qemu_img(["check", "-q", "-r", "all", "-f", "qcow2", path], f"repairing {path}", ok=(0, 1, 3))


async def is_dirty(path: str) -> bool:
    data = await info(path, "qcow2")
    # qemu-img 7.2 reports it at the top level; older ones under format-specific data
    nested = data.get("format-specific", {}).get("data", {}).get("dirty-flag")
    return bool(data.get("dirty-flag", nested))


async def backing_file(path: str) -> str | None:
    """The backing link as written in the header (not resolved)."""
    return (await info(path, "qcow2")).get("backing-filename")


# QEMU's image locking (block/file-posix.c): a user holding permission bit i locks byte
# 100 + i, a user refusing to share it locks byte 200 + i, with OFD locks. Bit 1 is WRITE.
_QEMU_WRITE_LOCK_BYTES = (101, 201)
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"


def refuse_if_in_use(paths: Iterable[str]) -> None:
    """EBUSY if another process (a running QEMU, qemu-nbd, a qemu-img reader) writes one
    of the images (those that exist) or forbids writing it, read off QEMU's own lock
    bytes without opening the image: the same test qemu-img's "Failed to get "write"
    lock" comes from, in microseconds instead of a process start. A reader that merely
    uses the image as a backing file forbids writing it too, so it is seen."""
    for path in dict.fromkeys(paths):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            held = any(_write_lock_held(fd, byte) for byte in _QEMU_WRITE_LOCK_BYTES)
        finally:
            os.close(fd)
        if held:
            raise SnapfsError(
                errno.EBUSY,
                f"{path} is in use by another process (a running QEMU, qemu-nbd, or an open snapshot disk image).",
            )


def _write_lock_held(fd: int, byte: int) -> bool:
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    return struct.unpack(_FLOCK, fcntl.fcntl(fd, _F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK


async def top_layer_has_data(path: str) -> bool:
    """Whether the image itself (not its backing chain) holds any cluster."""
    _, out = await qemu_img(["map", "--output=json", "-f", "qcow2", path], f"mapping {path}")
    return any(extent["depth"] == 0 and (extent["data"] or extent["zero"]) for extent in json.loads(out))


async def backing_chain(path: str) -> list[tuple[str, str]]:
    """(file, format) of the image and every backing file, top first: the index is
    `depth` in `qemu-img map`."""
    _, out = await qemu_img(["info", "--backing-chain", "--output=json", "-f", "qcow2", path], f"reading {path}")
    return [(os.path.abspath(i["filename"]), i["format"]) for i in json.loads(out)]


async def extent_map(path: str) -> list[dict]:
    """`qemu-img map --output=json` of the image through its whole chain."""
    _, out = await qemu_img(["map", "--output=json", "-f", "qcow2", path], f"mapping {path}")
    return json.loads(out)


async def start_nbd_server(image: str, socket_path: str, pid_file: str) -> int:
    """A read-only qemu-nbd on a unix socket (qemu-nbd --fork returns once it serves). Not
    --persistent: it exits when its one client disconnects, so a killed mount leaves none."""
    await _run(
        "qemu-nbd",
        [
            "--fork",
            "--read-only",
            "-f",
            "qcow2",
            f"--socket={socket_path}",
            f"--pid-file={pid_file}",
            image,
        ],
        f"exporting {image}",
    )
    with open(pid_file) as f:
        return int(f.read().strip())


def hold_read_locks(fd: int, path: str) -> None:
    """Take the locks a QEMU reader takes (consistent read, and no writer allowed) on an
    open image, so qemu-img, qemu and snapfs's own in-use check see it as in use; refuse
    (EBUSY) if a writer (a commit in progress, a running QEMU) holds it."""
    for byte in (100, 201):
        fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    if _write_lock_held(fd, 101):
        raise SnapfsError(errno.EBUSY, f"{path} is being written by another process; try again when it is done.")
