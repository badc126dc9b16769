"""Async wrappers over qemu-img: the only module that runs it.

Every child is spawned from the trio thread and waited for without blocking the loop (_Child).
Failures become `SnapfsError`: qemu's image lock -> EBUSY, anything else -> EIO, each
carrying qemu's own message.

The layers an operation changes are held with QEMU's own locks by snapfs itself for the
whole operation (layerlock.py), so the calls on them here open them with
file.locking=off (those that write) or -U (those that only read); a chain is checked by
layerlock.check_chain before qemu-img opens it where a file may not be what it should
(the mount). The mount's calls are bounded in time (MOUNT_QEMU_SECONDS).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator

import trio

from . import layerlock
from .durable import unlink_if_present
from .errors import SnapfsError, single
from .layerlock import hold_read_locks  # noqa: F401  (the mount's disk reader takes it from here)

QEMU_IMG = os.environ.get("SNAPFS_QEMU_IMG", "qemu-img")
MOUNT_QEMU_SECONDS = float(os.environ.get("SNAPFS_MOUNT_QEMU_SECONDS", "60"))
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


def _unlocked(path: str, backing_held: bool = False) -> list[str]:
    """--image-opts for a qcow2 layer that snapfs holds itself (layerlock.hold): qemu-img
    must not take the locks, or it would find snapfs's own. backing_held: its backing file
    (which it must have) is held too."""
    opts = f"driver=qcow2,file.driver=file,file.filename={_opt(path)},file.locking=off"
    return ["--image-opts", opts + (",backing.file.locking=off" if backing_held else "")]


def _opt(value: str) -> str:
    return value.replace(",", ",,")  # qemu's option syntax doubles a comma in a value


async def info(path: str, fmt: str | None = None) -> dict:
    """`qemu-img info` of one image (no chain), without taking its locks (-U)."""
    args = ["info", "-U", "--output=json"]
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
    """Write top's clusters into its backing file; top is left as it was (-d). Both are
    held by snapfs (layerlock.hold) for the operation."""
    await qemu_img(
        ["commit", "-q", "-d", *_unlocked(top, backing_held=True)],
        f"merging {top} into its backing file",
        progress=progress,
    )


async def rebase_safe(path: str, backing: str, backing_fmt: str, progress: Progress | None = None) -> None:
    """Safe-mode rebase: copies into `path` whatever differs, so its content is unchanged."""
    await qemu_img(
        ["rebase", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path], f"rebasing {path}", progress=progress
    )


async def pull_into(path: str, backing: str, backing_fmt: str, progress: Progress | None = None) -> None:
    """Safe-mode rebase *in place* of a layer snapfs holds, onto `backing` (a layer further
    down its own chain, or the base): its backing file's data that `backing` lacks is copied
    into it, then the header names `backing`. -t writethrough: each copied write is flushed
    with the qcow2 metadata that links it before the next, so the header, written after the
    last, never names `backing` before every copy is linked (with the default write-back
    cache the links wait for the close, after the header: a kill there loses the copies).
    The layer is held by snapfs (layerlock.hold); its backing file, only read, is opened
    with QEMU's shared locks (an option on it would turn the image's name into a json:
    one, against which qemu-img cannot resolve the new backing's relative name)."""
    await qemu_img(
        ["rebase", "-q", "-t", "writethrough", "-b", backing, "-F", backing_fmt, *_unlocked(path)],
        f"rebasing {path}",
        progress=progress,
    )


async def repoint_held(path: str, backing: str, backing_fmt: str) -> None:
    """rebase -u of a layer snapfs holds: only the header's backing link changes."""
    await qemu_img(["rebase", "-q", "-u", "-b", backing, "-F", backing_fmt, *_unlocked(path)], f"re-pointing {path}")


