"""The snapshot API (DESIGN sections 1 and 4): every snapshot rule lives here, once.

Each operation is planned from the metadata into a list of steps, the plan is written to
the domain's journal (fsynced) and then carried out step by step, recording progress.
A crash at any point is finished by the next operation or the next open of the store.
The file steps are carried out by an engine (engine.py); nothing here runs qemu-img
except the read-only checks made before a plan is written.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import os
import re
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace

import trio

from . import layers, notify, qemu, xml
from .engine import QemuImgEngine
from .errors import DependentsError, SnapfsError, busy, exists, invalid, io_error, not_found
from .layers import LIVE_DEPENDENT
from .store import (
    LIVE,
    DirSyncs,
    DiskRecord,
    DomainFiles,
    DomainRecord,
    MetadataView,
    SnapshotRecord,
    StoreFiles,
    write_json,
)

CONTROL_WORDS = ("merge", "merge-force", "discard", "discard-force", "revert", "deactivate")
MAX_DESCRIPTION_BYTES = 64 * 1024
MAX_NAME_BYTES = 255
JOB_UPDATE_SECONDS = 0.25
IN_USE_WAIT_SECONDS = float(os.environ.get("SNAPFS_IN_USE_WAIT", "1"))
STEP_BUSY_WAIT_SECONDS = 10.0
BASE_FORMATS = ("qcow2", "raw")


class DeactivateFlags(enum.IntFlag):
    NONE = 0
    MERGE = 1
    MERGE_FORCE = 2
    DISCARD = 4
    DISCARD_FORCE = 8


def validate_name(name: object, what: str = "snapshot") -> str:
    """1-255 bytes of UTF-8, no '/', no NUL, not '.' or '..', not starting with '.'."""
    if not isinstance(name, str):
        raise invalid(f"A {what} name must be text.")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid(f"The {what} name is not valid UTF-8.") from None
    if size == 0:
        raise invalid(f"A {what} name cannot be empty.")
    if size > MAX_NAME_BYTES:
        raise SnapfsError(errno.ENAMETOOLONG, f"A {what} name is at most {MAX_NAME_BYTES} bytes; this one has {size}.")
    if "/" in name or "\0" in name:
        raise invalid(f"A {what} name cannot contain '/' or NUL: {name!r}.")
    if name.startswith("."):
        raise invalid(f"A {what} name cannot start with '.': {name!r}.")
    if _NOT_XML.search(name):
        raise invalid(f"A {what} name cannot hold control characters, which XML cannot carry: {name!r}.")
    return name


# Characters an XML 1.0 document cannot carry (names and descriptions go into XML).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def validate_description(text: object) -> str:
    """At most 64 KiB of UTF-8 that XML can carry (tabs and newlines are fine)."""
    if not isinstance(text, str):
        raise invalid("A description must be text.")
    if _NOT_XML.search(text):
        raise invalid(
            "A description cannot hold control characters (other than tab and newline), which XML cannot carry."
        )
    size = len(text.encode("utf-8"))
    if size > MAX_DESCRIPTION_BYTES:
        raise SnapfsError(errno.EFBIG, f"A description is at most {MAX_DESCRIPTION_BYTES} bytes; this one has {size}.")
    return text


def validate_compression(kind: object) -> str:
    if kind not in xml.COMPRESSIONS:
        raise invalid(f"Unknown compression {kind!r}; use gzip, zstd or none.")
    return str(kind)


@dataclass
class Plan:
    steps: list[dict]
    touched: list[str] = field(default_factory=list)
    result: object = None
    subject: str = ""


def _names(view: MetadataView, ids: list[str]) -> str:
    words = ["the live disk" if i == LIVE_DEPENDENT else repr(view.snapshots[i].name) for i in ids]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class DomainCore:
    """One domain's snapshot operations (async) and readings (sync, lock-free)."""

    def __init__(
        self,
        files: DomainFiles,
        engine: QemuImgEngine,
        definition: tuple[int, ...] | None = None,
        changed: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.files = files
        self.engine = engine
        self.definition = definition
        self.name = files.name
        self._record: DomainRecord | None = None
        self._changed = changed  # told the domain's name after every change, lock released

    # ---- readings -------------------------------------------------------------------
    def record(self) -> DomainRecord:
        if self._record is None:
            self._record = self.files.record()
        return self._record

    @property
    def disks(self) -> list[DiskRecord]:
        return self.record().disks

    def view(self) -> MetadataView:
        return self.files.view()

    def get(self, snap_id: str, view: MetadataView | None = None) -> SnapshotRecord:
        view = view or self.view()
        if snap_id not in view.snapshots:
            raise not_found(f"Domain {self.name!r} has no such snapshot (it may have been merged or discarded).")
        return view.snapshots[snap_id]

    def lookup(self, name: str, view: MetadataView | None = None) -> SnapshotRecord:
        found = (view or self.view()).by_name(name)
        if found is None:
            raise not_found(f"Domain {self.name!r} has no snapshot named {name!r}.")
        return found

    def layer_path(self, target: str, snap_id: str) -> str:
        return self.files.layer(target, snap_id)

    def live_path(self, target: str) -> str:
        return self.files.layer(target, LIVE)

    def domain_xml(self) -> str:
        live = {d.target: self.live_path(d.target) for d in self.disks}
        return xml.domain_xml_on_layers(self.files.original_xml(), live)

    def snapshot_xml(self, snap_id: str) -> str:
        view = self.view()
        snap = self.get(snap_id, view)
        parent = view.snapshots.get(snap.parent) if snap.parent else None
        layers = {d.target: self.layer_path(d.target, snap.id) for d in self.disks}
        return xml.snapshot_xml(
            name=snap.name,
            description=snap.description,
            state=snap.state,
            creation_time=snap.creation_time,
            parent_name=parent.name if parent else None,
            domain=xml.domain_xml_on_layers(self.files.original_xml(), layers),
            compression=snap.compression,
            disks=list(layers.items()),
        )

    def last_error(self) -> str:
        return self.files.last_error()

    def job(self) -> str:
        """What a long operation on this domain is doing now (any process), or ''."""
        return self.files.job()

    def record_error(self, operation: str, message: str) -> None:
        self.files.record_error(operation, message)

    # ---- operations -----------------------------------------------------------------
    async def create(
        self, name: str | None = None, description: str | None = None, compression: str | None = None
    ) -> SnapshotRecord:
        return await self._operate("create", lambda view: self._plan_create(view, name, description, compression))

    async def create_from_xml(self, text: str | bytes, compress: str | None = None) -> SnapshotRecord:
        try:
            request = xml.parse_snapshot_request(text)
        except SnapfsError as exc:
            self.record_error("create", exc.message)
            raise
        return await self.create(request.name, request.description, request.compression or compress)

    async def revert(self, snap_id: str) -> None:
        await self._operate("revert", lambda view: self._plan_revert(view, snap_id))

    async def merge(self, snap_id: str) -> None:
        await self._operate("merge", lambda view: self._plan_merge(view, snap_id))

    async def discard(self, snap_id: str) -> None:
        await self._operate("discard", lambda view: self._plan_discard(view, snap_id))

    async def discard_force(self, snap_id: str) -> None:
        await self._operate("discard-force", lambda view: self._plan_discard_force(view, snap_id))

    async def deactivate_only(self, snap_id: str) -> None:
        await self._operate("deactivate", lambda view: self._plan_deactivate(view, snap_id))

    async def deactivate(self, snap_id: str, flags: int = DeactivateFlags.NONE) -> None:
        """The seed's virDomainSnapshotDeactivate; the four flags are mutually exclusive."""
        actions = {
            DeactivateFlags.NONE: self.deactivate_only,
            DeactivateFlags.MERGE: self.merge,
            DeactivateFlags.MERGE_FORCE: self.merge,
            DeactivateFlags.DISCARD: self.discard,
            DeactivateFlags.DISCARD_FORCE: self.discard_force,
        }
        action = actions.get(flags) if isinstance(flags, int) else None
        if action is None:
            message = f"Deactivate flags {flags!r} are not one of MERGE, MERGE_FORCE, DISCARD, DISCARD_FORCE."
            self.record_error("deactivate", message)
            raise invalid(message)
        await action(snap_id)

    async def control(self, snap_id: str, word: str) -> None:
        """One word written to a snapshot's control file."""
        actions: dict[str, Callable[[str], Awaitable[None]]] = {
            "merge": self.merge,
            "merge-force": self.merge,
            "discard": self.discard,
            "discard-force": self.discard_force,
            "revert": self.revert,
            "deactivate": self.deactivate_only,
        }
        if word not in actions:
            message = f"Unknown control word {word!r}; the words are: {' '.join(CONTROL_WORDS)}."
            self.record_error("control", message)
            raise invalid(message)
        await actions[word](snap_id)

    async def rename(self, snap_id: str, new_name: str) -> None:
        await self._operate("rename", lambda view: self._plan_rename(view, snap_id, new_name))

    async def set_description(self, snap_id: str, text: str) -> None:
        await self._operate("description", lambda view: self._plan_description(view, snap_id, text))

    async def set_compression(self, snap_id: str, kind: str) -> None:
        await self._operate("compression", lambda view: self._plan_compression(view, snap_id, kind))

    # ---- planning: the rules ----------------------------------------------------------
    def _plan_create(
        self, view: MetadataView, name: str | None, description: str | None, compression: str | None
    ) -> Plan:
        now = int(time.time())
        if name is None:
            name = self._default_name(view, now)
        validate_name(name)
        if view.by_name(name) is not None:
            raise exists(f"Domain {self.name!r} already has a snapshot named {name!r}.")
        kind = validate_compression(compression or "none")
        validate_description(description or "")
        snap = SnapshotRecord(str(uuidlib.uuid4()), name, view.current, now, description or "", "shutoff", kind)
        steps = [_meta_write(snap)]
        steps += [_step("rename", src=self._rel_live(d), dst=self._rel_layer(d, snap.id)) for d in self.disks]
        steps += [self._overlay_step(d, snap.id) for d in self.disks]
        if kind != "none":
            steps += [self._recompress_step(d, snap.id, snap.parent, kind) for d in self.disks]
        steps.append(_state(snap.id))
        return Plan(steps, [self.live_path(d.target) for d in self.disks], snap, snap.name)

    @staticmethod
    def _default_name(view: MetadataView, now: int) -> str:
        name, n = str(now), 1
        while view.by_name(name) is not None:
            name, n = f"{now}-{n}", n + 1
        return name

    def _plan_revert(self, view: MetadataView, snap_id: str) -> Plan:
        snap = self.get(snap_id, view)
        steps = [self._overlay_step(d, snap_id) for d in self.disks] + [_state(snap_id)]
        return Plan(steps, [self.live_path(d.target) for d in self.disks], subject=snap.name)

    def _plan_discard(self, view: MetadataView, snap_id: str) -> Plan:
        snap = self.get(snap_id, view)
        deps = layers.dependents(view, snap_id)
        if deps:
            verb = "depends" if len(deps) == 1 else "depend"
            raise DependentsError(
                f"Snapshot {snap.name!r} cannot be discarded: {_names(view, deps)} {verb} on it "
                "(merge it, or discard-force to delete its subtree)."
            )
        steps = [_step("meta_delete", id=snap_id)]
        steps += [_step("delete", path=self._rel_layer(d, snap_id)) for d in self.disks]
        steps.append(_state(view.current))
        return Plan(steps, self._layer_paths([snap_id]), subject=snap.name)

    def _plan_merge(self, view: MetadataView, snap_id: str) -> Plan:
        snap = self.get(snap_id, view)
        deps = layers.dependents(view, snap_id)
        if not deps:
            return self._plan_discard(view, snap_id)
        steps: list[dict] = []
        if len(deps) == 1:
            # Commit D into L(S), then L(S)'s file takes D's path: D's children keep their links.
            dep = deps[0]
            steps += [
                _step("commit", top=self._rel_dependent(d, dep), into=self._rel_layer(d, snap_id)) for d in self.disks
            ]
            steps += [
                _step("rename", src=self._rel_layer(d, snap_id), dst=self._rel_dependent(d, dep)) for d in self.disks
            ]
        else:
            # Two or more dependents: each is rebased (safe, on a copy) onto S's parent.
            for dep in deps:
                steps += [self._rebase_step(d, dep, snap.parent) for d in self.disks]
            steps += [_step("delete", path=self._rel_layer(d, snap_id)) for d in self.disks]
        # Clusters moved by commit or rebase arrive uncompressed (a commit even rewrites the
        # child's own clusters and the header's compression type): a surviving child that is
        # compressed is recompressed, so its layer stays entirely in its own setting.
        for child in view.children(snap_id):
            if child.compression != "none":
                steps += [self._recompress_step(d, child.id, snap.parent, child.compression) for d in self.disks]
        steps += [_meta_write(replace(child, parent=snap.parent)) for child in view.children(snap_id)]
        steps.append(_step("meta_delete", id=snap_id))
        steps.append(_state(snap.parent if view.current == snap_id else view.current))
        touched = self._layer_paths([snap_id]) + [
            self.files.file(self._rel_dependent(d, dep)) for dep in deps for d in self.disks
        ]
        return Plan(steps, touched, subject=snap.name)

    def _plan_discard_force(self, view: MetadataView, snap_id: str) -> Plan:
        snap = self.get(snap_id, view)
        doomed = layers.subtree(view, snap_id)
        live_inside = view.current in doomed
        steps: list[dict] = []
        touched = self._layer_paths(doomed)
        if live_inside:
            steps += [self._overlay_step(d, snap.parent) for d in self.disks]
            touched += [self.live_path(d.target) for d in self.disks]
        steps += [_step("meta_delete", id=node) for node in reversed(doomed)]
        steps += [_step("delete", path=self._rel_layer(d, node)) for node in doomed for d in self.disks]
        steps.append(_state(snap.parent if live_inside else view.current))
        return Plan(steps, touched, subject=snap.name)

    def _plan_deactivate(self, view: MetadataView, snap_id: str) -> Plan:
        snap = self.get(snap_id, view)
        if not layers.live_descends_from(view, snap_id):
            return Plan([])
        steps = [self._rebase_step(d, LIVE_DEPENDENT, snap.parent) for d in self.disks]
        steps.append(_state(snap.parent))
        return Plan(steps, [self.live_path(d.target) for d in self.disks], subject=snap.name)

    def _plan_rename(self, view: MetadataView, snap_id: str, new_name: str) -> Plan:
        snap = self.get(snap_id, view)
        validate_name(new_name)
        if new_name == snap.name:
            return Plan([])
        if view.by_name(new_name) is not None:
            raise exists(f"Domain {self.name!r} already has a snapshot named {new_name!r}.")
        return Plan([_meta_write(replace(snap, name=new_name)), _state(view.current)], subject=snap.name)

    def _plan_description(self, view: MetadataView, snap_id: str, text: str) -> Plan:
        snap = self.get(snap_id, view)
        validate_description(text)
        return Plan([_meta_write(replace(snap, description=text)), _state(view.current)], subject=snap.name)

    def _plan_compression(self, view: MetadataView, snap_id: str, kind: str) -> Plan:
        snap = self.get(snap_id, view)
        kind = validate_compression(kind)
        steps = [self._recompress_step(d, snap_id, snap.parent, kind) for d in self.disks]
        steps += [_meta_write(replace(snap, compression=kind)), _state(view.current)]
        return Plan(steps, self._layer_paths([snap_id]), subject=snap.name)

    # ---- plan helpers -----------------------------------------------------------------
    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.files.path)

    def _rel_layer(self, disk: DiskRecord, snap_id: str) -> str:
        return self._rel(self.layer_path(disk.target, snap_id))

    def _rel_live(self, disk: DiskRecord) -> str:
        return self._rel(self.live_path(disk.target))

    def _rel_dependent(self, disk: DiskRecord, dep: str) -> str:
        return self._rel_live(disk) if dep == LIVE_DEPENDENT else self._rel_layer(disk, dep)

    def _layer_paths(self, snap_ids: list[str]) -> list[str]:
        return [self.layer_path(d.target, s) for s in snap_ids for d in self.disks]

    def _overlay_step(self, disk: DiskRecord, on: str | None) -> dict:
        backing, fmt = layers.backing_for(self.files, disk, on)
        return _step("overlay", dst=self._rel_live(disk), backing=backing, fmt=fmt, size=disk.size)

    def _rebase_step(self, disk: DiskRecord, dep: str, onto: str | None) -> dict:
        backing, fmt = layers.backing_for(self.files, disk, onto)
        return _step("rebase", layer=self._rel_dependent(disk, dep), backing=backing, fmt=fmt)

    def _recompress_step(self, disk: DiskRecord, snap_id: str, parent: str | None, kind: str) -> dict:
        backing, fmt = layers.backing_for(self.files, disk, parent)
        return _step("recompress", layer=self._rel_layer(disk, snap_id), kind=kind, backing=backing, fmt=fmt)

    # ---- carrying out -----------------------------------------------------------------
    async def _operate(self, operation: str, planner: Callable[[MetadataView], Plan]):
        changed = False  # set before anything is written: a failure part-way is news too
        try:
            async with self.files.locked():
                changed = self.files.read_journal() is not None
                await self._finish_journal()
                if operation == "create":
                    _refuse_deep_chain(self.view(), self.name)
                plan = planner(self.view())
                _name_changed_snapshots(plan.steps)
                if plan.steps:
                    await self._refuse_if_in_use(plan.touched)
                    journal = {"operation": operation, "subject": plan.subject, "steps": plan.steps, "done": 0}
                    changed = True
                    await trio.to_thread.run_sync(self.files.write_journal, journal)
                    try:
                        await self._carry_out(journal, recovering=False)
                    except SnapfsError as exc:
                        raise SnapfsError(
                            exc.errno,
                            f"{operation} stopped part-way ({exc.message.rstrip('.')}); it is recorded and will be "
                            f"finished by the next operation on domain {self.name!r}.",
                        ) from exc
                return plan.result
        except SnapfsError as exc:
            self.record_error(operation, exc.message)
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            message = f"{operation} failed unexpectedly: {exc}"
            self.record_error(operation, message)
            raise io_error(message) from exc
        finally:
            if changed:
                await self.tell_changed()

    async def tell_changed(self) -> None:
        """Tell the mounts (this process's and the others) that the domain changed; never
        with the lock held (a mount may be serving a request that waits for it)."""
        if self._changed is not None:
            with trio.CancelScope(shield=True):
                await self._changed(self.name)

    @staticmethod
    async def _refuse_if_in_use(paths: list[str]) -> None:
        """Refuse (EBUSY) before changing anything if a running QEMU, qemu-nbd or a reader
        holds a layer the plan would write, move or delete. A reader that holds one for
        a moment (a qemu-img map behind a .changes file) is waited for, briefly."""
        await _patiently(lambda: _check_not_in_use(paths), IN_USE_WAIT_SECONDS)

    async def _carry_out(self, journal: dict, recovering: bool) -> None:
        """Run the steps from journal["done"] on. Progress is recorded (after an fsync of
        every directory the unrecorded steps changed) only where re-running the steps
        since the last record could be wrong: see _must_record. Overlays that need no
        record between them (one per disk, in a create or a revert) run side by side."""
        steps = journal["steps"]
        syncs = DirSyncs()
        index = journal["done"]
        while index < len(steps):
            if _must_record(steps, journal["done"], index):
                await trio.to_thread.run_sync(syncs.flush)
                journal["done"] = index
                await trio.to_thread.run_sync(self.files.write_journal, journal)
            group = _side_by_side(steps, journal["done"], index)
            if len(group) == 1:
                await self._run_recorded_step(journal, index, recovering, syncs)
            else:
                async with trio.open_nursery() as nursery:
                    for member in group:
                        nursery.start_soon(self._run_recorded_step, journal, member, recovering, syncs)
            index = group[-1] + 1
        await trio.to_thread.run_sync(syncs.flush)
        await trio.to_thread.run_sync(self.files.clear_journal)
        self.files.clear_job()

    async def _run_recorded_step(self, journal: dict, index: int, recovering: bool, syncs: DirSyncs) -> None:
        steps = journal["steps"]
        point = f"{journal['operation']}:{index}:{steps[index]['do']}"
        _fault_point(point, "before", recovering)
        async with self._job(journal, index):
            # A qemu-img reader (a .changes map, an image being opened) may hold a
            # layer for a moment; qemu-img fails at open then, before writing anything.
            step = functools.partial(self._run_step, steps[index], recovering, syncs)
            await _patiently(step, STEP_BUSY_WAIT_SECONDS)
        _fault_point(point, "after", recovering)

    @contextlib.asynccontextmanager
    async def _job(self, journal: dict, index: int) -> AsyncIterator[None]:
        """Keep the domain's job file saying what runs now ("merge s1: step 3 of 7,
        commit, 42%"), fed by qemu-img's own progress, at most a few times a second.

        The file is written in a worker thread by a task of its own: while a commit
        writes gigabytes, a rename on the same filesystem can wait tens of milliseconds,
        and the progress callback runs in the event loop."""
        steps = journal["steps"]
        if steps[index]["do"] not in ("commit", "rebase", "recompress"):
            yield  # light steps report nothing
            return
        head = f"{journal['operation']} {journal.get('subject', '')}".rstrip()
        head += f": step {index + 1} of {len(steps)}, {steps[index]['do']}"
        latest = [0.0]
        changed = trio.Event()

        def report(percent: float) -> None:
            latest[0] = percent
            changed.set()

        async def keep_writing() -> None:
            nonlocal changed
            while True:
                await changed.wait()
                changed = trio.Event()
                await trio.to_thread.run_sync(self.files.write_job, f"{head}, {latest[0]:.0f}%\n")
                await trio.sleep(JOB_UPDATE_SECONDS)

        token = qemu.PROGRESS.set(report)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_writing)
                report(0.0)
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            qemu.PROGRESS.reset(token)

    async def _run_step(self, step: dict, recovering: bool, syncs: DirSyncs) -> None:
        path = self.files.file
        do = step["do"]
        if do == "overlay":
            await self.engine.overlay(path(step["dst"]), step["backing"], step["fmt"], step["size"], syncs)
        elif do == "rename":
            await self.engine.rename(path(step["src"]), path(step["dst"]), syncs)
        elif do == "commit":
            await self.engine.commit(path(step["top"]), path(step["into"]), repair_first=recovering)
        elif do == "rebase":
            await self.engine.rebase(path(step["layer"]), step["backing"], step["fmt"])
        elif do == "recompress":
            await self.engine.recompress(path(step["layer"]), step["kind"], step["backing"], step["fmt"])
        elif do == "delete":
            await self.engine.delete(path(step["path"]), syncs)
        elif do == "meta_write":
            await trio.to_thread.run_sync(self.files.write_snapshot, SnapshotRecord.from_json(step["record"]), syncs)
        elif do == "meta_delete":
            await trio.to_thread.run_sync(self.files.delete_snapshot, step["id"], syncs)
        elif do == "state":
            await trio.to_thread.run_sync(self.files.write_state, step["current"], step.get("changed"), syncs)
        else:
            raise io_error(f"The journal of domain {self.name!r} has an unknown step {do!r}.")

    async def _finish_journal(self) -> None:
        """Finish an operation that a crash interrupted (caller holds the lock)."""
        journal = self.files.read_journal()
        if journal is None:
            return
        await self._carry_out(journal, recovering=True)
        await trio.to_thread.run_sync(self._remove_leftovers)
        self.files.clear_job()

    def _remove_leftovers(self) -> None:
        """Temporary files of the interrupted operation: never anything a layer needs."""
        suffixes = (".new", ".rebase", ".compress")
        for disk in self.disks:
            directory = self.files.layers_dir(disk.target)
            for entry in os.scandir(directory):
                if entry.name.endswith(suffixes) or ".tmp" in entry.name:
                    os.unlink(entry.path)
        for entry in os.scandir(self.files.snapshots_dir):
            if ".tmp" in entry.name:
                os.unlink(entry.path)

    async def recover(self) -> None:
        """Finish an operation a crash interrupted. A journal whose lock is held belongs
        to an operation still running in a live process (a crashed process's flock is
        gone), so that domain is left to it instead of being waited for."""
        if self.files.read_journal() is None:
            return
        try:
            async with self.files.locked(wait=0):
                await self._finish_journal()
        except SnapfsError as exc:
            if exc.errno != errno.EBUSY:
                raise
        finally:
            await self.tell_changed()


