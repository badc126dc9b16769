"""Memory snapshots and reverts of a running domain (DESIGN section 8, "With memory", revert).

Steps of the QMP engine (engines/qmp.py runs them; each idempotent, each journalled):

    switch_memory  the guest stopped, every disk switched to its new overlay in one
                   transaction, its memory saved by a `background-snapshot` migration to
                   `exec:dd of=<id>.part` (QEMU resumes the guest itself once the device
                   state is out; RAM follows in the background), `<id>.part` renamed to
                   `memory/<id>` once complete. QEMU gone part-way: the memory is lost, the
                   snapshot becomes disk-only (its disks are right: see engines/qmp.py).
    qmp_quit       a revert ends the domain's QEMU (live changes are dropped, as in every revert).
    qmp_resume     QEMU started again on the new live layers with the recorded arguments:
                   with memory `-incoming defer -S`, `migrate-incoming "exec:cat FILE"`,
                   then `cont` unless the guest should stay paused; without, a boot.

QEMU 7.2 has no file: migration URI; `exec:` hands the stream to a shell command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from .. import qmp, runtime
from ..durable import fsync_dir, fsync_file, read_json, unlink_if_present
from ..errors import SnapfsError, io_error
from ..records import SnapshotRecord, has_memory
from ..store import DomainFiles

if TYPE_CHECKING:
    from .qmp import QmpEngine

PART = ".part"
MIGRATION_TIMEOUT = float(os.environ.get("SNAPFS_MIGRATION_TIMEOUT", "600"))
POLL_SECONDS = 0.02
RUNNING_MIGRATION = ("setup", "active", "device", "pre-switchover", "postcopy-active", "wait-unplug")


def memory_rel(files: DomainFiles, snap_id: str) -> str:
    """A snapshot's memory file, relative to the domain directory (as steps name files)."""
    return os.path.relpath(files.memory(snap_id), files.path)


# ---- memory snapshot ------------------------------------------------------------------------


async def switch_memory(engine: QmpEngine, step: dict, files: DomainFiles) -> None:
    final = os.path.abspath(files.file(step["memory"]))
    part = final + PART
    if os.path.exists(final):
        return  # saved and renamed before a crash
    await trio.to_thread.run_sync(_make_memory_dir, files)
    async with engine._session() as q:
        if q is None:
            await engine._refuse_if_held([os.path.abspath(files.file(d["active"])) for d in step["disks"]])
            await _without_memory(files, step, part)
            return
        migration = (await q.execute("query-migrate")).get("status")
        started = migration in RUNNING_MIGRATION or (migration == "completed" and os.path.exists(part))
        if not started:
            status = (await q.execute("query-status"))["status"]
            switched = await _switched(q, step, files)
            if switched and status != "paused":
                await _without_memory(files, step, part)  # the guest ran on after the switch
                return
            await _capabilities(q)
            if status == "running":
                await q.execute("stop")
            if not switched:
                await _transaction(q, step, files)
            await trio.to_thread.run_sync(unlink_if_present, part)
            await q.execute("migrate", uri="exec:" + shlex.join(["dd", f"of={part}", "bs=1M", "status=none"]))
        ok = await _wait_migration(q)
        if ok and not step.get("resume", True):
            await q.execute("stop")  # QEMU resumes the guest it saved; a paused one stays paused
    if not ok:
        await _without_memory(files, step, part)
        return
    await _wait_writer_gone(part)
    await trio.to_thread.run_sync(_install_memory, part, final)


async def _capabilities(q: qmp.QMP) -> None:
    caps = [{"capability": c, "state": True} for c in ("events", "background-snapshot")]
    await q.execute("migrate-set-capabilities", capabilities=caps)


async def _switched(q: qmp.QMP, step: dict, files: DomainFiles) -> bool:
    from .qmp import active_nodes, block_nodes, nodes_on

    nodes, active = await block_nodes(q), await active_nodes(q)
    on_new = [any(n.name in active for n in nodes_on(nodes, _abs(files, d["overlay"]))) for d in step["disks"]]
    if any(on_new) and not all(on_new):
        raise io_error(f"QEMU runs only some disks of {files.name!r} on their new overlays; stop it and retry.")
    return all(on_new)


