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
from .engines import Engine, Progress, let_go, memory
from .errors import SnapfsError, single
from .records import DiskRecord, SnapshotRecord
from .store import DomainFiles

JOB_UPDATE_SECONDS = 0.25
IN_USE_WAIT_SECONDS = float(os.environ.get("SNAPFS_IN_USE_WAIT", "1"))
STEP_BUSY_WAIT_SECONDS = 10.0
CRASH_EXIT_STATUS = 86

# Steps that only rename, create or delete whole files by name, and the names they use.
# Any other step (a commit, a rebase: reading and writing layer data) is heavy.
_LIGHT_STEPS = {
    "overlay": ("dst",),
    "rename": ("src", "dst"),
    "delete": ("path",),
    "link": ("path",),
    "meta_write": (),
    "meta_delete": (),
    "memory_delete": ("path",),
}
# Steps that change no file and may run again after any light step before them, or with any
# light step after them already done, so they need no record around them: a live create's
# `switch` (engines/qmp.py) finds the disks on their new overlays and does nothing (or, QEMU
# gone, only checks nothing holds the old live layers), and the overlays before it keep the
# files they find, which the switch handed to QEMU and the guest may have written.
_RERUNNABLE_STEPS = ("switch",)


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

    async def run(
        self,
        operation: str,
        subject: str,
        engine: Engine,
        steps: list[dict],
        when_done: Callable[[], None] | None = None,
    ) -> None:
        """Check the space the steps need, write the journal, then carry it out. A plan
        that fails before it changed any content is rolled back (no journal is left).
        `when_done` runs in the thread that clears the journal, right after it."""
        name_changed_snapshots(steps)
        await self.refuse_without_space(steps)
        journal = {"operation": operation, "subject": subject, "engine": engine.name, "steps": steps, "done": 0}
        try:
            await trio.to_thread.run_sync(self.files.write_journal, journal)
        except OSError as exc:  # the temporary is gone (atomic_write): nothing was recorded
            raise SnapfsError(
                exc.errno or errno.EIO, f"{operation} was not started: cannot record it ({exc.strerror})."
            ) from exc
        progress = [0]
        try:
            await self._carry_out(engine, journal, recovering=False, reached=progress, when_done=when_done)
        except Exception as exc:
            cause = as_snapfs_error(exc)
            if _abortable(steps, progress[0]):
                await self._roll_back(engine)
                raise SnapfsError(
                    cause.errno,
                    f"{operation} failed and was undone, nothing changed ({cause.message.rstrip('.')}); "
                    f"{remedy(cause.errno)}, then try again.",
                ) from exc
            await self._mark_failed(journal, cause)
            raise SnapfsError(
                cause.errno,
                f"{operation} stopped part-way ({cause.message.rstrip('.')}); it is recorded, and the next change "
                f"on domain {self.files.name!r} finishes it once you {remedy(cause.errno)}.",
            ) from exc

    async def _mark_failed(self, journal: dict, cause: SnapfsError) -> None:
        """Note in the journal that its operation failed (rather than being cut short by a
        crash), so opening the store leaves it to the next change on the domain instead
        of running it again. Best effort: on a full filesystem the note may not fit."""
        journal["failed"] = cause.message
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await trio.to_thread.run_sync(self.files.write_journal, journal)

    async def _roll_back(self, engine: Engine) -> None:
        """Undo a plan that changed no content: its temporary files and its journal go."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.files.remove_temporaries, engine.temporary_suffixes)
            await trio.to_thread.run_sync(self.files.clear_journal)
            self.files.clear_job()

    async def refuse_without_space(self, steps: list[dict], recovering: bool = False) -> None:
        """ENOSPC, with what is needed and what is free, when the steps' heavy work cannot
        fit in the store's filesystem (an estimate from the layers' allocated sizes).
        SNAPFS_SPACE_CHECK=0 (tests) skips it before an operation, not in recovery."""
        if not recovering and os.environ.get("SNAPFS_SPACE_CHECK", "1") == "0":
            return
        if not any(step["do"] in _SPACE_TAKING_STEPS for step in steps):
            return  # light plans (a create, a revert) need no estimate, nor a thread to make it
        needed = await trio.to_thread.run_sync(space_needed, self.files, steps)
        if not needed:
            return
        st = await trio.to_thread.run_sync(os.statvfs, self.files.path)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise SnapfsError(
                errno.ENOSPC,
                f"Not enough space on the store's filesystem for this on domain {self.files.name!r}: it needs about "
                f"{_mib(needed)} and {_mib(free)} is free; free some space (or discard a snapshot) and try again.",
            )

    async def finish(self, engine_named: Callable[[str | None], Engine], crashed_only: bool = False) -> None:
        """Finish an operation that a crash or a failure interrupted, if any; if it cannot
        finish now, one sentence with the cause and the remedy (the journal stays).
        `crashed_only` (opening the store): leave one that failed to the next change."""
        journal = self.files.read_journal()
        if journal is None or (crashed_only and journal.get("failed")):
            return
        engine = engine_named(journal.get("engine"))
        try:
            with await self.refuse_unless_ready(engine, journal["steps"]):
                await self._carry_out(engine, journal, recovering=True)
        except Exception as exc:
            cause = as_snapfs_error(exc)
            await self._mark_failed(journal, cause)
            what = f"{journal['operation']} {journal.get('subject') or ''}".rstrip()
            raise SnapfsError(
                cause.errno,
                f"Domain {self.files.name!r} has an unfinished {what} that cannot finish now "
                f"({cause.message.rstrip('.')}); {remedy(cause.errno)}, and the next change on the domain "
                "finishes it. Until then changes are refused; reading works.",
            ) from exc
        finally:
            with trio.CancelScope(shield=True):
                await let_go(engine)
            self.files.clear_job()
        await trio.to_thread.run_sync(self.files.remove_temporaries, engine.temporary_suffixes)

    async def _carry_out(
        self,
        engine: Engine,
        journal: dict,
        recovering: bool,
        reached: list[int] | None = None,
        when_done: Callable[[], None] | None = None,
    ) -> None:
        """Run the steps from journal["done"] on. Progress is recorded (after an fsync of
        every directory the unrecorded steps changed) only where re-running the steps
        since the last record could be wrong: see _must_record. Overlays that need no
        record between them (one per disk, in a create or a revert) run side by side, and so do links.
        `reached[0]` is kept at the index of the step running now."""
        steps = journal["steps"]
        syncs = DirSyncs()
        index = journal["done"]
        while index < len(steps):
            if _must_record(steps, journal["done"], index):
                journal["done"] = index
                await trio.to_thread.run_sync(_after_flush, syncs, self.files.write_journal, journal)
            elif steps[index]["do"] in _RERUNNABLE_STEPS and syncs.dirs:
                # The overlays a switch hands to QEMU are durable first (a power cut must not
                # bring back their staged names, with guest data); state flushes in its own step.
                await trio.to_thread.run_sync(syncs.flush)
            if reached is not None:
                reached[0] = index
            group = _side_by_side(steps, journal["done"], index)
            if len(group) == 1:
                await self._run_recorded_step(engine, journal, index, recovering, syncs)
            else:
                async with open_nursery() as nursery:
                    for member in group:
                        nursery.start_soon(self._run_recorded_step, engine, journal, member, recovering, syncs)
            index = group[-1] + 1
        # The removal is not fsynced: lost to a power cut, it is a crash after the last step
        # (recovery re-runs the steps since the last record, each finding its work done), and
        # the next change's journal write fsyncs this directory before anything else.
        await trio.to_thread.run_sync(_after_flush, syncs, self._clear, when_done)
        self.files.clear_job()

    def _clear(self, when_done: Callable[[], None] | None) -> None:
        self.files.clear_journal(False)
        if when_done is not None:
            when_done()

    async def _run_recorded_step(
        self, engine: Engine, journal: dict, index: int, recovering: bool, syncs: DirSyncs
    ) -> None:
        step = journal["steps"][index]
        point = f"{journal['operation']}:{index}:{step['do']}"
        fault_point(point, "before", recovering)
        if recovering:
            await self.refuse_without_space([step], recovering=True)
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
        elif do == "memory_delete":
            await memory.delete_memory(self.files, step["path"])
        elif do == "state":
            # What state.json names is made durable first (the directories the steps since
            # the last record changed), in the same thread hop as the state's write.
            live = step.get("live")
            args = (step["current"], step.get("changed"), syncs, live)
            await trio.to_thread.run_sync(_after_flush, syncs, self.files.write_state, *args)
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
        if _is_light(steps[index]) or steps[index]["do"] == "state":
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

        async with open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            report(0.0)
            try:
                yield report
            finally:
                nursery.cancel_scope.cancel()


def _after_flush(syncs: DirSyncs, then: Callable[..., None], *args: object) -> None:
    """fsync the directories `syncs` holds, then call then(*args): one thread hop for both
    (each hop waits for a scheduler slot, several milliseconds on a loaded machine)."""
    syncs.flush()
    then(*args)


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """trio.open_nursery, raising the one exception a failure stands for instead of the
    ExceptionGroup trio wraps it in (errors.single), so callers can catch SnapfsError."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise single(group)  # noqa: B904  (the leaf keeps its own traceback and cause)


