"""Reads the test guest's sequence counter out of any image (qcow2 with its backing chain, or raw).

Block N of each disk holds ``SNAPFSCTR <boot tag> <disk> <N>``; a never-written block is zeros.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from .build import MAGIC

BLOCK = 512
_ZERO = bytes(BLOCK)


class Record(NamedTuple):
    tag: str
    disk: str
    n: int


class Garbage(NamedTuple):
    """A non-zero block that is not a counter record."""

    data: bytes


def read_counter(image: str | Path, limit: int | None = None) -> list[Record | Garbage | None]:
    """Every block (of the first `limit` bytes) up to the last non-zero one: a Record, Garbage,
    or None for zeros. Works on an image a running QEMU holds (`qemu-img convert -U`)."""
    with tempfile.TemporaryDirectory(prefix="snapfs-counter-") as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        with raw.open("rb") as f:
            data = f.read() if limit is None else f.read(limit)
    return parse_blocks(data)


def parse_blocks(data: bytes) -> list[Record | Garbage | None]:
    end = len(data.rstrip(b"\0"))
    view = memoryview(data)
    return [_parse(bytes(view[off : off + BLOCK])) for off in range(0, end, BLOCK)]


def _parse(block: bytes) -> Record | Garbage | None:
    if block == _ZERO:
        return None
    fields = block.rstrip(b"\0").decode("ascii", "replace").split()
    if len(fields) == 4 and fields[0] == MAGIC and fields[3].isdigit():
        return Record(fields[1], fields[2], int(fields[3]))
    return Garbage(block)


def pairs(blocks: list[Record | Garbage | None]) -> list[tuple[str, int] | None]:
    """The (boot_tag, N) of each block, None where a block is not a record."""
    return [(b.tag, b.n) if isinstance(b, Record) else None for b in blocks]


class Counter(NamedTuple):
    tag: str
    last: int


def check_consistent(blocks: list[Record | Garbage | None], disk: str | None = None) -> Counter:
    """Crash-consistent: blocks hold exactly 0..N in order, one boot tag (and disk), nothing after.

    Returns (tag, N); raises AssertionError saying where the sequence breaks."""
    assert blocks, "the image holds no counter block"
    first = blocks[0]
    assert isinstance(first, Record), f"block 0 is {first!r}, not a counter record"
    for i, block in enumerate(blocks):
        want = Record(first.tag, disk or first.disk, i)
        assert block == want, f"block {i} is {block!r}, expected {want!r}"
    return Counter(first.tag, len(blocks) - 1)