async def _transaction(q: qmp.QMP, step: dict, files: DomainFiles) -> None:
    from .qmp import active_nodes, block_nodes, node_name, nodes_on

    nodes, active = await block_nodes(q), await active_nodes(q)
    actions = []
    for disk in step["disks"]:
        old = _abs(files, disk["active"])
        current = [n for n in nodes_on(nodes, old) if n.name in active]
        if not current:
            raise io_error(f"QEMU does not run disk {disk['target']} of {files.name!r} on its live layer {old}.")
        overlay = node_name(_abs(files, disk["overlay"]))
        actions.append({"type": "blockdev-snapshot", "data": {"node": current[0].name, "overlay": overlay}})
    await q.execute("transaction", actions=actions)


async def _wait_migration(q: qmp.QMP) -> bool:
    """Until QEMU's migration ends: True when it completed."""
    with trio.move_on_after(MIGRATION_TIMEOUT):
        while True:
            status = (await q.execute("query-migrate")).get("status")
            if status == "completed":
                return True
            if status not in RUNNING_MIGRATION:
                return False
            await trio.sleep(POLL_SECONDS)
    await q.execute("migrate_cancel")
    raise SnapfsError(errno.ETIMEDOUT, f"QEMU did not save the guest's memory within {MIGRATION_TIMEOUT:g} s.")


async def _wait_writer_gone(part: str) -> None:
    """QEMU reports the migration complete once it closed its end of the pipe; the dd behind
    it may still be writing: wait until no process names the file on its command line."""
    needle = os.fsencode("of=" + part) + b"\0"
    with trio.move_on_after(60):
        while await trio.to_thread.run_sync(_writers, needle):
            await trio.sleep(POLL_SECONDS)
        return
    raise io_error(f"The process writing {part} did not finish.")


def _writers(needle: bytes) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle in f.read():
                        return True
    return False


def _install_memory(part: str, final: str) -> None:
    fsync_file(part)
    os.chmod(part, 0o400)
    os.rename(part, final)
    fsync_dir(os.path.dirname(final))


def _make_memory_dir(files: DomainFiles) -> None:
    if not os.path.isdir(files.memory_dir):
        os.makedirs(files.memory_dir, mode=0o700, exist_ok=True)
        fsync_dir(files.path)


async def _without_memory(files: DomainFiles, step: dict, part: str) -> None:
    """The memory could not be saved from the switch's instant: the snapshot is disk-only."""

    def write() -> None:
        unlink_if_present(part)
        view = files.view()
        record = view.snapshots.get(step["snap"])
        if record is None:
            with contextlib.suppress(FileNotFoundError):  # written by this plan, not in the state yet
                record = SnapshotRecord.from_json(read_json(files._snapshot_file(step["snap"])))
        if record is not None and has_memory(record):
            files.write_snapshot(replace(record, state="disk-snapshot"))

    await trio.to_thread.run_sync(write)


def _abs(files: DomainFiles, name: str) -> str:
    return os.path.abspath(files.file(name))


# ---- revert ---------------------------------------------------------------------------------


class _Domain:
    """What runtime's QEMU command line needs of a domain (the engine has its files only)."""

    def __init__(self, files: DomainFiles) -> None:
        self.files, self.name = files, files.name

    def record(self) -> Any:
        return self.files.record()

    def view(self) -> Any:
        return self.files.view()


async def quit_qemu(files: DomainFiles) -> None:
    """End the domain's QEMU (snapfs started it: a revert of an attached one is refused)."""
    run = runtime.RunFiles.of(files)
    if os.path.exists(run.qmp) and await runtime._probe(run.qmp) is not None:
        await runtime._quit(_Domain(files), run.qmp, await runtime._peer_pid(run.qmp))  # type: ignore[arg-type]
    runtime._forget(run, "snapshot")


async def resume(files: DomainFiles, step: dict) -> None:
    """QEMU on the new live layers: the memory loaded (step["memory"]) or booted; running
    unless step["run"] is false. A QEMU already there is the one this step started."""
    run = runtime.RunFiles.of(files)
    memory = os.path.abspath(files.file(step["memory"])) if step.get("memory") else None
    status = await runtime._probe(run.qmp) if os.path.exists(run.qmp) else None
    if status is None:
        extra = ["-incoming", "defer", "-S"] if memory else ([] if step.get("run", True) else ["-S"])
        user = runtime.recorded_args(files)
        runtime._clear_stale(run)
        os.makedirs(run.dir, mode=0o700, exist_ok=True)
        await runtime._launch(runtime._command(_Domain(files), run, user + extra), run)  # type: ignore[arg-type]
        runtime._unlink(run.stopped)
    if memory is None:
        return
    async with qmp.connect(run.qmp) as q:
        if (await q.execute("query-status"))["status"] == "inmigrate":
            if (await q.execute("query-migrate")).get("status") not in (*RUNNING_MIGRATION, "completed"):
                await q.execute("migrate-incoming", uri="exec:" + shlex.join(["cat", memory]))
            if not await _wait_incoming(q):
                raise io_error(f"QEMU could not load the guest's memory from {memory}.")
        if step.get("run", True) and (await q.execute("query-status"))["status"] != "running":
            await q.execute("cont")


