"""The one factory for test domains: base images made with the real qemu-img and written
with qemu-io, then a domain defined on them through the public API.

The usual shape is the two-disk domain of DESIGN's examples: vda on a qcow2 base and vdb
on a raw base (4 MiB, 64 KiB clusters). conftest.py, fsfixtures.py and the test files
build their domains with these functions.
"""

from __future__ import annotations

import os

from helpers import DISK_SIZE, make_image, write_pattern

import snapfs

FORMATS = {"vda": "qcow2", "vdb": "raw"}
# What the base images hold unless a test says otherwise: {target: {offset: pattern}}.
SIMPLE_WRITES = {"vda": {0: 0xA1}, "vdb": {0: 0xB1}}

Bases = dict[str, tuple[str, str]]  # target -> (base image path, format)


def make_base(path: str, fmt: str, writes: dict[int, int], size: int = DISK_SIZE) -> str:
    """One base image at path holding {offset: pattern} clusters."""
    make_image(path, fmt, size)
    for offset, pattern in writes.items():
        write_pattern(path, pattern, offset, fmt=fmt)
    return path


def make_bases(
    directory: str,
    writes: dict[str, dict[int, int]] = SIMPLE_WRITES,
    prefix: str = "",
    sizes: dict[str, int] | None = None,
    formats: dict[str, str] = FORMATS,
) -> Bases:
    """One base image per target of `formats` in directory (named <prefix><target>.qcow2 or
    .img), holding writes[target]."""
    os.makedirs(directory, exist_ok=True)
    bases = {}
    for target, fmt in formats.items():
        path = os.path.join(directory, f"{prefix}{target}.{'qcow2' if fmt == 'qcow2' else 'img'}")
        bases[target] = (make_base(path, fmt, writes.get(target, {}), (sizes or {}).get(target, DISK_SIZE)), fmt)
    return bases


def define_domain(store_root: str, name: str, bases: Bases) -> snapfs.Domain:
    """Domain `name` on bases, defined through the API (the store is made if missing)."""
    store = snapfs.open_store(store_root, create=True)
    return store.define(name, [(target, path, fmt) for target, (path, fmt) in bases.items()])


def new_domain(directory: str, name: str = "vm1", store_root: str | None = None, **options) -> snapfs.Domain:
    """The two-disk domain in directory/store (or store_root), its bases in directory/images;
    options go to make_bases."""
    bases = make_bases(os.path.join(directory, "images"), **options)
    return define_domain(store_root or os.path.join(directory, "store"), name, bases)
