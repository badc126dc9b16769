"""The one refusal helper, one function per door (DESIGN: every refusal is one sentence with
an errno, and changes nothing):

- the API: `api_refused` (a SnapfsError with an errno and words) and `maybe_refused`;
- the command line: `cli_refused` (non-zero status, one line on stderr, no traceback);
- the mount: `errno_of` (the errno behind a C tool's message) and `os_errno` (a Python
  file call's errno, 0 when it succeeds).

Where a store is given, its files must be the same after the refusal as before.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable

import pytest
from helpers import tree_fingerprint

from snapfs import SnapfsError

Errnos = int | tuple[int, ...]
STRERROR = {os.strerror(code): code for code in errno.errorcode}


def _words_in(line: str, words: tuple[str, ...]) -> None:
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"


# ---- the API -------------------------------------------------------------------------------
def api_refused(
    store: str | None, call: Callable[[], object], errnos: int | tuple[int, ...], *words: str
) -> SnapfsError:
    """call() must raise SnapfsError with one of errnos, a sentence holding every word
    (case-insensitive), and leave the store (when given) as it was."""
    errnos = errnos if isinstance(errnos, tuple) else (errnos,)
    before = tree_fingerprint(store) if store else None
    with pytest.raises(SnapfsError) as info:
        call()
    exc = info.value
    assert exc.errno in errnos, (errno.errorcode.get(exc.errno), str(exc))
    message = str(exc)
    assert len(message) > 10 and "Traceback" not in message
    _words_in(message, words)
    if store:
        assert tree_fingerprint(store) == before, f"a refusal changed the store: {exc}"
    return exc


def maybe_refused(store: str, call: Callable[[], object]) -> SnapfsError | None:
    """call() may succeed (None) or be refused: then with an errno, a message, and the store
    as it was."""
    before = tree_fingerprint(store)
    try:
        call()
    except SnapfsError as exc:
        assert isinstance(exc.errno, int) and exc.message.strip(), exc
        assert tree_fingerprint(store) == before, f"a refusal changed the store: {exc}"
        return exc
    return None


# ---- the command line ----------------------------------------------------------------------
def cli_refused(run: subprocess.CompletedProcess, *words: str, prefix: str = "") -> str:
    """A refused command: non-zero status, no traceback, one line on stderr starting with
    prefix and holding every word (case-insensitive). Returns that line."""
    assert "Traceback" not in run.stderr and "ExceptionGroup" not in run.stderr, run.stderr
    assert run.returncode not in (0, None), f"status {run.returncode}, stdout {run.stdout!r}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one sentence, got {len(lines)} lines:\n{run.stderr}"
    assert lines[0].startswith(prefix), lines[0]
    _words_in(lines[0], words)
    return lines[0]


# ---- the mount -----------------------------------------------------------------------------
def errno_of(stderr: str) -> int:
    """The errno behind a C tool's message ('...: Permission denied')."""
    if "to a subdirectory of itself" in stderr:
        return errno.EINVAL  # how mv words EINVAL from rename(2)
    for line in reversed(stderr.strip().splitlines()):
        for text, code in STRERROR.items():
            if line.rstrip().endswith(text):
                return code
    raise AssertionError(f"no errno in {stderr!r}")


def os_errno(fn: Callable, *args) -> int:
    """fn(*args) through the mount: 0, or the errno of the OSError it raised. A descriptor
    os.open returned is closed (a leak would keep the mount busy)."""
    try:
        result = fn(*args)
    except OSError as exc:
        return exc.errno
    if fn is os.open:
        os.close(result)
    return 0
