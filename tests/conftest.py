"""Shared fixtures: a temporary store, a two-disk domain (vda on a qcow2 base, vdb on a
raw base, 4 MiB, 64 KiB clusters) and the base images' checksums.

Every fixture makes real images with qemu-img; nothing here mocks qemu.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from helpers import CLUSTER, DISK_SIZE, MiB, expected_content, file_digest, make_image, write_pattern

import snapfs

DOMAIN_NAME = "vm1"
DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"

# What the base images hold before anything else: {target: {offset: pattern}}.
BASE_WRITES = {
    "vda": {0: 0xA1, 1 * MiB: 0xA2, 3 * MiB: 0xA3},
    "vdb": {0: 0xB1, 2 * MiB: 0xB2, 3 * MiB + CLUSTER: 0xB3},
}


@dataclass
class BaseImage:
    target: str
    path: str
    format: str
    content: bytes  # the whole image as raw bytes


def _make_base(directory: str, target: str, fmt: str) -> BaseImage:
    path = make_image(os.path.join(directory, f"base-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}"), fmt)
    for offset, pattern in BASE_WRITES[target].items():
        write_pattern(path, pattern, offset, fmt=fmt)
    return BaseImage(target, path, fmt, expected_content(BASE_WRITES[target], DISK_SIZE))


@pytest.fixture
def base_images(tmp_path) -> dict[str, BaseImage]:
    """vda: a qcow2 base, vdb: a raw base, each with a few clusters of data."""
    directory = tmp_path / "images"
    directory.mkdir()
    return {"vda": _make_base(str(directory), "vda", "qcow2"), "vdb": _make_base(str(directory), "vdb", "raw")}


@pytest.fixture
def base_digests(base_images) -> dict[str, str]:
    """sha256 of each base image file as made; tests compare against it after every step."""
    return {b.path: file_digest(b.path) for b in base_images.values()}


@pytest.fixture
def store_path(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def store(store_path) -> snapfs.Store:
    return snapfs.open_store(store_path, create=True)


def domain_xml(name: str, uuid: str, images: dict[str, BaseImage]) -> str:
    """A libvirt-style domain definition with the two disks, plus a cdrom (left out)."""
    disks = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{b.format}'/>
      <source file='{b.path}'/>
      <target dev='{b.target}' bus='virtio'/>
    </disk>"""
        for b in images.values()
    )
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>{disks}
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
  </devices>
</domain>
"""


@pytest.fixture
def domain(store, base_images, base_digests) -> snapfs.Domain:
    """Domain vm1 with two disks, defined from libvirt XML; checks at teardown that the
    base images were never written."""
    dom = store.define_xml(domain_xml(DOMAIN_NAME, DOMAIN_UUID, base_images))
    yield dom
    for path, digest in base_digests.items():
        assert file_digest(path) == digest, f"base image {path} changed"
