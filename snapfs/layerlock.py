"""Layer files opened safely, checked along their backing chains, and held the way QEMU
holds an image it writes.

Every layer is opened O_NOFOLLOW | O_NONBLOCK and must be a regular file: a symlink
planted in place of a layer (it would lead a merge to write outside the store) is refused
with ELOOP, a FIFO or a device (opening or reading one can wait forever) with EINVAL, each
with a sentence, before any qemu-img runs on it. A backing chain is read from the qcow2
headers themselves (microseconds, no process, nothing opened but regular files): in-store
links are bare names of layers beside it, and the only file outside the store a chain may
reach is the disk's recorded base image, which must not have a backing file or an external
data file of its own.

QEMU's image locking (block/file-posix.c): an open image holding permission bit i takes an
OFD read lock on byte 100 + i, refusing to share it on byte 200 + i, and finds a conflict
by testing for a write lock. Bit 0 is CONSISTENT_READ, bit 1 is WRITE. A layer an
operation writes or replaces is held with bytes 100, 101 and 201 (a writer and a reader
that wants a stable image are both refused), a layer it deletes with 100 and 201 (writers
refused); the hold lasts from the in-use check until the operation's journal is cleared,
so a QEMU or qemu-io that opens one meanwhile is refused instead of writing into a file
about to be replaced. The held descriptors keep the old inode locked after a rename too.
snapfs's own qemu-img runs on held files pass file.locking=off (writes) or -U (reads).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from .errors import SnapfsError

QCOW2_MAGIC = b"QFI\xfb"
_INCOMPAT_DATA_FILE = 1 << 2  # the image's data lives in another file (qcow2 "data-file")
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # json:{...}, nbd:, http:, file:...
MAX_CHAIN = 4096

# QEMU's lock bytes (see the module docstring).
READ, WRITE = 0, 1
_HOLD_BYTES = {"write": (100 + READ, 100 + WRITE, 200 + WRITE), "read": (100 + READ, 200 + WRITE)}
_CONFLICT_BYTES = (100 + WRITE, 200 + WRITE)  # another process writes it, or forbids writing it
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"


# ---- opening a layer ----------------------------------------------------------------------
def open_regular(path: str, follow: bool = False, _hops: int = 1) -> int:
    """A read-only descriptor of `path`, which must be a regular file: opened without
    blocking, so a FIFO is refused instead of waited on. Unless `follow`, a symlink is
    followed only to a regular file beside it (a bare name: the live layer's stable path
    may be one while a QEMU runs, DESIGN section 8), never out of its directory."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        target = os.readlink(path)
        if not _hops or "/" in target or target in (".", "..") or not target:
            raise SnapfsError(
                errno.ELOOP,
                f"{path} is a symbolic link to {target[:200]}; snapfs uses only regular files in the store as layers.",
            ) from None
        return open_regular(os.path.join(os.path.dirname(path), target), _hops=0)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SnapfsError(
            errno.EINVAL,
            f"{path} is not a regular file (it is a {_kind(mode)}); snapfs reads and writes only regular image files.",
        )
    return fd


def check_file(path: str, follow: bool = False) -> None:
    """open_regular's refusals for `path`, if it exists."""
    try:
        os.close(open_regular(path, follow))
    except FileNotFoundError:
        pass


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"


# ---- the qcow2 header ---------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    backing: str | None  # the backing link as written in the header
    backing_format: str | None  # as recorded (-F); None: qemu would probe it
    data_file: bool  # an external data file holds the image's data


_BACKING_FORMAT_EXTENSION = 0xE2792ACA


def read_header(fd: int) -> Header | None:
    """The backing link and format and the external-data-file flag of a qcow2 image
    (its header and header extensions), None if it is not qcow2."""
    head = os.pread(fd, 4096, 0)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return None
    version, offset, size = struct.unpack(">IQI", head[4:20])
    incompatible, length = 0, 72
    if version >= 3 and len(head) >= 104:
        incompatible = struct.unpack(">Q", head[72:80])[0]
        length = struct.unpack(">I", head[100:104])[0]
    backing = os.pread(fd, min(size, 4096), offset).decode("utf-8", "replace") if offset and size else None
    return Header(backing, _backing_format(head, length), bool(incompatible & _INCOMPAT_DATA_FILE))


def header_backing(path: str, follow: bool = False) -> str | None:
    """The backing link in a qcow2 layer's header (no process, no lock: the header is read)."""
    fd = open_regular(path, follow=follow)
    try:
        header = read_header(fd)
    finally:
        os.close(fd)
    return header.backing if header else None


def _backing_format(head: bytes, position: int) -> str | None:
    while position + 8 <= len(head):
        kind, length = struct.unpack(">II", head[position : position + 8])
        if kind == 0:
            return None
        if kind == _BACKING_FORMAT_EXTENSION:
            return head[position + 8 : position + 8 + length].decode("ascii", "replace")
        position += 8 + (length + 7) // 8 * 8
    return None


def refuse_foreign_link(path: str, header: Header) -> None:
    """A json: or protocol backing, or an external data file, is never followed."""
    if header.data_file:
        raise SnapfsError(
            errno.EINVAL, f"{path} keeps its data in an external data file; snapfs never follows one (backing refused)."
        )
    if header.backing is not None and (_PROTOCOL.match(header.backing) or "\0" in header.backing):
        raise SnapfsError(
            errno.EINVAL,
            f"{path} has the backing {header.backing[:200]!r}, a json: or protocol backing; snapfs never follows one.",
        )