async def rebase_unsafe(path: str, backing: str, backing_fmt: str) -> None:
    """Only the header's backing link changes (-u): the caller knows the content stays right."""
    await qemu_img(["rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path], f"re-pointing {path}")


async def same_content_over(a: str, b: str, b_backing: str) -> bool:
    """Whether qcow2 image `a` reads the same as qcow2 image `b` read over the qcow2 layer
    `b_backing` instead of the backing its header names (neither is locked: -U)."""
    opts = "driver=qcow2,file.driver=file,file.filename="
    over = f"{opts}{_opt(b)},backing.driver=qcow2,backing.file.driver=file,backing.file.filename={_opt(b_backing)}"
    code, _ = await qemu_img(
        ["compare", "-q", "-U", "--image-opts", opts + _opt(a), over], f"comparing {a} with {b}", ok=(0, 1)
    )
    return code == 0


async def same_content(a: str, b: str) -> bool:
    """Whether two images (each with its backing chain) read the same; qcow2 both."""
    code, _ = await qemu_img(
        ["compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2", a, b], f"comparing {a} with {b}", ok=(0, 1)
    )
    return code == 0


async def convert_layer(
    src: str, dst: str, backing: str, backing_fmt: str, compression: str, progress: Progress | None = None
) -> None:
    """Rewrite the top layer `src` as `dst` on the same backing, compressed or not.

    Only clusters allocated in `src` itself are written (-B keeps the backing).
    """
    args = ["convert", "-q", "-U", "-t", "writeback", "-f", "qcow2", "-O", "qcow2"]
    if compression != "none":
        args += ["-c", "-o", f"compression_type={'zlib' if compression == 'gzip' else compression}"]
    args += ["-B", backing, "-F", backing_fmt, src, dst]
    try:
        await qemu_img(args, f"recompressing {src}", progress=progress)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(unlink_if_present, dst)
        raise


async def check_and_repair(path: str, backing_held: bool = False) -> None:
    """`qemu-img check -r all`: clears a dirty flag left by a crash during a commit (the
    layer, and its backing when backing_held, are held by snapfs)."""
    await qemu_img(["check", "-q", "-r", "all", *_unlocked(path, backing_held)], f"repairing {path}", ok=(0, 1, 3))


async def repair_leaks(path: str, backing_held: bool = False) -> None:
    """`qemu-img check -r leaks`: frees clusters a commit cut short allocated but never
    linked (harmless to the content, but `check` reports them)."""
    await qemu_img(["check", "-q", "-r", "leaks", *_unlocked(path, backing_held)], f"repairing {path}", ok=(0, 1, 3))


async def is_dirty(path: str) -> bool:
    data = await info(path, "qcow2")
    # qemu-img 7.2 reports it at the top level; older ones under format-specific data
    nested = data.get("format-specific", {}).get("data", {}).get("dirty-flag")
    return bool(data.get("dirty-flag", nested))


async def backing_file(path: str) -> str | None:
    """The backing link as written in the header (not resolved)."""
    return (await info(path, "qcow2")).get("backing-filename")


async def top_layer_has_data(path: str) -> bool:
    """Whether the image itself (not its backing chain) holds any cluster."""
    await trio.to_thread.run_sync(layerlock.check_chain, path)  # map opens the whole chain
    _, out = await qemu_img(["map", "--output=json", "-f", "qcow2", path], f"mapping {path}")
    return any(extent["depth"] == 0 and (extent["data"] or extent["zero"]) for extent in json.loads(out))


async def backing_chain(path: str) -> list[tuple[str, str]]:
    """(file, format) of the layer and every backing file, top first: the index is
    `depth` in `qemu-img map`. Each file is checked (layerlock.check_chain: regular files,
    no symlink out of the store, no json: or protocol backing) before qemu-img opens it,
    and qemu-img is given MOUNT_QEMU_SECONDS."""
    await trio.to_thread.run_sync(layerlock.check_chain, path)
    with _bounded(path):
        _, out = await qemu_img(["info", "--backing-chain", "--output=json", "-f", "qcow2", path], f"reading {path}")
    return [(os.path.abspath(i["filename"]), i["format"]) for i in json.loads(out)]


async def extent_map(path: str) -> list[dict]:
    """`qemu-img map --output=json` of the layer through its whole chain, checked first
    and bounded in time as backing_chain is (the mount's .raw and .changes use it)."""
    await trio.to_thread.run_sync(layerlock.check_chain, path)
    with _bounded(path):
        _, out = await qemu_img(["map", "--output=json", "-f", "qcow2", path], f"mapping {path}")
    return json.loads(out)


@contextlib.contextmanager
def _bounded(path: str) -> Iterator[None]:
    """At most MOUNT_QEMU_SECONDS for a qemu-img run (cancelling kills it); EIO after."""
    with trio.move_on_after(MOUNT_QEMU_SECONDS) as scope:
        yield
    if scope.cancelled_caught:
        raise SnapfsError(errno.EIO, f"qemu-img did not finish reading {path} within {MOUNT_QEMU_SECONDS:.0f} s.")


async def start_nbd_server(image: str, socket_path: str, pid_file: str) -> int:
    """A read-only qemu-nbd on a unix socket (qemu-nbd --fork returns once it serves). Not
    --persistent: it exits when its one client disconnects, so a killed mount leaves none."""
    await trio.to_thread.run_sync(layerlock.check_chain, image)
    with _bounded(image):
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


def process_ended(pid: int) -> bool:
    """Whether process `pid` has ended: gone, or a zombie (which has closed its files and
    released its locks; the sandbox's init may reap late)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return not fields or fields[0] == "Z"