async def _wait_incoming(q: qmp.QMP) -> bool:
    with trio.move_on_after(MIGRATION_TIMEOUT):
        while True:
            status = (await q.execute("query-migrate")).get("status")
            if status == "completed" and (await q.execute("query-status"))["status"] != "inmigrate":
                return True
            if status == "failed":
                return False
            await trio.sleep(POLL_SECONDS)
    return False


async def delete_memory(files: DomainFiles, rel: str) -> None:
    def delete() -> None:
        path = files.file(rel)
        unlink_if_present(path + PART)
        if os.path.lexists(path):
            os.unlink(path)
            fsync_dir(os.path.dirname(path))

    await trio.to_thread.run_sync(delete)


# ---- planning (domain.py) --------------------------------------------------------------------


def mark_memory_create(plan: Any, files: DomainFiles, paused: bool) -> None:
    """A create of a running domain takes memory: its new_live intent says where to save it."""
    for intent in plan.intents:
        if intent["do"] == "new_live":
            intent["memory"] = memory_rel(files, intent["on"])
            intent["resume"] = not paused


def _memory_of(view: Any, files: DomainFiles, snap_id: str) -> str | None:
    record = view.snapshots.get(snap_id)
    if record is None or not has_memory(record) or not os.path.exists(files.memory(snap_id)):
        return None
    return memory_rel(files, snap_id)


def needs_qemu(view: Any, files: DomainFiles, snap_id: str, start: bool | None) -> bool:
    """Whether a revert to `snap_id` leaves QEMU running (so the QMP engine carries it out)."""
    return start is not None or _memory_of(view, files, snap_id) is not None


def plan_revert_running(
    plan: Any, view: Any, files: DomainFiles, snap_id: str, running: bool, attached: bool, start: bool | None
) -> Any:
    """The revert's file intents between ending QEMU (if it runs) and starting it on the
    snapshot (its memory loaded, or booted) when the snapshot has memory or `start` says so."""
    if running and attached:
        raise SnapfsError(
            errno.EBUSY,
            f"Domain {files.name!r} runs in a QEMU snapfs did not start (attach), which snapfs cannot restart on "
            "the snapshot; shut it down (or detach and stop it) first, then revert.",
        )
    saved = _memory_of(view, files, snap_id)
    if not running and not needs_qemu(view, files, snap_id, start):
        return plan
    if needs_qemu(view, files, snap_id, start) and not os.path.exists(runtime.RunFiles.of(files).args):
        raise SnapfsError(
            errno.ENOENT,
            f"Domain {files.name!r} was never started by snapfs, so it cannot start the domain after the revert "
            f"(no recorded QEMU arguments): revert without --running/--paused, then snapfs start {files.name} -- ARGS.",
        )
    for intent in plan.intents:
        if intent["do"] in ("new_live", "drop"):
            intent["revert"] = "running" if running else "off"
    intents = ([{"do": "qmp_quit"}] if running else []) + plan.intents
    if needs_qemu(view, files, snap_id, start):
        run = start if start is not None else view.snapshots[snap_id].state != "paused"
        intents.append({"do": "qmp_resume", "memory": saved, "run": run})
    plan.intents = intents
    return plan


def with_memory_deletes(view: Any, files: DomainFiles, steps: list[dict]) -> list[dict]:
    """Each deleted snapshot's memory file goes with it (a step right after its meta_delete)."""
    out = []
    for step in steps:
        out.append(step)
        if step["do"] == "meta_delete":
            record = view.snapshots.get(step["id"])
            if record is not None and (has_memory(record) or os.path.lexists(files.memory(step["id"]))):
                out.append({"do": "memory_delete", "path": memory_rel(files, step["id"])})
    return out
