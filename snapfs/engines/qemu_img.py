"""The qemu-img engine: the rules' intents as steps on image files no process holds.

Each step is safe to run again after a crash part-way through it (the journal re-runs
the step that was in progress). New files are built under a temporary name, checked,
fsynced and renamed into place, so a path that anything depends on is never half-made.
Its precondition: no other process (a running QEMU, qemu-nbd, an open snapshot disk)
holds a layer a step would write, move or delete.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import struct
from collections.abc import Awaitable, Callable

import trio

from .. import layerlock, qemu
from ..durable import DirSyncs, fsync_file, sync_dir_of, unlink_if_present
from ..errors import io_error
from ..records import LIVE_LINK, DiskRecord, layer_name
from ..store import LINK_SUFFIX, STAGING_SUFFIX, DomainFiles, replace_with_symlink, staged_beside
from . import Progress

# The keys of each step that name a file (relative to the domain directory) the step
# writes, moves or deletes; a "backing" is only read. A file a step only deletes is held
# against writers; the others against readers too (layerlock.hold).
WRITES = {
    "overlay": ("dst", "freeze"),
    "rename": ("src", "dst"),
    "commit": ("top", "into"),
    "rebase": ("layer",),
    "pull": ("layer",),
    "recompress": ("layer",),
    "delete": ("path",),
}
METADATA_STEPS = ("meta_write", "meta_delete", "state")
ONLY_DELETED = ("delete",)
# Steps whose qemu-img opens the whole backing chain (the others open no chain: an overlay
# is made with -u, a rename or a delete opens nothing), so the whole chain is checked first.
OPENS_CHAIN = ("commit", "rebase", "recompress", "pull")
# A one-dependent merge moves the smaller side's data: committing D into L(S) copies D's
# clusters; D pulling S's (an in-place safe rebase, each write flushed) reads S's and its
# parent chain's data there and compares them, several times the cost per byte of a commit
# (bench/bench.py merge). D pulls when its file's allocation is over this many times S's.
PULL_FACTOR = 4


class QemuImgEngine:
    """Every step that renames or unlinks may be given a DirSyncs: the directory fsync
    that makes it durable is then left to the caller's next syncs.flush()."""

    name = "qemu-img"
    temporary_suffixes = (".new", ".rebase", ".compress", LINK_SUFFIX)

    def snapshot_state(self) -> str:
        return "shutoff"

    # ---- intents -> steps -------------------------------------------------------------------
    def steps(self, intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        do = intent["do"]
        if do in METADATA_STEPS:
            return [intent]
        if do == "fold":
            return self._fold(intent, files, disks)
        if do == "freeze":
            return []  # offline, the live layers' real files simply become L(S) (the overlay holds them)
        if do == "new_live":
            return self._new_live(intent, files, disks)
        plan = Layout(files)
        per_disk: dict[str, Callable[[DiskRecord], dict]] = {
            "drop": lambda d: _step("delete", path=plan.layer(d, intent["layers"])),
            "recompress": lambda d: _step(
                "recompress",
                layer=plan.layer(d, intent["layers"]),
                kind=intent["kind"],
                **plan.backing(d, intent["parent"]),
            ),
            "rebase_live": lambda d: _step(
                "rebase", layer=plan.layer(d, intent["layers"]), **plan.backing(d, intent["onto"])
            ),
        }
        if do not in per_disk:
            raise io_error(f"The qemu-img engine has no steps for {do!r}.")
        return [per_disk[do](d) for d in disks]

    @staticmethod
    def _new_live(intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        """Per disk an empty overlay under its new real name, then the stable name retargeted
        to it (link). In a create the overlay also names the layer it freezes, held like A."""
        plan, names = Layout(files), intent["names"]
        steps = []
        for d in disks:
            step = _step("overlay", dst=plan.layer(d, names), **plan.backing(d, intent["backing"]), size=d.size)
            if intent.get("frozen"):
                step["freeze"] = plan.layer(d, intent["backing"])
            steps.append(step)
        return steps + [_step("link", path=plan.live_link(d), target=names[d.target]) for d in disks]

    @staticmethod
    def _fold(intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        plan, deps, into = Layout(files), intent["into"], intent["into_layers"]
        own, parent = intent["layers"], intent["parent_layers"]
        if len(deps) == 1:
            # Per disk, the cheaper way: commit D into L(S), then L(S)'s file takes D's real
            # name; or D pulls S's data and sits on S's parent, and L(S) goes. Either way D's
            # children (or the live layer's stable name) keep their links.
            dep = into[deps[0]]
            pulls = {d.target for d in disks if _cheaper_to_pull(files, plan.layer(d, own), plan.layer(d, dep))}
            commits = [d for d in disks if d.target not in pulls]
            pullers = [d for d in disks if d.target in pulls]
            steps = [_step("commit", top=plan.layer(d, dep), into=plan.layer(d, own)) for d in commits]
            steps += [_pull(plan, d, dep, own, parent) for d in pullers]
            steps += [_step("rename", src=plan.layer(d, own), dst=plan.layer(d, dep)) for d in commits]
            return steps + [_step("delete", path=plan.layer(d, own)) for d in pullers]
        # Two or more dependents: each is rebased (safe, on a copy) onto S's parent.
        steps = [
            _step("rebase", layer=plan.layer(d, into[dep]), **plan.backing(d, parent)) for dep in deps for d in disks
        ]
        return steps + [_step("delete", path=plan.layer(d, own)) for d in disks]

    # ---- the precondition --------------------------------------------------------------------
    def hold_layers(self, files: DomainFiles, steps: list[dict]) -> layerlock.HeldLayers:
        """Check every layer the steps name and the chains under them (regular files
        inside the store, no json: or protocol backing: ELOOP/EINVAL), then hold those the
        steps write, move or delete with QEMU's locks until the caller closes the hold;
        EBUSY if another process writes one or forbids writing it."""
        bases = {disk.base for disk in files.record().disks}
        held: dict[str, str] = {}
        checked: set[str] = set()  # chains share their lower parts
        for step in steps:
            named = [files.file(step[key]) for key in WRITES.get(step["do"], ()) if key in step]
            for path in named:
                mode = "read" if step["do"] in ONLY_DELETED else "write"
                if held.get(path) != "write":
                    held[path] = mode
            backing = step.get("backing")
            if named and isinstance(backing, str):
                named.append(os.path.join(os.path.dirname(named[0]), backing))  # an absolute one stays as is
            for path in named:
                if step["do"] in OPENS_CHAIN:
                    layerlock.check_chain(path, bases, checked)
                else:
                    layerlock.check_file(path, follow=path in bases)
        return layerlock.hold(held, functools.partial(_layer_name, files))

    # ---- running a step --------------------------------------------------------------------------
    async def run(
        self, step: dict, files: DomainFiles, *, recovering: bool, syncs: DirSyncs, progress: Progress | None
    ) -> None:
        path = files.file
        do = step["do"]
        if do == "overlay":
            # In a create the live file becomes L(S) without a rename: its mode follows the store's.
            freeze = path(step["freeze"]) if "freeze" in step else None
            await self.overlay(path(step["dst"]), step["backing"], step["fmt"], step["size"], syncs, freeze)
        elif do == "rename":
            await _in_thread(_move, path(step["src"]), path(step["dst"]), syncs)
        elif do == "link":
            await _in_thread(replace_with_symlink, path(step["path"]), step["target"], syncs)
        elif do == "commit":
            await self.commit(path(step["top"]), path(step["into"]), recovering, progress)
        elif do == "rebase":
            await self.rebase(path(step["layer"]), step["backing"], step["fmt"], progress)
        elif do == "pull":
            await self.pull(path(step["layer"]), path(step["from"]), step["backing"], step["fmt"], recovering, progress)
        elif do == "recompress":
            await self.recompress(path(step["layer"]), step["kind"], step["backing"], step["fmt"], progress)
        elif do == "delete":
            await _in_thread(_delete, path(step["path"]), syncs)
        else:
            raise io_error(f"The journal of domain {files.name!r} has an unknown step {do!r}.")

    async def overlay(
        self,
        dst: str,
        backing: str,
        backing_fmt: str,
        size: int,
        syncs: DirSyncs | None = None,
        freeze: str | None = None,
    ) -> None:
        """An overlay at dst on `backing`: the disk's pre-staged one renamed into place when
        it fits, else a new one. A complete overlay already at dst on that backing is kept
        (a step re-run after a crash: the live disk may have been handed out and written)."""
        if await trio.to_thread.run_sync(_made_or_adopted, dst, backing, backing_fmt, size, syncs, freeze):
            return
        tmp = dst + ".new"
        await _in_thread(unlink_if_present, tmp)
        await qemu.create_overlay(tmp, backing, backing_fmt, size)
        await _install(tmp, dst, syncs)

    async def commit(self, top: str, into: str, repair_first: bool = False, progress: Progress | None = None) -> None:
        """Write top's clusters into its backing file `into` (top is left as it was).

        A commit interrupted by a crash or a failure is completed by running it again; the
        interruption may have left the dirty flag set, which `qemu-img check -r all` clears,
        and clusters allocated in `into` but never linked, which `check -r leaks` frees.
        """
        if repair_first:
            for path, backing_held in ((into, False), (top, True)):
                if await qemu.is_dirty(path):
                    await qemu.check_and_repair(path, backing_held)
        await qemu.commit_into_backing(top, progress)
        if repair_first:
            await qemu.repair_leaks(into)
        await _in_thread(fsync_file, into)

    async def rebase(self, layer: str, backing: str, backing_fmt: str, progress: Progress | None = None) -> None:
        """Move `layer` onto `backing`, keeping its content: a safe rebase of a copy,
        checked with qemu-img compare, then renamed over the original. An in-place
        rebase killed midway can leave the layer on the new backing without its data."""
        if await qemu.backing_file(layer) == backing:
            return

        async def build(tmp: str) -> None:
            await trio.run_process(["cp", "--reflink=auto", "--sparse=always", layer, tmp])
            await qemu.rebase_safe(tmp, backing, backing_fmt, progress)

        await _replace_checked(layer, ".rebase", build, "Rebasing")

    async def pull(
        self, layer: str, source: str, backing: str, backing_fmt: str, recovering: bool, progress: Progress | None
    ) -> None:
        """`layer`, which sits on `source`, takes in source's data and then sits on `backing`
        (source's own backing), in place: qemu.pull_into. `source` is only read here (it is
        deleted by a later step, once this one is recorded done), so a layer found on
        `backing` already, by a re-run after a crash, is put back on `source` (-u) and
        pulled again: whatever it had copied reads the same over either, and a copy whose
        link never reached the file (a kill between the header and the close) is made anew.
        A layer found on `backing` with `source` gone was done before."""
        link = os.path.basename(source)
        now = await _in_thread_value(layerlock.header_backing, layer)
        if now == backing and not os.path.exists(source):
            return
        if now != link:
            if now != backing:
                raise io_error(f"Layer {layer} sits on {now!r}, not on {link!r} or {backing!r}; it was left as it is.")
            await qemu.repoint_held(layer, link, "qcow2")
        if recovering and await qemu.is_dirty(layer):
            await qemu.check_and_repair(layer, backing_held=True)
        await qemu.pull_into(layer, backing, backing_fmt, progress)
        if recovering:  # clusters a kill left allocated but never linked
            await qemu.repair_leaks(layer)
        await _in_thread(fsync_file, layer)

    async def recompress(
        self, layer: str, compression: str, backing: str, backing_fmt: str, progress: Progress | None = None
    ) -> None:
        """Rewrite the frozen `layer` compressed with zlib/zstd (or not), content unchanged."""

        async def build(tmp: str) -> None:
            await qemu.convert_layer(layer, tmp, backing, backing_fmt, compression, progress)

        await _replace_checked(layer, ".compress", build, "Recompressing")

    # ---- pre-staging (prestage.py) -----------------------------------------------------------------
    async def prestage(self, files: DomainFiles, disks: list[DiskRecord], live: dict[str, str]) -> None:
        """Each disk's next live layer made ahead: an empty overlay on its live file's name,
        at files.staged_path (outside layers/), unless the one there already fits. Built
        under a temporary name, fsynced, renamed into place (the caller holds the lock)."""
        async with trio.open_nursery() as nursery:
            for disk in disks:
                nursery.start_soon(self._prestage_disk, files, disk, live[disk.target])

    async def _prestage_disk(self, files: DomainFiles, disk: DiskRecord, backing: str) -> None:
        path = files.staged_path(disk.target)
        if await trio.to_thread.run_sync(staged_fits, path, backing, disk.size):
            return
        tmp = path + STAGING_SUFFIX
        await _in_thread(_fresh_directory_entry, tmp)
        await qemu.create_overlay(tmp, backing, "qcow2", disk.size)
        _crash_point(f"prestage:{disk.target}:built")
        await _in_thread(_install_now, tmp, path, None, files.layer_path(disk.target, "next"))
        _crash_point(f"prestage:{disk.target}:staged")

    # ---- images outside a plan -----------------------------------------------------------------------
    async def new_live_layer(self, path: str, disk: DiskRecord) -> None:
        await self.overlay(path, disk.base, disk.format, disk.size)

    async def probe_format(self, path: str) -> str:
        return await qemu.probe_format(path)

    async def virtual_size(self, path: str, fmt: str) -> int:
        return await qemu.virtual_size(path, fmt)

    async def has_own_data(self, path: str) -> bool:
        return await qemu.top_layer_has_data(path)


class Layout:
    """Where a disk's layers are, as the steps name them (relative to the domain): the
    intents name real files ({target: basename}); the store joins them (store.py)."""

    def __init__(self, files: DomainFiles) -> None:
        self.files = files

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.files.path)

    def layer(self, disk: DiskRecord, names: dict[str, str]) -> str:
        """The real layer file that `names` ({target: basename}) gives disk `disk`."""
        return self._relative(self.files.layer_path(disk.target, names[disk.target]))

    def live_link(self, disk: DiskRecord) -> str:
        return self._relative(self.files.live_link(disk.target))

    @staticmethod
    def backing(disk: DiskRecord, names: dict[str, str] | None) -> dict:
        """The backing link (as written in an overlay's header) and format for a layer that
        sits on the real files `names`, or on the base image when `names` is None.

        Layers of one disk share a directory, so in-store links are bare basenames; the base
        image, outside the store, is linked by absolute path.
        """
        if names is None:
            return {"backing": disk.base, "fmt": disk.format}
        return {"backing": names[disk.target], "fmt": "qcow2"}


def _step(do: str, **args) -> dict:
    return {"do": do, **args}


def _pull(plan: Layout, disk: DiskRecord, dep: dict[str, str], own: dict[str, str], parent: dict | None) -> dict:
    """D (real files `dep`) pulls L(S)'s data (`own`) and then sits on S's parent."""
    return _step("pull", layer=plan.layer(disk, dep), **{"from": plan.layer(disk, own)}, **plan.backing(disk, parent))


def _cheaper_to_pull(files: DomainFiles, own: str, dep: str) -> bool:
    """Whether D pulling L(S)'s data costs less than committing D into L(S): from the
    files' allocated blocks (one stat each), PULL_FACTOR as above."""
    try:
        s_bytes, d_bytes = (os.stat(files.file(path)).st_blocks for path in (own, dep))
    except OSError:
        return False  # the commit's own checks say what is wrong
    return s_bytes * PULL_FACTOR < d_bytes


async def _in_thread_value(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def _in_thread(fn, *args) -> None:
    await trio.to_thread.run_sync(fn, *args)


def _install_now(tmp: str, dst: str, syncs: DirSyncs | None, mode_of: str | None = None) -> None:
    _give_layer_mode(tmp, mode_of or dst)
    fsync_file(tmp)
    os.rename(tmp, dst)
    sync_dir_of(dst, syncs)


async def _install(tmp: str, dst: str, syncs: DirSyncs | None = None) -> None:
    """fsync tmp, rename it over dst, fsync the directory (now, or at syncs.flush())."""
    await _in_thread(_install_now, tmp, dst, syncs)


def _give_layer_mode(tmp: str, dst: str) -> None:
    """A new layer is 0600, whatever the umask and whatever made it (qemu-img, cp); 0640
    with the store directory's group when that directory is group-readable: the store's
    owner shares read access with a group (backups) by opening the store to it (README)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(dst)))))
    try:
        st = os.stat(root)
    except OSError:
        st = None
    shared = st is not None and bool(st.st_mode & stat.S_IRGRP)
    if shared:
        with contextlib.suppress(PermissionError):  # not a member of that group: 0600 then
            os.chown(tmp, -1, st.st_gid)
    os.chmod(tmp, 0o640 if shared and os.stat(tmp).st_gid == st.st_gid else 0o600)


def _move(src: str, dst: str, syncs: DirSyncs | None) -> None:
    if os.path.exists(src):
        _install_now(src, dst, syncs)
    elif not os.path.exists(dst):
        raise io_error(f"Layer {src} is missing, so it cannot be moved to {dst}.")


def _delete(path: str, syncs: DirSyncs | None) -> None:
    unlink_if_present(path)
    sync_dir_of(path, syncs)


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


# ---- pre-staged overlays (prestage.py) -------------------------------------------------------------
_QCOW2_MAGIC = b"QFI\xfb"
_BACKING_FORMAT_EXTENSION = 0xE2792ACA
_STAGED_MAX_BYTES = 4 * 1024 * 1024  # a fresh overlay is a few clusters (256 KiB at 64 KiB clusters)


def _made_or_adopted(
    dst: str, backing: str, backing_fmt: str, size: int, syncs: DirSyncs | None, freeze: str | None = None
) -> bool:
    """Whether dst is an overlay on `backing` now (kept, or the pre-staged one moved
    there); first the layer a create freezes gets the store's mode (one thread hop for both)."""
    if freeze is not None:
        _give_layer_mode(freeze, freeze)
    if backing_fmt == "qcow2" and _is_overlay_on(dst, backing, size):
        return True
    return adopt_staged(dst, backing, backing_fmt, size, syncs)


def _is_overlay_on(path: str, backing: str, size: int) -> bool:
    """Whether path is a whole qcow2 (it only ever appears by a rename after an fsync) on
    `backing` of `size` bytes; its data is not looked at."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return _header_fits(head, backing, size, empty=False)


def adopt_staged(dst: str, backing: str, backing_fmt: str, size: int, syncs: DirSyncs | None) -> bool:
    """Rename the pre-staged overlay of dst's disk to dst if it fits (staged_fits); False
    (nothing done) otherwise. The caller holds the domain's lock, so nothing else moves it."""
    staged = staged_beside(dst)
    if backing_fmt != "qcow2" or not staged_fits(staged, backing, size):
        return False
    try:
        _give_layer_mode(staged, dst)  # the store's sharing may have changed since it was made
        os.rename(staged, dst)
    except OSError:
        return False  # e.g. staged/ moved to another filesystem: a new overlay is made instead
    # staged/ is not fsynced: an old name that a power cut brings back is a second name of
    # the layer, which staged_fits refuses (st_nlink) and the next pre-staging replaces.
    sync_dir_of(dst, syncs)
    return True


def staged_fits(path: str, backing: str, size: int) -> bool:
    """Whether `path` is an intact, empty qcow2 overlay on `backing` (a basename beside it,
    format qcow2) of `size` bytes, a regular file with one name: read from its header and
    L1 table, no process run. Anything else (missing, stale, torn, written to) is False."""
    try:
        if os.path.islink(os.path.dirname(path)):
            return False  # staged/ is snapfs's own directory, never a way out of the store
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > _STAGED_MAX_BYTES:
            return False
        return _header_fits(os.pread(fd, st.st_size, 0), backing, size)
    finally:
        os.close(fd)


def _header_fits(image: bytes, backing: str, size: int, empty: bool = True) -> bool:
    if len(image) < 104 or image[:4] != _QCOW2_MAGIC:
        return False
    version, backing_offset, backing_length = struct.unpack_from(">IQI", image, 4)
    virtual_size, _, l1_size, l1_offset = struct.unpack_from(">QIIQ", image, 24)
    incompatible = struct.unpack_from(">Q", image, 72)[0]
    header_length = struct.unpack_from(">I", image, 100)[0]
    if version != 3 or virtual_size != size or incompatible != 0 or header_length > 4096:
        return False  # incompatible: the dirty or corrupt bit, an external data file
    if image[backing_offset : backing_offset + backing_length] != backing.encode():
        return False
    l1 = image[l1_offset : l1_offset + 8 * l1_size]
    if empty and (len(l1) != 8 * l1_size or l1.count(0) != len(l1)):
        return False  # torn, or data was written into it
    return _backing_format(image, header_length) == b"qcow2"


def _backing_format(image: bytes, offset: int) -> bytes | None:
    """The backing format header extension's value (None without one)."""
    while offset + 8 <= len(image):
        kind, length = struct.unpack_from(">II", image, offset)
        if kind == 0:
            return None
        if kind == _BACKING_FORMAT_EXTENSION:
            return image[offset + 8 : offset + 8 + length]
        offset += 8 + (length + 7) // 8 * 8
    return None


def _fresh_directory_entry(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    unlink_if_present(path)


def _crash_point(point: str) -> None:
    """Fault injection for the crash tests, as journal.fault_point: SNAPFS_CRASH_AT=<point>."""
    if os.environ.get("SNAPFS_CRASH_AT") == point:
        os._exit(86)


def _layer_name(files: DomainFiles, path: str) -> str:
    """How a user knows a layer: "disk vda of snapshot 's1'", "the live disk vda"."""
    target, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
    view = files.view()
    if name == LIVE_LINK or view.live.get(target) == name:
        return f"the live disk {target} of domain {files.name!r}"
    for snap in view.snapshots.values():
        if layer_name(snap, target) == name:
            return f"disk {target} of snapshot {snap.name!r}"
    return path
