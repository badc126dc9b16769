"""The qemu-img engine: carries out the file steps that domain.py plans.

Each step is safe to run again after a crash part-way through it (the journal re-runs
the step that was in progress). New files are built under a temporary name, checked,
fsynced and renamed into place, so a path that anything depends on is never half-made.
A second engine (QMP, for running VMs) is meant to offer the same verbs.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio

from . import qemu
from .errors import io_error
from .store import DirSyncs, fsync_file, sync_dir_of, unlink_if_present


async def _in_thread(fn, *args) -> None:
    await trio.to_thread.run_sync(fn, *args)


def _install_now(tmp: str, dst: str, syncs: DirSyncs | None) -> None:
    fsync_file(tmp)
    os.rename(tmp, dst)
    sync_dir_of(dst, syncs)


async def _install(tmp: str, dst: str, syncs: DirSyncs | None = None) -> None:
    """fsync tmp, rename it over dst, fsync the directory (now, or at syncs.flush())."""
    await _in_thread(_install_now, tmp, dst, syncs)


def _move(src: str, dst: str, syncs: DirSyncs | None) -> None:
    if os.path.exists(src):
        _install_now(src, dst, syncs)
    elif not os.path.exists(dst):
        raise io_error(f"Layer {src} is missing, so it cannot be moved to {dst}.")


async def _replace_checked(layer: str, suffix: str, build: Callable[[str], Awaitable[None]], verb: str) -> None:
    """Build a new version of `layer` beside it, prove with qemu-img compare that it reads
    the same, then rename it over the layer; on any failure the layer is left as it was."""
    tmp = layer + suffix
    await _in_thread(unlink_if_present, tmp)
    try:
        await build(tmp)
        if not await qemu.same_content(tmp, layer):
            raise io_error(f"{verb} {layer} changed its content; the layer was left as it was.")
    except BaseException:
        with trio.CancelScope(shield=True):
            await _in_thread(unlink_if_present, tmp)
        raise
    await _install(tmp, layer)


class QemuImgEngine:
    """Every step method may be given a DirSyncs: the directory fsync that makes its
    rename or unlink durable is then left to the caller's next syncs.flush()."""

    async def overlay(self, dst: str, backing: str, backing_fmt: str, size: int, syncs: DirSyncs | None = None) -> None:
        """An empty overlay at dst on `backing`, replacing whatever dst was."""
        tmp = dst + ".new"
        await _in_thread(unlink_if_present, tmp)
        await qemu.create_overlay(tmp, backing, backing_fmt, size)
        await _install(tmp, dst, syncs)

    async def rename(self, src: str, dst: str, syncs: DirSyncs | None = None) -> None:
        await _in_thread(_move, src, dst, syncs)

    async def commit(self, top: str, into: str, repair_first: bool = False) -> None:
        """Write top's clusters into its backing file `into` (top is left as it was).

        A commit interrupted by a crash is completed by running it again; the crash
        may have left the dirty flag set, which `qemu-img check -r all` clears.
        """
        if repair_first:
            for path in (into, top):
                if await qemu.is_dirty(path):
                    await qemu.check_and_repair(path)
        await qemu.commit_into_backing(top)
        await _in_thread(fsync_file, into)

    async def rebase(self, layer: str, backing: str, backing_fmt: str) -> None:
        """Move `layer` onto `backing`, keeping its content: a safe rebase of a copy,
        checked with qemu-img compare, then renamed over the original. An in-place
        rebase killed midway can leave the layer on the new backing without its data."""
        if await qemu.backing_file(layer) == backing:
            return

        async def build(tmp: str) -> None:
            await trio.run_process(["cp", "--reflink=auto", "--sparse=always", layer, tmp])
            await qemu.rebase_safe(tmp, backing, backing_fmt)

        await _replace_checked(layer, ".rebase", build, "Rebasing")

    async def recompress(self, layer: str, compression: str, backing: str, backing_fmt: str) -> None:
        """Rewrite the frozen `layer` compressed with zlib/zstd (or not), content unchanged."""

        async def build(tmp: str) -> None:
            await qemu.convert_layer(layer, tmp, backing, backing_fmt, compression)

        await _replace_checked(layer, ".compress", build, "Recompressing")

    async def delete(self, path: str, syncs: DirSyncs | None = None) -> None:
        await _in_thread(_delete, path, syncs)


def _delete(path: str, syncs: DirSyncs | None) -> None:
    unlink_if_present(path)
    sync_dir_of(path, syncs)