def as_snapfs_error(exc: BaseException) -> SnapfsError:
    """A failure as a SnapfsError (an OSError keeps its errno)."""
    if isinstance(exc, SnapfsError):
        return exc
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return SnapfsError(exc.errno or errno.EIO, f"{exc.strerror or exc}{where}")
    return SnapfsError(errno.EIO, f"{type(exc).__name__}: {exc}")


def remedy(err: int) -> str:
    """What the user can do about a failure with this errno (a clause)."""
    return {
        errno.ENOSPC: "free space on the store's filesystem",
        errno.EDQUOT: "free space on the store's filesystem",
        errno.ENOENT: "put the missing file back where it was",
        errno.EBUSY: "stop the process that uses the image",
        errno.EACCES: "give snapfs access to the file",
        errno.EPERM: "give snapfs access to the file",
    }.get(err, "fix the cause")


def _abortable(steps: list[dict], failed: int) -> bool:
    """Whether a plan that failed at step `failed` changed no content, so it can be undone
    by removing its temporaries and its journal: every step up to the failed one rebuilds
    a layer under a temporary name and renames it over the layer only once it reads the
    same (a recompression)."""
    return all(step["do"] in _CONTENT_KEEPING_STEPS for step in steps[: failed + 1])


# Steps that leave every layer's content as it was, done or not (qemu_img.py's
# _replace_checked): a plan made of these alone is undone, not finished.
_CONTENT_KEEPING_STEPS = {"recompress"}


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _qcow2_backing(path: str) -> str | None:
    """The backing link in a qcow2 header (offset 8: its offset, 16: its length)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset, length = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
            if not offset or not length or length > 4096:
                return None
            f.seek(offset)
            return f.read(length).decode(errors="replace")
    except OSError:
        return None


def _skipped(layer: str, onto: str) -> int:
    """Allocated bytes of the in-store layers between `layer` and its new backing `onto`:
    what a safe rebase copies into it."""
    total, directory, seen = 0, os.path.dirname(layer), set()
    link = _qcow2_backing(layer)
    while link and link != onto and not os.path.isabs(link) and link not in seen:
        seen.add(link)
        path = os.path.join(directory, link)
        total += _allocated(path)
        link = _qcow2_backing(path)
    return total


_SPACE_TAKING_STEPS = ("commit", "stream", "rebase", "recompress")  # what space_needed counts


def space_needed(files: DomainFiles, steps: list[dict]) -> int:
    """Bytes the heavy steps may need at most: what they add to layers, plus the largest
    temporary copy one of them builds (they run one after another), plus 1% and 4 MiB
    for qcow2 metadata. Light steps need next to nothing."""
    growth, largest = 0, 0
    for step in steps:
        do = step["do"]
        if do == "commit":
            growth += _allocated(files.file(step["top"]))
        elif do == "stream":  # a live merge: S's data goes into the dependent QEMU runs on
            growth += _allocated(files.file(step["from"]))
        elif do == "pull":  # in place: S's data goes into the dependent, no copy of it
            growth += _skipped(files.file(step["layer"]), step["backing"])
        elif do == "rebase":
            layer = files.file(step["layer"])
            growth += _skipped(layer, step["backing"])
            largest = max(largest, _allocated(layer))
        elif do == "recompress":
            largest = max(largest, _allocated(files.file(step["layer"])))
    if not growth and not largest:
        return 0
    return (growth + largest) * 101 // 100 + 4 * 1024 * 1024


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MiB"


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


def _is_light(step: dict) -> bool:
    return step["do"] in _LIGHT_STEPS or step["do"] in _RERUNNABLE_STEPS


def _step_names(step: dict) -> set[str]:
    """The names (layer paths, snapshot metadata files) a light step reads or writes (none
    for a re-runnable step: it writes no file, and what it finds done it leaves)."""
    if step["do"] in _RERUNNABLE_STEPS:
        return set()
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
      new, empty live over the snapshot's layer).
    A re-runnable step (_RERUNNABLE_STEPS, a live create's switch) counts as light on no
    name: the overlays before it keep what they find, and it finds its work done.
    The state step needs no record after an overlay: once state.json shows the result the
    live disk may be used, and a re-run overlay keeps the overlay it finds (qemu_img.py),
    so nothing written to it is dropped; the directories are fsynced before it (_carry_out).
    """
    if index == done:
        return False
    window = steps[done : index + 1]
    if not all(_is_light(step) for step in window[:-1]):
        return True
    if steps[index]["do"] == "state":
        return False
    if not _is_light(steps[index]):
        return True
    seen: set[str] = set()
    for step in window:
        names = _step_names(step)
        if names & seen:
            return True
        seen |= names
    return False


# Steps of which a run (one per disk) may go side by side, each a thread hop of its own.
_SIDE_BY_SIDE = ("overlay", "link")


def _side_by_side(steps: list[dict], done: int, index: int) -> list[int]:
    """Step `index` and the steps of its kind right after it that may run at the same time:
    a run of overlay (or link) steps with no record needed between them (so on pairwise
    different files, each depending only on its own name: a crash part-way re-runs them all)."""
    group = [index]
    kind = steps[index]["do"]
    if kind not in _SIDE_BY_SIDE:
        return group
    for following in range(index + 1, len(steps)):
        if steps[following]["do"] != kind or _must_record(steps, done, following):
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
