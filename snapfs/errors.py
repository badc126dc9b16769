"""The one exception type of snapfs: an errno and a sentence."""

from __future__ import annotations

import errno as _errno


class SnapfsError(OSError):
    """A refused or failed operation: `errno` for the filesystem, `message` for people."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)  # an OSError: errno and strerror set
        self.errno = err
        self.message = message

    def __str__(self) -> str:
        return self.message


class DependentsError(SnapfsError):
    """A discard refused because other snapshots or the live disk depend on the snapshot.

    The filesystem answers ENOTEMPTY for rmdir and EBUSY for a control write.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EBUSY, message)


def invalid(message: str) -> SnapfsError:
    return SnapfsError(_errno.EINVAL, message)


def not_found(message: str) -> SnapfsError:
    return SnapfsError(_errno.ENOENT, message)


def exists(message: str) -> SnapfsError:
    return SnapfsError(_errno.EEXIST, message)


def busy(message: str) -> SnapfsError:
    return SnapfsError(_errno.EBUSY, message)


def io_error(message: str) -> SnapfsError:
    return SnapfsError(_errno.EIO, message)