async def _patiently(attempt: Callable[[], Awaitable[None] | None], seconds: float) -> None:
    """Run attempt(), again while it fails with EBUSY, for at most `seconds`."""
    deadline = trio.current_time() + seconds
    while True:
        try:
            result = attempt()
            if result is not None:
                await result
            return
        except SnapfsError as exc:
            if exc.errno != errno.EBUSY or trio.current_time() >= deadline:
                raise
        await trio.sleep(0.05)


def _check_not_in_use(paths: list[str]) -> None:
    for path in dict.fromkeys(paths):
        if os.path.exists(path):
            qemu.refuse_if_in_use(path)


CRASH_EXIT_STATUS = 86


def _fault_point(point: str, when: str, recovering: bool) -> None:
    """Fault injection for the crash tests (never set in normal use).

    SNAPFS_TRACE_STEPS=FILE appends every step point ("merge:2:commit") to FILE;
    SNAPFS_CRASH_AT="merge:2:commit:before" (or ":after") kills the process outright
    there, with no cleanup, as a power cut would. Recovery itself is never interrupted.
    """
    if recovering:
        return
    trace = os.environ.get("SNAPFS_TRACE_STEPS")
    if trace and when == "before":
        with open(trace, "a") as f:
            f.write(point + "\n")
    if os.environ.get("SNAPFS_CRASH_AT") == f"{point}:{when}":
        os._exit(CRASH_EXIT_STATUS)