def base_backing(path: str, fmt: str) -> str | None:
    """The backing file a base image names itself (None for raw, or a qcow2 without one);
    refuses json:/protocol backings and external data files. Reads the header only."""
    fd = open_regular(path, follow=True)
    try:
        header = read_header(fd) if fmt == "qcow2" else None
    finally:
        os.close(fd)
    if header is None:
        return None
    refuse_foreign_link(path, header)
    return header.backing


# ---- a chain ---------------------------------------------------------------------------------
def check_chain(top: str, bases: Collection[str] | None = None, seen: set[str] | None = None) -> list[tuple[str, str]]:
    """(file, format) of the chain under the layer `top`, top first, each checked before
    any qemu-img opens it: layers are regular files (no symlink, FIFO, device) linked by
    bare names within their directory; the chain leaves the store only for a base image
    (one of `bases` when given): a regular file, which if qcow2 has no backing file or
    data file of its own. A member that does not exist ends the walk (qemu-img will say
    it is missing). Reads headers only, as qemu will: by the formats the headers record.
    `seen`: files checked already (with their chains), where the walk may stop; it gains
    the files of this chain."""
    chain: list[tuple[str, str]] = []
    path, fmt, in_store = top, "qcow2", True
    while len(chain) < MAX_CHAIN:
        if seen is not None:
            if path in seen:
                return chain
            seen.add(path)
        try:
            fd = open_regular(path, follow=not in_store)
        except FileNotFoundError:
            return chain
        try:
            header = read_header(fd) if fmt == "qcow2" else None
        finally:
            os.close(fd)
        chain.append((path, fmt))
        if header is None:
            return chain
        refuse_foreign_link(path, header)
        if header.backing is None:
            return chain
        if not in_store:
            raise SnapfsError(
                errno.EINVAL,
                f"Base image {path} has its own backing file {header.backing!r}; snapfs reads no file "
                "outside the store that the domain's definition does not name.",
            )
        path, in_store = _next_member(path, header.backing, bases)
        fmt = header.backing_format or ("qcow2" if in_store else "raw")
    raise SnapfsError(errno.ELOOP, f"The backing chain of {top} does not end.")


def _next_member(layer: str, backing: str, bases: Collection[str] | None) -> tuple[str, bool]:
    if os.path.isabs(backing):
        if bases is not None and backing not in bases:
            raise SnapfsError(
                errno.EINVAL,
                f"Layer {layer} has the backing file {backing}, which is not the domain's base image; refused.",
            )
        return backing, False
    if "/" in backing or backing in (".", ".."):
        raise SnapfsError(
            errno.EINVAL, f"Layer {layer} has the backing file {backing!r}, which is not a layer beside it; refused."
        )
    return os.path.join(os.path.dirname(layer), backing), True


# ---- holding layers ------------------------------------------------------------------------
class HeldLayers:
    """Layers held with QEMU's locks until close() (a context manager)."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> HeldLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hold(paths: Mapping[str, str], describe: Callable[[str], str] = str) -> HeldLayers:
    """Hold each existing layer (path -> "write" or "read", see the module docstring) the
    way QEMU holds an image, then refuse (EBUSY) if another process holds one: writes it,
    or forbids writing it (a running QEMU, qemu-nbd, an open snapshot disk). Locks are
    taken first and tested after, so of two that start together neither goes on.
    describe(path) names a layer for the user ("disk vda of snapshot 's1'")."""
    held = HeldLayers()
    seen: set[tuple[int, int]] = set()
    try:
        for path, mode in paths.items():
            try:
                fd = open_regular(path)
            except FileNotFoundError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:  # two names of one file: one description holds it
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            held._fds.append(fd)
            for byte in _HOLD_BYTES[mode]:
                fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
            if any(write_lock_held(fd, byte) for byte in _CONFLICT_BYTES):
                name = describe(path)
                raise SnapfsError(
                    errno.EBUSY,
                    f"{name[:1].upper()}{name[1:]} is in use by another process (a running QEMU, qemu-nbd, "
                    "or an open snapshot disk image); try again when it is closed.",
                )
    except BaseException:
        held.close()
        raise
    return held


def write_lock_held(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on `byte` that a write lock
    would conflict with (our own description's locks never count)."""
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    return struct.unpack(_FLOCK, fcntl.fcntl(fd, F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK


def hold_read_locks(fd: int, path: str) -> None:
    """Take the locks a QEMU reader takes (consistent read, and no writer allowed) on an
    open image, so qemu-img, qemu and snapfs's own in-use check see it as in use; refuse
    (EBUSY) if a writer (an operation in progress, a running QEMU) holds it."""
    for byte in _HOLD_BYTES["read"]:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    if write_lock_held(fd, 100 + WRITE):
        raise SnapfsError(errno.EBUSY, f"{path} is being written by another process; try again when it is done.")


def in_use(paths: Iterable[str]) -> str | None:
    """The first of `paths` another process writes or forbids writing, or None."""
    for path in dict.fromkeys(paths):
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            continue
        try:
            if any(write_lock_held(fd, byte) for byte in _CONFLICT_BYTES):
                return path
        finally:
            os.close(fd)
    return None
