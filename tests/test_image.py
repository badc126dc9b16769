"""Snapshot disks as bytes (snapfs/disk.py): reads straight from the layer files, qemu's
own reader for compressed clusters, and the extents a snapshot changed."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time

import pytest
import trio
from helpers import CLUSTER, DISK_SIZE, read_raw, write_pattern, write_zeros

import snapfs
from snapfs import qemu
from snapfs.disk import SnapshotDisk, changed_extents, data_extents


def build_tree(domain: snapfs.Domain) -> dict[str, snapfs.Snapshot]:
    """root <- mid (zlib) <- deep (zstd); root <- branch. Writes cross cluster edges and
    include zero writes, so maps have data, zero, unallocated and compressed extents."""
    live = domain.live_paths()
    snaps = {}
    for t in live:
        write_pattern(live[t], 0x11, CLUSTER // 2, 3 * CLUSTER)
    snaps["root"] = domain.snapshot_create_xml("<domainsnapshot><name>root</name></domainsnapshot>")
    for t in live:
        write_pattern(live[t], 0x22, 5 * CLUSTER, 4 * CLUSTER)
        write_zeros(live[t], CLUSTER, CLUSTER)
    snaps["mid"] = domain.snapshot_create_xml(
        "<domainsnapshot><name>mid</name><compression>gzip</compression></domainsnapshot>"
    )
    for t in live:
        write_pattern(live[t], 0x33, 6 * CLUSTER + 100, 2 * CLUSTER)
        write_pattern(live[t], 0x34, DISK_SIZE - CLUSTER, CLUSTER)
    snaps["deep"] = domain.snapshot_create_xml(
        "<domainsnapshot><name>deep</name><compression>zstd</compression></domainsnapshot>"
    )
    domain.create_with_snapshot(snaps["root"])
    for t in live:
        write_pattern(live[t], 0x44, 2 * CLUSTER, CLUSTER)
    snaps["branch"] = domain.snapshot_create_xml("<domainsnapshot><name>branch</name></domainsnapshot>")
    return snaps


async def read_all(layer: str, ranges: list[tuple[int, int]]) -> tuple[int, bytes, list[bytes], bool]:
    image = await SnapshotDisk.open(layer)
    try:
        whole = await image.read(0, image.size)
        pieces = [await image.read(offset, length) for offset, length in ranges]
        compressed = any(e.data and e.offset is None for e in image.extents)
        return image.size, whole, pieces, compressed
    finally:
        await image.close()


def test_reads_equal_qemu_img_convert(domain):
    snaps = build_tree(domain)
    rng = random.Random(6)
    ranges = [(rng.randrange(DISK_SIZE), rng.randrange(1, 3 * CLUSTER)) for _ in range(40)]
    ranges += [(CLUSTER - 1, 2), (DISK_SIZE - 10, 100), (0, DISK_SIZE)]
    for name, snap in snaps.items():
        for target, layer in snap.layer_paths().items():
            expected = read_raw(layer)
            size, whole, pieces, compressed = trio.run(read_all, layer, ranges)
            assert compressed == (name in ("mid", "deep")), f"{name}: compressed clusters go through qemu-nbd"
            assert size == DISK_SIZE == len(expected)
            assert whole == expected, f"{name}/{target}"
            for (offset, length), piece in zip(ranges, pieces, strict=True):
                assert piece == expected[offset : offset + length], f"{name}/{target} at {offset}+{length}"


def test_changes_applied_to_the_parent_give_the_snapshot(domain, base_images):
    snaps = build_tree(domain)
    for name, snap in snaps.items():
        parent = snap.get_parent()
        for target, layer in snap.layer_paths().items():
            image = base_images[target].content if parent is None else read_raw(parent.layer_paths()[target])
            rebuilt = bytearray(image)
            wanted = read_raw(layer)
            changes = trio.run(changed_extents, layer)
            assert changes, f"{name}/{target} changed something"
            for change in changes:
                start, end = change["start"], change["start"] + change["length"]
                rebuilt[start:end] = bytes(end - start) if change["zero"] else wanted[start:end]
            assert bytes(rebuilt) == wanted, f"{name}/{target}"
            assert all(c["length"] > 0 and c["start"] % 512 == 0 for c in changes)


def test_an_open_image_blocks_a_merge_that_would_rewrite_it(domain):
    snaps = build_tree(domain)
    layer = snaps["deep"].layer_paths()["vda"]
    expected = read_raw(layer)

    async def scenario() -> None:
        image = await SnapshotDisk.open(layer)
        try:
            # merging "mid" rebases/commits into files of deep's chain: refused while open
            with pytest.raises(snapfs.SnapfsError) as refused:
                await trio.to_thread.run_sync(snaps["mid"].deactivate, snapfs.DeactivateFlags.MERGE)
            assert refused.value.errno == errno.EBUSY and "open snapshot disk image" in refused.value.message
            await trio.to_thread.run_sync(snaps["deep"].rename, "deep-renamed")  # metadata only: allowed
            assert await image.read(0, image.size) == expected
        finally:
            await image.close()
        await trio.to_thread.run_sync(snaps["mid"].deactivate, snapfs.DeactivateFlags.MERGE)

    trio.run(scenario)
    assert read_raw(snaps["deep"].layer_paths()["vda"]) == expected

    async def opened_again() -> None:
        """The chain kept from the first open is not reused: the merge changed it. Unmapped
        (as the mount opens a .raw), the map is made at the first read."""
        layer = snaps["deep"].layer_paths()["vda"]
        image = await SnapshotDisk.open(layer, mapped=False)
        try:
            assert image.chain == [path for path, _ in await qemu.backing_chain(layer)]
            assert image.extents is None
            assert await image.read(0, DISK_SIZE) == expected
        finally:
            await image.close()

    trio.run(opened_again)


def test_a_map_of_a_broken_chain_is_one_snapfs_error(tmp_path):
    """A .map runs qemu-img map and info side by side: when both fail (a backing file is
    missing), the caller gets one SnapfsError (a .raw's stat catches it), not a group."""
    top = str(tmp_path / "top.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top, "1M"], check=True
    )
    with pytest.raises(snapfs.SnapfsError):
        trio.run(data_extents, top, {top: "top.qcow2"})


def test_a_hung_qemu_nbd_read_is_bounded_and_the_next_read_starts_a_new_one(domain, monkeypatch):
    """Compressed clusters come through qemu-nbd: one that stops answering (SIGSTOP) makes
    the read fail with EIO and one sentence within the bound, not hang the mount; it is
    ended, and the next read starts a new qemu-nbd and reads the right bytes."""
    from snapfs import disk

    monkeypatch.setattr(disk, "NBD_ANSWER_SECONDS", 1.0)
    layer = build_tree(domain)["mid"].layer_paths()["vda"]
    expected = read_raw(layer)[: 8 * CLUSTER]

    async def scenario() -> None:
        image = await SnapshotDisk.open(layer)
        try:
            assert await image.read(0, 8 * CLUSTER) == expected
            hung = image._nbd._pid
            os.kill(hung, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(snapfs.SnapfsError) as caught:
                await image.read(0, 8 * CLUSTER)
            assert caught.value.errno == errno.EIO and "did not answer within 1 s" in str(caught.value)
            assert time.monotonic() - started < 15  # the bound, plus ending the stopped qemu-nbd
            assert qemu.process_ended(hung)
            assert await image.read(0, 8 * CLUSTER) == expected
            assert image._nbd._pid != hung
        finally:
            await image.close()

    trio.run(scenario)