# The most snapshots one chain may hold (base + this many layers + the live layer). qemu-img
# handles a chain in time and memory that grow with the square of its depth, measured
# with qemu-img 7.2 on the bench machine: at 1,000 layers a commit costs 8 s and a map
# 10 s before any data moves; at 2,000, 49 s and 60 s; at 5,000 a map takes 6 minutes
# and 1 GB. snapfs refuses (EMLINK) a create that would go past this depth.
MAX_CHAIN_SNAPSHOTS = 1024


def _refuse_deep_chain(view: MetadataView, domain_name: str) -> None:
    """EMLINK if a new snapshot on the current one would make the chain too deep."""
    depth, snap_id = 0, view.current
    while snap_id is not None and snap_id in view.snapshots:
        depth += 1
        if depth >= MAX_CHAIN_SNAPSHOTS:
            raise SnapfsError(
                errno.EMLINK,
                f"Domain {domain_name!r}: the current snapshot is {MAX_CHAIN_SNAPSHOTS} snapshots deep, the most "
                "one chain may hold (qemu-img slows with the square of a chain's depth); merge some, or revert "
                "to a shallower snapshot first.",
            )
        snap_id = view.snapshots[snap_id].parent


# Steps that only rename, create or delete whole files by name, and the names they use.
_LIGHT_STEPS = {"overlay": ("dst",), "rename": ("src", "dst"), "delete": ("path",), "meta_write": (), "meta_delete": ()}


