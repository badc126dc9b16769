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


class CorruptError(SnapfsError, ValueError):
    """A metadata file that cannot be read as what it should be (EUCLEAN). Also a
    ValueError, so a reader that already treats an unreadable file as "being replaced"
    keeps doing so."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            _errno.EUCLEAN,
            f"{path} is corrupt ({detail}); restore it from a backup, or remove the domain's directory "
            "and define the domain again.",
        )
        self.path = path


def no_space(message: str) -> SnapfsError:
    return SnapfsError(_errno.ENOSPC, message)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or [exc] itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def single(exc: BaseException) -> BaseException:
    """The one exception a group stands for (trio wraps errors of a nursery in groups):
    a KeyboardInterrupt if there is one, else the first SnapfsError, else the first other
    exception that is not a cancellation, else the first leaf (a cancellation)."""
    found = leaves(exc)
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    import trio  # errors.py is imported by everything; trio only when a group is seen

    for kind in (KeyboardInterrupt, SnapfsError):
        for leaf in found:
            if isinstance(leaf, kind):
                return leaf
    for leaf in found:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return found[0] if found else exc
