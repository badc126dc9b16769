"""Carrying out a plan step by step, and finishing one that a crash interrupted.

An operation's steps (an engine's file steps and the metadata steps) are written to the
domain's journal and fsynced before the first one runs; progress ("done") is recorded
where re-running the steps since the last record could be wrong (see _must_record). A
crash at any point is finished by the next operation on the domain or the next open of
the store, through the engine the journal names. Fault points for the crash tests and
the job line (what a long step is doing now) are kept here too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .durable import DirSyncs
from .engines import Engine, Progress
from .errors import SnapfsError
from .records import DiskRecord, SnapshotRecord
from .store import DomainFiles

JOB_UPDATE_SECONDS = 0.25
IN_USE_WAIT_SECONDS = float(os.environ.get("SNAPFS_IN_USE_WAIT", "1"))
STEP_BUSY_WAIT_SECONDS = 10.0
CRASH_EXIT_STATUS = 86

# Steps that only rename, create or delete whole files by name, and the names they use.
# Any other step (a commit, a rebase: reading and writing layer data) is heavy.
_LIGHT_STEPS = {"overlay": ("dst",), "rename": ("src", "dst"), "delete": ("path",), "meta_write": (), "meta_delete": ()}


class Journal:
    """One domain's journal (the caller holds the domain's lock for every call)."""

    def __init__(self, files: DomainFiles, disks: list[DiskRecord]) -> None:
        self.files = files
        self.disks = disks

    def pending(self) -> bool:
        return self.files.read_journal() is not None

    async def refuse_unless_ready(self, engine: Engine, steps: list[dict]) -> contextlib.AbstractContextManager:
        """The engine's precondition, before anything is written, and its hold on the
        layers the steps change: the caller keeps it (`with`) until the journal is cleared.
        A reader that holds a layer for a moment (a qemu-img map behind a .changes file) is
        waited for, briefly."""
        held: list[contextlib.AbstractContextManager] = []
        await patiently(lambda: held.append(engine.hold_layers(self.files, steps)), IN_USE_WAIT_SECONDS)
        return held[0]

    async def run(self, operation: str, subject: str, engine: Engine, steps: list[dict]) -> None:
        """Write the journal, then carry it out."""
        name_changed_snapshots(steps)
        journal = {"operation": operation, "subject": subject, "engine": engine.name, "steps": steps, "done": 0}
        await trio.to_thread.run_sync(self.files.write_journal, journal)
        try:
            await self._carry_out(engine, journal, recovering=False)
        except SnapfsError as exc:
            raise SnapfsError(
                exc.errno,
                f"{operation} stopped part-way ({exc.message.rstrip('.')}); it is recorded and will be "
                f"finished by the next operation on domain {self.files.name!r}.",
            ) from exc

    async def finish(self, engine_named: Callable[[str | None], Engine]) -> None:
        """Finish an operation that a crash interrupted, if any."""
        journal = self.files.read_journal()
        if journal is None:
            return
        engine = engine_named(journal.get("engine"))
        with await self.refuse_unless_ready(engine, journal["steps"]):
            await self._carry_out(engine, journal, recovering=True)
        await trio.to_thread.run_sync(self._remove_leftovers, engine.temporary_suffixes)
        self.files.clear_job()

    def _remove_leftovers(self, suffixes: tuple[str, ...]) -> None:
        """Temporary files of the interrupted operation (the engine's files being built,
        atomic writes' .tmp files): never anything a layer needs."""
        for disk in self.disks:
            for entry in os.scandir(self.files.layers_dir(disk.target)):
                if entry.name.endswith(suffixes) or ".tmp" in entry.name:
                    os.unlink(entry.path)
        for entry in os.scandir(self.files.snapshots_dir):
            if ".tmp" in entry.name:
                os.unlink(entry.path)

    async def _carry_out(self, engine: Engine, journal: dict, recovering: bool) -> None:
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
                await self._run_recorded_step(engine, journal, index, recovering, syncs)
            else:
                async with trio.open_nursery() as nursery:
                    for member in group:
                        nursery.start_soon(self._run_recorded_step, engine, journal, member, recovering, syncs)
            index = group[-1] + 1
        await trio.to_thread.run_sync(syncs.flush)
        await trio.to_thread.run_sync(self.files.clear_journal)
        self.files.clear_job()

    async def _run_recorded_step(
        self, engine: Engine, journal: dict, index: int, recovering: bool, syncs: DirSyncs
    ) -> None:
        step = journal["steps"][index]
        point = f"{journal['operation']}:{index}:{step['do']}"
        fault_point(point, "before", recovering)
        async with self._job(journal, index) as progress:
            # A qemu-img reader (a .changes map, an image being opened) may hold a
            # layer for a moment; qemu-img fails at open then, before writing anything.
            run = functools.partial(self._run_step, engine, step, recovering, syncs, progress)
            await patiently(run, STEP_BUSY_WAIT_SECONDS)
        fault_point(point, "after", recovering)

    async def _run_step(
        self, engine: Engine, step: dict, recovering: bool, syncs: DirSyncs, progress: Progress | None
    ) -> None:
        do = step["do"]
        if do == "meta_write":
            await trio.to_thread.run_sync(self.files.write_snapshot, SnapshotRecord.from_json(step["record"]), syncs)
        elif do == "meta_delete":
            await trio.to_thread.run_sync(self.files.delete_snapshot, step["id"], syncs)
        elif do == "state":
            await trio.to_thread.run_sync(self.files.write_state, step["current"], step.get("changed"), syncs)
        else:
            await engine.run(step, self.files, recovering=recovering, syncs=syncs, progress=progress)

    @contextlib.asynccontextmanager
    async def _job(self, journal: dict, index: int) -> AsyncIterator[Progress | None]:
        """Keep the domain's job file saying what runs now ("merge s1: step 3 of 7,
        commit, 42%"), fed by the engine's progress callback, at most a few times a second.

        The file is written in a worker thread by a task of its own: while a commit
        writes gigabytes, a rename on the same filesystem can wait tens of milliseconds,
        and the progress callback runs in the event loop."""
        steps = journal["steps"]
        if steps[index]["do"] in _LIGHT_STEPS or steps[index]["do"] == "state":
            yield None  # light steps report nothing
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

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            report(0.0)
            try:
                yield report
            finally:
                nursery.cancel_scope.cancel()


def operation_naming(files: DomainFiles, paths: list[str]) -> str | None:
    """The unfinished operation of the domain (its journal) whose steps name one of
    `paths`, or None. The journal is written before the first step of an operation and
    removed after the last, and names (relative to the domain directory) every file a
    step writes, renames or deletes; a "backing" is only read."""
    try:
        journal = files.read_journal()
    except (OSError, ValueError):
        return "operation"  # being replaced right now: some operation is running
    if not journal:
        return None
    wanted = {os.path.realpath(path) for path in paths}
    for step in journal.get("steps", ()):
        for key, value in step.items() if isinstance(step, dict) else ():
            if key == "backing" or not isinstance(value, str):
                continue
            if os.path.realpath(os.path.join(files.path, value)) in wanted:
                return str(journal.get("operation", "operation"))
    return None


async def patiently(attempt: Callable[[], Awaitable[None] | None], seconds: float) -> None:
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


def fault_point(point: str, when: str, recovering: bool) -> None:
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
    - a heavy step (commit, rebase, recompress: any step not in _LIGHT_STEPS), and the
      step after one: they read and write layer data along backing chains;
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


def name_changed_snapshots(steps: list[dict]) -> None:
    """Tell the closing state step which snapshot files the plan writes or deletes."""
    changed = [s["record"]["id"] for s in steps if s["do"] == "meta_write"]
    changed += [s["id"] for s in steps if s["do"] == "meta_delete"]
    for step in steps:
        if step["do"] == "state":
            step["changed"] = changed