def _step_names(step: dict) -> set[str]:
    """The names (layer paths, snapshot metadata files) a light step reads or writes."""
    if step["do"] == "meta_write":
        return {"meta:" + step["record"]["id"]}
    if step["do"] == "meta_delete":
        return {"meta:" + step["id"]}
    return {step[key] for key in _LIGHT_STEPS[step["do"]]}


def _must_record(steps: list[dict], done: int, index: int) -> bool:
    """Whether progress must be recorded (done = index) before step `index` runs.

    After a crash, recovery re-runs every step from the recorded `done`, so steps
    done..index-1 must be safe to run again once step `index` has run or half-run. They
    are when they and step `index` are light steps on pairwise different names: such a
    step's re-run depends on its own names only (rename: src gone and dst there, nothing
    to do; delete: nothing to do; meta_write/meta_delete: the same file written or
    removed again; overlay: a fresh empty overlay again, and nothing wrote into the
    first one). Recorded first, as before every step until now:
    - a commit, rebase or recompress, and the step after one: they read and write layer
      data along backing chains;
    - a step using a name an unrecorded step used: e.g. create's new overlay at live after
      the rename of live to the snapshot's layer (re-running that rename would move the
      new, empty live over the snapshot's layer);
    - the state step, when an overlay is unrecorded: once state.json shows the result the
      live disk may be used, and a re-run overlay would drop what was written to it.
    """
    if index == done:
        return False
    window = steps[done : index + 1]
    if any(step["do"] not in _LIGHT_STEPS for step in window[:-1]):
        return True
    if steps[index]["do"] == "state":
        return any(step["do"] == "overlay" for step in window[:-1])
    if steps[index]["do"] not in _LIGHT_STEPS:
        return True
    seen: set[str] = set()
    for step in window:
        names = _step_names(step)
        if names & seen:
            return True
        seen |= names
    return False


