"""durable.unlink_freeing_later: a deleted layer's name goes at once, its blocks after the
operation (a live merge's release: engines/qmp.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from snapfs import durable

MiB = 1 << 20


def open_to(path: Path) -> list[str]:
    """This process's descriptors open on `path` (deleted or not)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in (str(path), f"{path} (deleted)"):
            found.append(fd)
    return found


def test_name_goes_now_blocks_after_free_unlinked(tmp_path: Path) -> None:
    layer = tmp_path / "layer.qcow2"
    with open(layer, "wb") as f:
        f.write(b"\x5a" * (4 * MiB))
        os.fsync(f.fileno())
    durable.unlink_freeing_later(str(layer))
    assert not layer.exists()
    assert len(open_to(layer)) == 1, "the file is held open until the operation is over"
    durable.free_unlinked()
    deadline = time.monotonic() + 5
    while open_to(layer) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_to(layer) == [], "free_unlinked closes it (its blocks are freed)"


def test_missing_file_and_symlink(tmp_path: Path) -> None:
    durable.unlink_freeing_later(str(tmp_path / "gone"))  # nothing to do, as unlink_if_present
    target = tmp_path / "target"
    target.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(target)
    durable.unlink_freeing_later(str(link))  # the link itself goes, not what it leads to
    assert not os.path.lexists(link) and target.exists()
    durable.free_unlinked()
