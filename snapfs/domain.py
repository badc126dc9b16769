"""One domain's snapshot operations (DESIGN sections 1 and 4) and readings.

An operation takes the domain's lock, finishes a journal a crash left, asks the rules
(rules.py) for a plan of intents, has the engine chosen for the domain turn them into
steps, and runs those through the journal (journal.py). Readings take no lock, and load
neither trio nor lxml unless they need them (the command line's reading verbs start
fast): those modules are imported where they are used.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Awaitable, Callable

from . import prestage, rules
from .durable import free_unlinked
from .errors import SnapfsError, busy, invalid, io_error, not_found, single
from .records import DiskRecord, DomainRecord, MetadataView, SnapshotRecord, has_memory
from .rules import CONTROL_WORDS, DeactivateFlags, Plan
from .store import DomainFiles

TYPE_CHECKING = False  # not typing's: a reading verb does not import typing (issue 16)
if TYPE_CHECKING:
    from . import disk
    from .engines import Engine
    from .journal import Journal


class DomainCore:
    """One domain's snapshot operations (async) and readings (sync, lock-free)."""

    def __init__(
        self,
        files: DomainFiles,
        engine: Engine,
        definition: tuple[int, ...] | None = None,
        changed: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.files = files
        self.engine = engine  # the offline engine; the QMP engine is made per operation
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
        return rules.get(view or self.view(), snap_id, self.name)

    def lookup(self, name: str, view: MetadataView | None = None) -> SnapshotRecord:
        found = (view or self.view()).by_name(name)
        if found is None:
            raise not_found(f"Domain {self.name!r} has no snapshot named {name!r}.")
        return found

    def layer_path(self, target: str, snap_id: str, view: MetadataView | None = None) -> str:
        """The real path of L(S) on disk `target`."""
        return self.files.snapshot_layer(self.get(snap_id, view), target)

    def live_path(self, target: str) -> str:
        """The live layer's stable path (a symlink to its real file): what the domain XML names."""
        return self.files.live_link(target)

    def live_file(self, target: str) -> str:
        """The real path of the live layer of disk `target` (what QEMU must be handed)."""
        return self.files.live_layer(self.view(), target)

    def domain_xml(self) -> str:
        from . import xml

        live = {d.target: self.live_path(d.target) for d in self.disks}
        return xml.domain_xml_on_layers(self.files.original_xml(), live)

    def snapshot_xml(self, snap_id: str) -> str:
        from . import xml

        view = self.view()
        snap = self.get(snap_id, view)
        parent = view.snapshots.get(snap.parent) if snap.parent else None
        layers = {d.target: self.files.snapshot_layer(snap, d.target) for d in self.disks}
        return xml.snapshot_xml(
            name=snap.name,
            description=snap.description,
            state=snap.state,
            creation_time=snap.creation_time,
            parent_name=parent.name if parent else None,
            domain=xml.domain_xml_on_layers(self.files.original_xml(), layers),
            compression=snap.compression,
            disks=list(layers.items()),
            memory=self.files.memory(snap.id) if has_memory(snap) else None,
        )

    def last_error(self) -> str:
        return self.files.last_error()

    def job(self) -> str:
        """What a long operation on this domain is doing now (any process), or ''."""
        return self.files.job()

    def operation_naming(self, paths: list[str]) -> str | None:
        """The unfinished operation (any process) that writes, moves or deletes one of
        `paths`, or None."""
        from .journal import operation_naming

        return operation_naming(self.files, paths)

    async def open_disk(self, snap_id: str, target: str) -> disk.SnapshotDisk:
        """Snapshot `snap_id`'s disk `target` as bytes, open until close() (disk.py)."""
        from . import disk

        return await disk.open_disk(self, snap_id, target)

    async def disk_changes(self, snap_id: str, target: str, whole: bool = False) -> list[dict]:
        """The extents L(S) of disk `target` holds against its backing, or with `whole`
        those of S's whole image that hold data (disk.py)."""
        from . import disk

        return await disk.changes(self, snap_id, target, whole)

    def record_error(self, operation: str, message: str) -> None:
        self.files.record_error(operation, message)

    # ---- operations -----------------------------------------------------------------
    async def create(
        self,
        name: str | None = None,
        description: str | None = None,
        compression: str | None = None,
        disk_only: bool = False,
    ) -> SnapshotRecord:
        """A snapshot of every disk; of a running domain with its memory too unless
        `disk_only`, as virsh does (engines/memory.py)."""
        from . import runtime
        from .engines import memory
        from .engines.qmp import QmpEngine

        state_now = None if disk_only else await runtime.state(self.files)
        paused = state_now is not None and state_now[0] is runtime.State.PAUSED
        never_ran = state_now == (runtime.State.PAUSED, runtime.PAUSED_STARTING_UP)

        def plan(view: MetadataView, engine: Engine) -> Plan:
            now = int(time.time())
            with_memory = engine.name == QmpEngine.name and not disk_only
            if with_memory and never_ran:  # QEMU 7.2 dies migrating from prelaunch
                raise busy(
                    f"Domain {self.name!r} has not run yet (QEMU waits to start the guest), so it has no memory "
                    "to save: take a disk-only snapshot, or let the guest run first."
                )
            state = ("paused" if paused else "running") if with_memory else engine.snapshot_state()
            made = rules.plan_create(view, self.name, name, description, compression, state=state, now=now)
            if with_memory:
                memory.mark_memory_create(made, self.files, paused)
            return made

        return await self._operate("create", plan)

    async def create_from_xml(
        self, text: str | bytes, compress: str | None = None, disk_only: bool = False
    ) -> SnapshotRecord:
        from . import xml

        try:
            request = xml.parse_snapshot_request(text)
        except SnapfsError as exc:
            self.record_error("create", exc.message)
            raise
        disk_only = disk_only or request.disk_only
        return await self.create(request.name, request.description, request.compression or compress, disk_only)

    async def revert(self, snap_id: str, start: bool | None = None) -> None:
        """Revert to a snapshot; a running domain's QEMU is restarted on it (engines/memory.py).
        `start`: True (--running), False (--paused), None (as the snapshot was)."""
        from . import runtime
        from .engines import memory
        from .engines.qmp import QmpEngine

        attached = os.path.islink(runtime.RunFiles.of(self.files).attached)

        def plan(view: MetadataView, engine: Engine) -> Plan:
            made = rules.plan_revert(view, self.name, snap_id)
            return memory.plan_revert_running(
                made, view, self.files, snap_id, engine.name == QmpEngine.name, attached, start
            )

        def engine_for(engine: Engine, view: MetadataView) -> Engine:
            wanted = memory.needs_qemu(view, self.files, snap_id, start)
            return QmpEngine(None, self.engine, self.name) if engine is self.engine and wanted else engine

        await self._operate("revert", plan, engine_for)

    async def merge(self, snap_id: str) -> None:
        await self._operate("merge", lambda view, _: rules.plan_merge(view, self.name, snap_id))

    async def discard(self, snap_id: str) -> None:
        await self._operate("discard", lambda view, _: rules.plan_discard(view, self.name, snap_id))

    async def discard_force(self, snap_id: str) -> None:
        await self._operate("discard-force", lambda view, _: rules.plan_discard_force(view, self.name, snap_id))

    async def deactivate_only(self, snap_id: str) -> None:
        await self._operate("deactivate", lambda view, _: rules.plan_deactivate(view, self.name, snap_id))

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
        await self._operate("rename", lambda view, _: rules.plan_rename(view, self.name, snap_id, new_name))

    async def set_description(self, snap_id: str, text: str) -> None:
        await self._operate("description", lambda view, _: rules.plan_description(view, self.name, snap_id, text))

    async def set_compression(self, snap_id: str, kind: str) -> None:
        await self._operate("compression", lambda view, _: rules.plan_compression(view, self.name, snap_id, kind))

    # ---- carrying out -----------------------------------------------------------------
    async def _engine(self) -> Engine:
        """The engine for an operation now: the QMP engine while the domain runs (its QMP
        socket answers), else the offline qemu-img engine."""
        from .engines.qmp import QmpEngine

        socket = self._socket()
        running = await QmpEngine.if_running(socket, self.engine, self.name) if socket else None
        return running or self.engine

    def _socket(self) -> str | None:
        from . import runtime

        return runtime.qmp_socket(self.files)

    def _engine_named(self, name: str | None) -> Engine:
        """The engine that wrote a journal (None: a journal from before engines had names).
        The QMP engine finishes its steps whether QEMU still runs or not."""
        if name is None or name == self.engine.name:
            return self.engine
        if name == "qmp":
            from .engines.qmp import QmpEngine

            return QmpEngine(self._socket(), self.engine, self.name)
        raise io_error(f"The journal of domain {self.name!r} was written by engine {name!r}, which is not here.")

    async def _carry_over(self, needed: bool | None = None) -> None:
        """Give an old-layout domain the layout of DESIGN section 8 (store.py), then check
        that every live layer's stable name leads to the real file the state names. The
        caller holds the lock, and no journal is pending; `needed`: whether it needs it,
        if the caller already asked (in a thread hop it made anyway)."""
        import trio

        targets = [d.target for d in self.disks]
        if needed is None:
            needed = await trio.to_thread.run_sync(self.files.needs_carry_over, targets)
        if needed:
            await trio.to_thread.run_sync(self.files.carry_over, targets)
        self.files.check_live_links(self.view())

    def _tidy(self, pending: bool) -> bool | None:
        """Remove the temporaries an earlier operation left (every directory when a journal
        is `pending`), and say whether the domain needs carrying over (None: ask after the
        journal is finished). One thread hop for both."""
        self.files.remove_temporaries(self.engine.temporary_suffixes, pending)
        return None if pending else self.files.needs_carry_over([d.target for d in self.disks])

    def journal(self) -> Journal:
        from .journal import Journal

        return Journal(self.files, self.disks)

    async def finish_journal(self, crashed_only: bool = False) -> None:
        """Finish an operation that a crash interrupted (the caller holds the lock);
        `crashed_only`: not one that failed (its journal says so), which waits for the
        next change on the domain."""
        try:
            await self.journal().finish(self._engine_named, crashed_only)
        finally:
            free_unlinked()  # the blocks of the layers it deleted (the caller's next steps are quick)

    async def _operate(
        self,
        operation: str,
        planner: Callable[[MetadataView, Engine], Plan],
        engine_for: Callable[[Engine, MetadataView], Engine] | None = None,
    ):
        """Every change: lock, tidy and finish what an earlier operation left, plan, run.
        Every failure leaves one SnapfsError (or the interruption itself), last-error
        written and the job line cleared: the core's edge, where trio's exception groups
        end."""
        import trio

        from . import engines
        from .engines import memory

        changed = False  # set before anything is written: a failure part-way is news too
        done = False
        chosen = engine = None
        try:
            async with self.files.locked():
                try:
                    journal = self.journal()
                    changed = journal.pending()
                    needed = await trio.to_thread.run_sync(self._tidy, changed)
                    await journal.finish(self._engine_named)
                    await self._carry_over(needed)
                    engine = chosen = await self._engine()
                    if engine_for is not None:
                        engine = engine_for(engine, self.view())
                    plan = planner(self.view(), engine)
                    steps = [step for intent in plan.intents for step in engine.steps(intent, self.files, self.disks)]
                    steps = memory.with_memory_deletes(self.view(), self.files, steps)
                    if steps:
                        with await self._refuse_unless_ready(journal, engine, steps):  # the layers stay held
                            changed = True
                            await journal.run(operation, plan.subject, engine, steps, self.files.remember_clean)
                    done = bool(steps)
                    return plan.result
                except BaseException:
                    self.files.forget_clean()
                    raise
                finally:
                    with trio.CancelScope(shield=True):
                        await engines.let_go(chosen, engine)  # QEMU's one QMP client slot, free again
                    self.files.clear_job()  # the job line is the lock holder's
        except BaseException as caught:
            failure = self._failed(operation, caught)
            raise failure  # noqa: B904  (the failure keeps its own cause)
        finally:
            free_unlinked()  # the blocks of the layers it deleted, freed off this call's path
            if done:  # durable and unlocked: the next live layers are made ahead, off this call's path
                prestage.start(self.files.path)
            if changed:
                await self.tell_changed()

    async def _refuse_unless_ready(self, journal: Journal, engine: Engine, steps: list[dict]):
        """The journal's hold on the layers; a layer the offline engine finds held because
        the domain runs after all (its QEMU did not answer snapfs) is refused with a sentence
        that says so."""
        from . import runtime

        try:
            return await journal.refuse_unless_ready(engine, steps)
        except SnapfsError as exc:
            if engine is self.engine:
                await runtime.refuse_if_running(self, exc)
            raise

    def _failed(self, operation: str, caught: BaseException) -> BaseException:
        """The one exception a failed operation raises, its sentence in last-error."""
        import trio

        exc = single(caught)
        if isinstance(exc, SnapfsError):
            self.record_error(operation, exc.message)
            return exc
        if isinstance(exc, (KeyboardInterrupt, trio.Cancelled)):
            self.record_error(operation, f"{operation} was interrupted; the next change on the domain finishes it.")
            return exc
        if isinstance(exc, Exception):
            message = f"{operation} failed unexpectedly: {type(exc).__name__}: {exc}"
            self.record_error(operation, message)
            error = io_error(message)
            error.__cause__ = exc
            return error
        return exc

    def health(self) -> str | None:
        """Why the domain cannot be used (a corrupt metadata file), or what it is waiting
        for (an operation that did not finish), in a few words; None when all is well."""
        try:
            self.record()
            self.view()
            journal = self.files.read_journal()
        except SnapfsError as exc:
            path = getattr(exc, "path", None)
            return f"broken: {os.path.basename(path)} is corrupt" if path else f"broken: {exc.message}"
        if journal is not None:
            what = f"unfinished {journal['operation']} {journal.get('subject') or ''}".rstrip()
            return f"{what}: {journal['failed']}" if journal.get("failed") else what
        if self.files.needs_carry_over([d.target for d in self.disks]):
            return "old layout: carried over by the next change once its live disks are free"
        return None

    def _old_layout(self) -> bool:
        """Whether the domain still has the layout from before DESIGN section 8; False
        when its metadata cannot be read (a change on it says why)."""
        try:
            return self.files.needs_carry_over([d.target for d in self.disks])
        except SnapfsError:
            return False

    async def _recover_layout(self) -> None:
        """Carry an old-layout domain over when its journal is done; a live layer in use
        leaves it for later, said in last-error (and health)."""
        if self.files.read_journal() is not None:
            return
        try:
            await self._carry_over()
        except SnapfsError as exc:
            if exc.errno != errno.EBUSY:
                raise
            self.record_error("recover", exc.message)

    async def tell_changed(self) -> None:
        """Tell the store's subscribers that the domain changed; never with the lock held
        (a subscriber may be serving a request that waits for it)."""
        if self._changed is not None:
            import trio

            with trio.CancelScope(shield=True):
                await self._changed(self.name)

    async def recover(self) -> None:
        """Finish an operation a crash interrupted (not one that failed: that is left to
        the next change on the domain), if the domain is free now. A journal
        whose lock is held belongs to an operation still running in a live process (a
        crashed process's flock is gone), so that domain is left to it. A failure is
        written to last-error, not raised: one domain never stops another's recovery."""
        try:
            journal = self.files.read_journal()
            if journal is not None and journal.get("failed"):
                return
            if journal is None and not self._old_layout():
                return
            async with self.files.locked(wait=0):
                try:
                    await self.finish_journal(crashed_only=True)
                    await self._recover_layout()
                finally:
                    self.files.clear_job()
        except BaseException as caught:
            exc = single(caught)
            if not isinstance(exc, Exception):
                raise exc  # noqa: B904
            if not (isinstance(exc, SnapfsError) and exc.errno == errno.EBUSY):
                self.record_error("recover", exc.message if isinstance(exc, SnapfsError) else repr(exc))
                await self.tell_changed()  # it may have got part of the way
            return
        await self.tell_changed()