def _side_by_side(steps: list[dict], done: int, index: int) -> list[int]:
    """Step `index` and the overlays right after it that may run at the same time: a run
    of overlay steps with no record needed between them (so on pairwise different files,
    each depending only on its own name: a crash part-way re-runs them all)."""
    group = [index]
    if steps[index]["do"] != "overlay":
        return group
    for following in range(index + 1, len(steps)):
        if steps[following]["do"] != "overlay" or _must_record(steps, done, following):
            break
        group.append(following)
    return group


def _name_changed_snapshots(steps: list[dict]) -> None:
    """Tell the closing state step which snapshot files the plan writes or deletes."""
    changed = [s["record"]["id"] for s in steps if s["do"] == "meta_write"]
    changed += [s["id"] for s in steps if s["do"] == "meta_delete"]
    for step in steps:
        if step["do"] == "state":
            step["changed"] = changed


def _step(do: str, **args) -> dict:
    return {"do": do, **args}


def _meta_write(record: SnapshotRecord) -> dict:
    return _step("meta_write", record=asdict(record))


def _state(current: str | None) -> dict:
    return _step("state", current=current)


class StoreCore:
    """A store: its domains, define and undefine."""

    def __init__(self, root: str, engine: QemuImgEngine | None = None) -> None:
        self.files = StoreFiles(root)
        self.files.ensure()
        self.root = self.files.root
        self.engine = engine or QemuImgEngine()
        self._domains: dict[str, DomainCore] = {}
        # In a mount: its own handler of changes, and its registration (not told twice).
        self.mount_handler: Callable[[str], Awaitable[None]] | None = None
        self.mount_token: str | None = None

    def domain_names(self) -> list[str]:
        return self.files.domain_names()

    def domain(self, name: str) -> DomainCore:
        try:
            validate_name(name, "domain")
        except SnapfsError:
            raise not_found(f"There is no domain named {name!r}.") from None
        files = self.files.domain(name)
        definition = files.definition_id()
        if definition is None:
            self._domains.pop(name, None)
            raise not_found(f"There is no domain named {name!r}.")
        core = self._domains.get(name)
        if core is None or core.definition != definition:
            core = self._domains[name] = DomainCore(files, self.engine, definition, self.changed)
        return core

    async def changed(self, name: str) -> None:
        """Domain `name` changed (or was defined or undefined): every mount drops what its
        kernel holds for it before this returns."""
        if self.mount_handler is not None:
            await self.mount_handler(name)
        await notify.tell_mounts(self.root, name, exclude=self.mount_token)

    async def recover(self) -> None:
        for name in self.domain_names():
            await self.domain(name).recover()

    async def define(
        self,
        name: str,
        disks: list[tuple[str, str, str | None]],
        domain_xml: str | None = None,
        uuid: str | None = None,
    ) -> tuple[DomainCore, list[str]]:
        """Define a domain from (target, image path, format or None) triples.

        A format not given is probed once here and recorded. Returns the domain and the
        messages to show (probed formats, disks left out)."""
        validate_name(name, "domain")
        if not disks:
            raise invalid(f"Domain {name!r} has no disk that snapfs can snapshot.")
        targets = [t for t, _, _ in disks]
        for target in targets:
            validate_name(target, "disk target")
        if len(set(targets)) != len(targets):
            raise invalid(f"Domain {name!r} names a disk target twice.")
        async with self.files.locked():
            if self.files.domain(name).exists():
                raise exists(f"There is already a domain named {name!r}.")
            records, messages = await self._disk_records(disks)
            uuid = uuid or str(uuidlib.uuid4())
            text = domain_xml or xml.minimal_domain_xml(
                name, uuid, [xml.DiskDef(r.target, r.base, r.format) for r in records]
            )
            await self._write_domain(DomainRecord(name, uuid, records), text)
        await self.changed(name)
        return self.domain(name), messages

    async def define_xml(self, text: str | bytes) -> tuple[DomainCore, list[str]]:
        definition, kept = xml.parse_domain_xml(text)
        disks = [(d.target, d.path, d.format) for d in definition.disks]
        if not disks:
            raise invalid(f"Domain {definition.name!r} has no file-backed disk that snapfs can snapshot.")
        core, messages = await self.define(definition.name, disks, kept, definition.uuid)
        return core, messages + [f"{s} (left out of snapshots)" for s in definition.skipped]

    async def _disk_records(self, disks: list[tuple[str, str, str | None]]) -> tuple[list[DiskRecord], list[str]]:
        records, messages = [], []
        for target, path, fmt in disks:
            path = os.path.abspath(path)
            if not os.path.isfile(path):
                raise not_found(f"Disk {target}: image {path} does not exist.")
            if fmt is None:
                fmt = await qemu.probe_format(path)
                messages.append(f"{target}: {path} probed as {fmt}; recorded, and never probed again.")
            if fmt not in BASE_FORMATS:
                raise invalid(f"Disk {target}: format {fmt!r} is not supported; use qcow2 or raw.")
            size = await qemu.virtual_size(path, fmt)
            records.append(DiskRecord(target, path, fmt, size))
        return records, messages

    async def _write_domain(self, record: DomainRecord, text: str) -> None:
        files = self.files.domain(record.name)
        await trio.to_thread.run_sync(shutil.rmtree, files.path, True)  # a define that crashed
        os.makedirs(files.snapshots_dir)
        for disk in record.disks:
            os.makedirs(files.layers_dir(disk.target))
            await self.engine.overlay(files.layer(disk.target, LIVE), disk.base, disk.format, disk.size)
        await trio.to_thread.run_sync(_write_text, files.file("domain.xml"), text)
        await trio.to_thread.run_sync(files.write_state, None)
        await trio.to_thread.run_sync(write_json, files.file("domain.json"), asdict(record))

    async def undefine(self, name: str, remove_snapshots: bool = False) -> None:
        core = self.domain(name)
        try:
            async with self.files.locked(), core.files.locked():
                await core._finish_journal()
                count = len(core.view().snapshots)
                if not remove_snapshots:
                    await self._refuse_undefine_with_data(core, count)
                await trio.to_thread.run_sync(_remove_domain, core.files)
        except SnapfsError as exc:
            if core.files.exists():
                core.record_error("undefine", exc.message)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.changed(name)
        self._domains.pop(name, None)

    @staticmethod
    async def _refuse_undefine_with_data(core: DomainCore, count: int) -> None:
        if count:
            raise busy(f"Domain {core.name!r} has {count} snapshot(s); pass --remove-snapshots to delete them with it.")
        for disk in core.disks:
            if await qemu.top_layer_has_data(core.live_path(disk.target)):
                raise busy(
                    f"Domain {core.name!r} has changes in its live disk {disk.target} that would be lost; "
                    "pass --remove-snapshots to delete them with it."
                )


def _write_text(path: str, text: str) -> None:
    from .store import atomic_write

    atomic_write(path, text.encode("utf-8"))


def _remove_domain(files: DomainFiles) -> None:
    os.unlink(files.file("domain.json"))
    shutil.rmtree(files.path)
