"""The QMP engine: the rules' intents as steps on a running QEMU (DESIGN section 8).

A disk-only snapshot takes a new overlay per disk (the pre-staged one, else made with
qemu-img, as offline), adds it to QEMU (`blockdev-add`) and switches every disk to it in one
`transaction`, both in the `switch` step (a memory snapshot adds them in `qmp_add` first); a
merge of a snapshot on the running chain pulls its data into the dependent
on that chain with `block-stream` (`stream`), handles the other dependents as offline,
then lets QEMU close L(S) and deletes it (`release`). No file QEMU holds is ever renamed
or replaced, and QEMU is only ever handed real files.

Every step is idempotent and finishes right both with QEMU still running (it asks QEMU
which node is active, whether a job runs or is done) and with QEMU gone (the offline
equivalent: the guest writes nothing any more). QEMU is found by its QMP socket; one that
does not answer at all (no socket, connection refused) is gone. Nodes are found by the
real file they are on, never by an assumed name: a node QEMU opened itself has an
automatic name (`#block123`); a node snapfs adds is named after its file (node_name).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio

from .. import layerlock, qemu, qmp, rules
from ..durable import DirSyncs, sync_dir_of, unlink_freeing_later, unlink_if_present
from ..errors import SnapfsError, io_error
from ..records import LIVE, DiskRecord, MetadataView, layer_name
from ..store import DomainFiles
from . import Progress, memory
from .qemu_img import METADATA_STEPS, QemuImgEngine
from .qemu_img import _install as install

QMP_STEPS = ("qmp_add", "switch", "repoint", "stream", "release", "switch_memory", "qmp_quit", "qmp_resume")
RESTART_STEPS = ("qmp_quit", "qmp_resume")
# Offline steps a live plan may hold too: on files off the running chain, held as offline.
OFFLINE_STEPS = ("rebase", "commit", "rename", "delete", "recompress", "pull")
JOB_POLL_SECONDS = 0.25
JOB_POLL_GAP_SECONDS = 0.01
JOB_ENDS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
# Bytes a second a stream job may copy (0: as fast as it can). Tests slow a stream down so
# that snapfs can be killed while it runs; recovery always hurries it (speed 0).
STREAM_SPEED = int(os.environ.get("SNAPFS_QMP_STREAM_SPEED", "0"))
FORMAT_DRIVERS = ("qcow2", "raw")


def node_name(path: str) -> str:
    """The node name snapfs gives the format node it adds on `path`: a letter first, at
    most 31 characters (QEMU's limits), the same for the same file after a crash."""
    return "sf" + hashlib.sha256(os.fsencode(path)).hexdigest()[:24]


def job_id(path: str) -> str:
    """The id of snapfs's block job into the layer at `path` (recovery looks for it)."""
    return "sfjob" + hashlib.sha256(os.fsencode(path)).hexdigest()[:24]


def running_chain(view: MetadataView) -> set[str]:
    """The snapshots whose layers a running QEMU holds (the live layer's ancestors) and LIVE."""
    return {LIVE, *rules.ancestors(view, view.current)}


def side_by_side(streams: list[dict]) -> list[dict]:
    """Consecutive stream steps (one per disk) whose jobs the first step starts all at once
    (`siblings`): QEMU runs them side by side, and each step then waits for its own. Each
    later step finds its job running or done, as after a crash."""
    if len(streams) < 2:
        return streams
    return [{**streams[0], "siblings": streams[1:]}, *streams[1:]]


def refused(domain: str, what: str) -> SnapfsError:
    return SnapfsError(errno.EBUSY, f"Domain {domain!r} is running: {what}")


@dataclass(frozen=True)
class Node:
    name: str
    drv: str
    path: str | None  # the file it is on, as QEMU recorded it (absolute)

    @property
    def automatic(self) -> bool:
        """Named by QEMU itself (a backing node it opened): it goes when nothing uses it."""
        return self.name.startswith("#")

    @property
    def through_link(self) -> bool:
        return self.path is not None and os.path.islink(self.path)


def _node(entry: dict) -> Node:
    recorded = qmp.file_of(str(entry.get("file", "")))
    return Node(entry["node-name"], entry.get("drv", ""), os.path.abspath(recorded) if recorded else None)


async def block_nodes(q: qmp.QMP) -> list[Node]:
    return [_node(entry) for entry in await q.execute("query-named-block-nodes", flat=True)]


async def device_nodes(q: qmp.QMP) -> list[Node]:
    """The node each guest device writes to now. When each is a node snapfs added (named
    after its real file: node_name), QEMU's block graph says so, else what `query-block`
    says is inserted; query-block describes every image down each chain, so its cost grows
    with the chain (7 ms at 10 snapshots of 2 disks here, the graph 1.5 ms)."""
    roots = await _device_roots(q)
    if roots is not None and all(_snapfs_named(name) for name in roots.values()):
        return [Node(name, "qcow2", None) for name in roots.values()]
    return [_node(b["inserted"]) for b in await q.execute("query-block") if b.get("inserted")]


async def _device_roots(q: qmp.QMP) -> dict[str, str] | None:
    """{guest device's qdev path: its root node's name} from QEMU's block graph; None when
    it has a block backend that is not a device's (a job's, a named -drive's): ask query-block."""
    try:
        graph = await q.execute("x-debug-query-block-graph")
    except qmp.QMPCommandError:
        return None
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    backends = {n["id"] for n in graph["nodes"] if n["type"] == "block-backend"}
    if any(not names[b].startswith("/machine/") for b in backends):
        return None
    return {names[e["parent"]]: names[e["child"]] for e in graph["edges"] if e["parent"] in backends}


def _snapfs_named(name: str) -> bool:
    """A format node snapfs added (node_name: "sf" and 24 hex digits): always on the real
    file it is named after, never through a symlink."""
    return len(name) == 26 and name.startswith("sf") and all(c in "0123456789abcdef" for c in name[2:])


def nodes_on(nodes: list[Node], path: str, formats_only: bool = True) -> list[Node]:
    """The nodes on the real file `path` (format nodes only, unless told); a format node QEMU
    opened through the live layer's symlink counts while the symlink leads to `path` (a
    create re-points it at its real file before the symlink moves: the `repoint` step)."""
    mine = node_name(path)
    return [
        n
        for n in nodes
        if (n.path == path or n.name == mine or _linked_to(n, path))
        and (not formats_only or n.drv in FORMAT_DRIVERS or n.name == mine)
    ]


def _linked_to(node: Node, path: str) -> bool:
    return node.drv in FORMAT_DRIVERS and node.through_link and os.path.realpath(node.path or "") == path


async def active_nodes(q: qmp.QMP) -> set[str]:
    """The node each guest device writes to now."""
    return {b["inserted"]["node-name"] for b in await q.execute("query-block") if b.get("inserted")}


async def flush_devices(q: qmp.QMP) -> None:
    """Every guest disk's image chain written out of QEMU's caches to the files (there is no
    QMP command for it in 7.2: HMP's qemu-io on the device, which needs no permission)."""
    roots = await _device_roots(q)
    if roots is None:
        roots = {b["qdev"]: "" for b in await q.execute("query-block") if b.get("inserted") and b.get("qdev")}
    for qdev in roots:
        said = await q.hmp(f'qemu-io -d {qdev} "flush"')
        if said.strip():
            raise io_error(f"QEMU could not flush {qdev}: {said.strip()}")


async def header_backing(path: str) -> str | None:
    """The backing link in a qcow2 layer's header (read without taking any lock)."""
    return await trio.to_thread.run_sync(layerlock.header_backing, path)


class QmpEngine:
    """Bound to a domain's QMP socket (None: QEMU is gone, every step runs offline)."""

    name = "qmp"

    def __init__(self, socket: str | None, offline: QemuImgEngine, domain: str = "", linked: str | None = None) -> None:
        self.socket = socket
        self.offline = offline
        self.domain = domain
        self.linked = linked  # why the layers cannot change (QEMU runs a disk through a symlink it cannot re-point)
        self.repoint = False  # QEMU runs a disk through its symlink: a create re-points it before the link moves
        self.temporary_suffixes = offline.temporary_suffixes
        self._held: qmp.QMP | None = None  # the session kept from step to step (_session), until aclose
        self._opening = trio.Lock()
        # The devices' nodes if_running saw, and in which session: no other client can change
        # them while it lasts, so the first switch in it needs not ask again (taken once).
        self._seen: tuple[qmp.QMP, list[Node]] | None = None

    def snapshot_state(self) -> str:
        return "disk-snapshot"

    @classmethod
    async def if_running(cls, socket: str, offline: QemuImgEngine, domain: str) -> QmpEngine | None:
        """The engine for a QEMU that answers on `socket` (None: none does, the domain is shut
        off). A QEMU that opened a disk through a symlink (the live layer's stable name) would
        reopen it by that name after a switch: a create then re-points it at its real file
        (`repoint`) before the symlink moves; where it cannot (a node without a name, from
        -drive), every change to a layer is refused before anything is written (renames and
        descriptions still work)."""
        try:
            q = await qmp.open_session(socket, timeout=2.0)
        except SnapfsError:
            return None
        try:
            active = await device_nodes(q)
        except BaseException as exc:
            await q.aclose()
            if isinstance(exc, SnapfsError):
                return None
            raise
        links = [n for n in active if n.through_link]
        unnamed = [n.path for n in links if n.automatic]
        linked = (
            f"Domain {domain!r} runs on {unnamed[0]}, a symbolic link QEMU opened without a node name (-drive): "
            "snapfs changes its disks only when QEMU was given the real file, or the symlink with a -blockdev "
            "node-name (Domain.live_layer_paths() names the real files)."
            if unnamed
            else None
        )
        engine = cls(socket, offline, domain, linked)
        engine.repoint = bool(links)
        engine._held = q  # the operation's steps go on in this session (one connection fewer)
        engine._seen = (q, active)
        return engine

    # ---- intents -> steps -------------------------------------------------------------------
    def steps(self, intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        do = intent["do"]
        if do in METADATA_STEPS or do in RESTART_STEPS:
            return [intent]
        if intent.get("revert"):
            return self._revert(intent, files, disks)
        if self.linked:
            raise SnapfsError(errno.EOPNOTSUPP, self.linked)
        view = files.view()
        chain = running_chain(view)
        name = files.name
        if do == "freeze":
            return []  # the switch freezes the live layer: its real file keeps its name
        if do == "new_live":
            if not intent.get("frozen"):
                raise refused(
                    name,
                    "shut it down first: this replaces the disk its guest uses.",
                )
            return self._create(intent, files, disks)
        if do == "fold":
            if intent["snap"] not in chain:
                return self.offline.steps(intent, files, disks)
            return self._fold(intent, files, disks, chain)
        if do == "drop" and intent["snap"] not in chain:
            return self.offline.steps(intent, files, disks)
        if do == "recompress":
            # A snapshot this plan creates is not in the view yet: its layer is the live one.
            if intent["snap"] in view.snapshots and intent["snap"] not in chain:
                return self.offline.steps(intent, files, disks)
            raise refused(
                name, "QEMU holds the layers this would recompress; shut it down first (or leave it uncompressed)."
            )
        if do == "rebase_live":
            return self._deactivate(intent, files, disks, view)
        raise refused(name, "shut it down first: its running disk depends on what this would delete.")

    def _create(self, intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        """Per disk a new overlay on the live layer's real file; all added to QEMU, all
        switched in one transaction; then the stable names follow (link, as offline)."""
        news = {d.target: _rel(files, d, intent["names"]) for d in disks}
        olds = {d.target: _rel(files, d, intent["backing"]) for d in disks}
        steps = [
            {
                "do": "overlay",
                "dst": news[d.target],
                "backing": intent["backing"][d.target],
                "fmt": "qcow2",
                "size": d.size,
            }
            for d in disks
        ]
        if intent.get("memory"):
            steps.append({"do": "qmp_add", "layers": [news[d.target] for d in disks]})
        # A disk-only switch adds the overlays to QEMU itself (one journal record fewer).
        steps.append({"do": "switch", "disks": [{"target": t, "active": olds[t], "overlay": news[t]} for t in news]})
        links = [s for s in self.offline.steps(intent, files, disks) if s["do"] == "link"]
        if intent.get("memory"):
            switch = steps.pop()
            resume = intent.get("resume", True)
            steps.append(
                {**switch, "do": "switch_memory", "memory": intent["memory"], "snap": intent["on"]} | {"resume": resume}
            )
        if self.repoint:
            links_of = {d.target: os.path.relpath(files.live_link(d.target), files.path) for d in disks}
            steps.append({"do": "repoint", "disks": [{"path": olds[t], "link": links_of[t]} for t in olds]})
        return steps + links

    def _revert(self, intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        """A revert's file steps are the offline ones: they run after qmp_quit ended QEMU
        (so they are not held beforehand: QEMU holds the old live layer until then)."""
        steps = self.offline.steps(intent, files, disks)
        return [{**s, "quit": True} for s in steps] if intent["revert"] == "running" else steps

    def _fold(self, intent: dict, files: DomainFiles, disks: list[DiskRecord], chain: set[str]) -> list[dict]:
        """S is on the running chain: its one dependent there pulls S's data (stream); the
        others are rebased as offline; then QEMU lets go of L(S), which is deleted."""
        on_chain = [dep for dep in intent["into"] if dep in chain]
        others = [dep for dep in intent["into"] if dep not in chain]
        layouts = _Names(files, intent)
        steps = []
        for dep in others:
            for d in disks:
                steps.append({"do": "rebase", "layer": layouts.dep(d, dep), **layouts.parent_backing(d)})
        streams = []
        for dep in on_chain:
            for d in disks:
                streams.append(
                    {
                        "do": "stream",
                        "layer": layouts.dep(d, dep),
                        "base": layouts.parent(d),
                        "from": layouts.own(d),
                        **layouts.parent_backing(d),
                    }
                )
        return steps + side_by_side(streams) + [{"do": "release", "path": layouts.own(d)} for d in disks]

    def _deactivate(self, intent: dict, files: DomainFiles, disks: list[DiskRecord], view: MetadataView) -> list[dict]:
        """The live layer pulls everything above P (the stream of a merge, with no layer
        deleted): it then sits on P, S and the layers between stay as they are."""
        below = view.snapshots[view.current]  # the live layer's backing now (QEMU gone: re-pointed there)
        steps = []
        for d in disks:
            own = {d.target: layer_name(below, d.target)}
            onto = intent["onto"]
            base = d.base if onto is None else _rel(files, d, onto)
            backing = (
                {"backing": d.base, "fmt": d.format} if onto is None else {"backing": onto[d.target], "fmt": "qcow2"}
            )
            steps.append(
                {
                    "do": "stream",
                    "layer": _rel(files, d, intent["layers"]),
                    "base": base,
                    "from": _rel(files, d, own),
                    **backing,
                }
            )
        return side_by_side(steps)

    # ---- the precondition --------------------------------------------------------------------
    def hold_layers(self, files: DomainFiles, steps: list[dict]) -> contextlib.AbstractContextManager:
        """Files off the running chain are checked and held as offline. Files QEMU holds
        (or is about to open) are only checked to be regular files in the store: QEMU has
        their locks, and taking them would stop it."""
        for step in steps:
            for key in ("dst", "layer", "path"):
                if step["do"] in ("overlay", "stream", "release") and key in step:
                    layerlock.check_file(files.file(step[key]))
        return self.offline.hold_layers(files, [s for s in steps if s["do"] in OFFLINE_STEPS and not s.get("quit")])

    # ---- running a step --------------------------------------------------------------------------
    async def run(
        self, step: dict, files: DomainFiles, *, recovering: bool, syncs: DirSyncs, progress: Progress | None
    ) -> None:
        do = step["do"]
        if do not in ("overlay", "switch"):
            self._seen = None  # only a create's overlays come between if_running and its switch
        if do in RESTART_STEPS or do in OFFLINE_STEPS:
            await self.aclose()  # these talk to QEMU themselves (runtime.py), or run while another client may
        if do == "overlay":
            await self._overlay(step, files, syncs)
        elif do == "qmp_add":
            await self._add(step, files)
        elif do == "switch":
            await self._switch(step, files)
        elif do == "repoint":
            await self._repoint(step, files)
        elif do == "stream":
            await self._stream(step, files, progress, recovering)
        elif do == "release":
            await self._release(step, files, syncs)
        elif do == "switch_memory":
            await memory.switch_memory(self, step, files)
        elif do == "qmp_quit":
            await memory.quit_qemu(files)
        elif do == "qmp_resume":
            await memory.resume(files, step)
        else:
            await self.offline.run(step, files, recovering=recovering, syncs=syncs, progress=progress)

    async def aclose(self) -> None:
        """Let go of the session kept from step to step (the operation is over, or what
        comes next must leave QEMU's one client slot free)."""
        held, self._held = self._held, None
        if held is not None:
            await held.aclose()

    async def _kept(self) -> qmp.QMP | None:
        """The kept session, opened (again) if need be; None when QEMU is gone. Steps side
        by side (overlays) share it."""
        async with self._opening:
            if self._held is not None and not self._held.alive:
                await self.aclose()
            if self._held is None and self.socket is not None:
                try:
                    self._held = await qmp.open_session(self.socket)
                except SnapfsError as exc:
                    if exc.errno != errno.ECONNREFUSED:
                        raise
            return self._held

    @contextlib.asynccontextmanager
    async def _session(self, keep: bool = True) -> AsyncIterator[qmp.QMP | None]:
        """A QMP session, or None when QEMU is gone (nothing answers on its socket). A QEMU
        that answers but is busy (another client) is an error, never taken for gone. With
        `keep`, the session is kept for the next steps (QEMU serves one client at a time,
        so the operation's end lets go of it: domain.py); without, it ends with the block."""
        if keep:
            yield await self._kept()
            return
        await self.aclose()
        entered = False
        if self.socket is not None:
            try:
                async with qmp.connect(self.socket) as q:
                    entered = True
                    yield q
            except SnapfsError as exc:
                if entered or exc.errno != errno.ECONNREFUSED:
                    raise
            else:
                return
        yield None

    async def _overlay(self, step: dict, files: DomainFiles, syncs: DirSyncs) -> None:
        """As offline, but never over a file QEMU has opened (the journal never re-runs it
        after the qmp_add; this is the belt to those braces)."""
        dst = _abs(files, step["dst"])
        if os.path.exists(dst):
            async with self._session() as q:
                if q is not None and nodes_on(await block_nodes(q), dst, formats_only=False):
                    return
        await self.offline.run(step, files, recovering=False, syncs=syncs, progress=None)

    async def _add(self, step: dict, files: DomainFiles) -> None:
        async with self._session() as q:
            if q is None:
                return  # QEMU is gone: the new overlays simply wait for the next start
            await _add_nodes(q, [_abs(files, rel) for rel in step["layers"]], await block_nodes(q))

    async def _switch(self, step: dict, files: DomainFiles) -> None:
        """Every disk onto its new overlay at one instant (one transaction); nothing to do
        when they already are. QEMU gone: nothing to do either, the guest wrote into the old
        live files until it died and they simply become L(S) (the new overlays are empty)."""
        async with self._session() as q:
            if q is None:
                await self._refuse_if_held([_abs(files, d["active"]) for d in step["disks"]])
                return
            seen, self._seen = self._seen, None
            active = seen[1] if seen is not None and seen[0] is q else await device_nodes(q)
            switches, switched = [], 0
            for disk in step["disks"]:
                old, new = _abs(files, disk["active"]), _abs(files, disk["overlay"])
                if nodes_on(active, new):
                    switched += 1
                    continue
                current = nodes_on(active, old)
                if not current:
                    raise self._not_on(disk["target"], old, active)
                switches.append((current[0].name, new))
            if switches and switched:
                raise io_error(f"QEMU runs only some disks of {files.name!r} on their new overlays; stop it and retry.")
            if switches:
                await _switch_to(q, switches)

    async def _repoint(self, step: dict, files: DomainFiles) -> None:
        """Each node QEMU opened through a disk's symlink, now read-only under the new overlay,
        onto a file node on its real file (DESIGN section 8): QEMU reopens a node by the name
        it recorded, which must not be the symlink once it moves. Done when no format node is
        on the symlink any more; QEMU gone: nothing holds the symlink."""
        async with self._session() as q:
            if q is None:
                return
            for disk in step["disks"]:
                real, link = _abs(files, disk["path"]), _abs(files, disk["link"])
                for node in [n for n in await block_nodes(q) if n.drv in FORMAT_DRIVERS and n.path == link]:
                    if os.path.realpath(link) != real:
                        raise io_error(f"QEMU runs {node.name} on {link}, which no longer leads to {real}; stop it.")
                    await _repoint_node(q, node, real)

    def _not_on(self, target: str, old: str, active: list[Node]) -> SnapfsError:
        linked = [n for n in active if n.through_link and os.path.realpath(n.path or "") == old]
        if linked:
            return SnapfsError(
                errno.EOPNOTSUPP,
                f"QEMU opened disk {target} of {self.domain!r} through the symlink {linked[0].path}; start it on the "
                f"real file {old} (snapfs start does) to snapshot it while it runs.",
            )
        return io_error(f"QEMU does not run disk {target} of {self.domain!r} on its live layer {old}.")

    async def _stream(self, step: dict, files: DomainFiles, progress: Progress | None, recovering: bool) -> None:
        """The dependent on the running chain pulls S's data, and then sits on P. A job a
        crashed snapfs left running is waited for, not started again; the socket is let go
        between polls (QEMU serves one client at a time, and `domstate` is one). Done when
        the header names P and QEMU flushed the layer: QEMU keeps qcow2 metadata in memory,
        so a QEMU killed after its stream may leave a header on P without the clusters it
        copied. QEMU gone (before, during or after its job): the offline equivalent."""
        layer = _abs(files, step["layer"])
        job = job_id(layer)
        state = await self._start_stream(job, layer, step, files, recovering)
        for sibling in step.get("siblings", ()):
            other = _abs(files, sibling["layer"])
            await self._start_stream(job_id(other), other, sibling, files, recovering)
        if state == "running":
            await self._wait_job(job, progress)
            async with self._session() as q:
                if q is not None:
                    if await header_backing(layer) != step["backing"]:
                        raise io_error(f"QEMU's block-stream into {layer} ended before it finished; try again.")
                    await flush_devices(q)
                    return
        elif state == "done":
            return
        await self._rebase_offline(layer, _abs(files, step["from"]), step, progress)

    async def _start_stream(self, job: str, layer: str, step: dict, files: DomainFiles, recovering: bool) -> str:
        """ "running" (started, or one a crashed snapfs left, hurried), "done" (already on P,
        now flushed), or "offline" (QEMU gone, or it does not hold the layer: nothing does)."""
        async with self._session() as q:
            if q is None:
                return "offline"
            nodes = await block_nodes(q)
            devices = nodes_on(nodes, layer)
            if not devices:
                return "offline"
            if any(j.get("device") == job for j in await q.execute("query-block-jobs")):
                await q.execute("block-job-set-speed", device=job, speed=0)
                return "running"
            if await header_backing(layer) == step["backing"]:
                await flush_devices(q)
                return "done"
            base = _abs(files, step["base"])
            bases = nodes_on(nodes, base)
            if not bases:
                raise io_error(f"QEMU has no node on {base}, the layer {layer} should be streamed onto.")
            args = {"job-id": job, "device": devices[0].name, "base-node": bases[0].name}
            args["backing-file"] = step["backing"]
            if STREAM_SPEED and not recovering:
                args["speed"] = STREAM_SPEED
            await q.execute("block-stream", args)
            return "running"

    async def _wait_job(self, job: str, progress: Progress | None) -> None:
        """Until block job `job` is gone from QEMU's list (or QEMU is), reporting progress.
        Between two looks snapfs listens for the job's end for up to JOB_POLL_SECONDS (a
        plain sleep left QEMU's finished job waiting half of it on average), then lets go
        of the socket for a moment, so that another client (a `domstate`) gets in."""
        while True:
            try:
                async with self._session(keep=False) as q:
                    if q is None:
                        return
                    since = q.mark()
                    mine = [j for j in await q.execute("query-block-jobs") if j.get("device") == job]
                    if mine:
                        if progress is not None and mine[0].get("len"):
                            progress(100.0 * mine[0].get("offset", 0) / mine[0]["len"])
                        with trio.move_on_after(JOB_POLL_SECONDS):
                            await q.wait_event(JOB_ENDS, lambda d: job in (d.get("device"), d.get("id")), since=since)
            except qmp.QEMUGone:
                return
            if not mine:
                return
            await trio.sleep(JOB_POLL_GAP_SECONDS)

    async def _rebase_offline(self, layer: str, own: str, step: dict, progress: Progress | None) -> None:
        """Nothing holds the layer now (held meanwhile, so a QEMU starting cannot open it). Its
        right content is always itself read over L(S) (`own`): every cluster it has is its own
        or a copy QEMU made of what lies below; and whether a stream's clusters reached the
        file is unknown when QEMU was killed. So a copy is re-pointed at L(S), rebased (safe)
        onto P, proven to read as the layer over L(S), and renamed over the layer."""
        tmp = layer + ".rebase"
        with await trio.to_thread.run_sync(functools.partial(layerlock.hold, {layer: "write"})):
            await trio.to_thread.run_sync(unlink_if_present, tmp)
            try:
                await trio.run_process(["cp", "--reflink=auto", "--sparse=always", layer, tmp])
                await qemu.rebase_unsafe(tmp, os.path.basename(own), "qcow2")
                await qemu.rebase_safe(tmp, step["backing"], step["fmt"], progress)
                if not await qemu.same_content_over(tmp, layer, own):
                    raise io_error(f"Rebasing {layer} changed its content; the layer was left as it was.")
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(unlink_if_present, tmp)
                raise
            await install(tmp, layer)

    async def _release(self, step: dict, files: DomainFiles, syncs: DirSyncs) -> None:
        """QEMU closes L(S) (the nodes snapfs or a command line added stay until deleted;
        those QEMU opened itself went with the stream), then the file is deleted: after
        QEMU flushed what it streamed, so no copy of S's data lives only in its memory."""
        path = _abs(files, step["path"])
        async with self._session() as q:
            if q is None:
                await self._refuse_if_held([path])
            else:
                await flush_devices(q)
                on = nodes_on(await block_nodes(q), path, formats_only=False)
                for node in sorted(on, key=lambda n: n.drv not in FORMAT_DRIVERS):
                    if not node.automatic:
                        with contextlib.suppress(qmp.QMPCommandError):  # gone with its format node
                            await q.execute("blockdev-del", node_name=node.name)
                if nodes_on(await block_nodes(q), path, formats_only=False):
                    raise SnapfsError(errno.EBUSY, f"QEMU still uses {path}, which a merge should delete; try again.")
        # As the offline delete, but the blocks are freed after the operation (the merge waited
        # 0.1-0.35 s per 256 MiB for that); nothing names the file once it is unlinked.
        await trio.to_thread.run_sync(_delete_freeing_later, path, syncs)

    async def _refuse_if_held(self, paths: list[str]) -> None:
        """QEMU's socket does not answer, but make sure no process holds these (a QEMU
        whose socket was removed): the metadata is about to call them frozen or gone."""
        busy = await trio.to_thread.run_sync(layerlock.in_use, paths)
        if busy:
            raise SnapfsError(
                errno.EBUSY,
                f"No QEMU answers on {self.socket}, but {busy} is in use by a process; stop it (or give snapfs its "
                "QMP socket) and try again.",
            )

    # ---- images outside a plan ---------------------------------------------------------------------
    async def new_live_layer(self, path: str, disk: DiskRecord) -> None:
        await self.offline.new_live_layer(path, disk)

    async def probe_format(self, path: str) -> str:
        return await self.offline.probe_format(path)

    async def virtual_size(self, path: str, fmt: str) -> int:
        return await self.offline.virtual_size(path, fmt)

    async def has_own_data(self, path: str) -> bool:
        return await self.offline.has_own_data(path)


async def _repoint_node(q: qmp.QMP, node: Node, real: str) -> None:
    """`node` onto a new file node on `real`, its backing named as it is (blockdev-reopen
    resets every option not given). The file node may become writable (auto-read-only): a
    later stream into this layer reopens it read-write. The old file node goes (QEMU drops
    an automatic one itself)."""
    children = await _children(q, node.name)
    file = f"{node_name(real)}-file"
    if file not in {n.name for n in await block_nodes(q)}:
        await q.execute("blockdev-add", {"driver": "file", "node-name": file, "filename": real, "auto-read-only": True})
    options: dict[str, Any] = {"driver": node.drv, "node-name": node.name, "file": file, "read-only": True}
    if node.drv == "qcow2":
        options["backing"] = children.get("backing")
    await q.execute("blockdev-reopen", options=[options])
    old = children.get("file")
    if old and old != file and not old.startswith("#"):
        with contextlib.suppress(qmp.QMPCommandError):  # still used by something else: it stays
            await q.execute("blockdev-del", node_name=old)


async def _children(q: qmp.QMP, name: str) -> dict[str, str]:
    """{edge name ("file", "backing"): child node name} of node `name` in QEMU's block graph."""
    graph = await q.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {e["name"]: names[e["child"]] for e in graph["edges"] if names.get(e["parent"]) == name}


class _Names:
    """The real files of a fold's layers, relative to the domain directory."""

    def __init__(self, files: DomainFiles, intent: dict) -> None:
        self.files, self.intent = files, intent

    def own(self, d: DiskRecord) -> str:
        return _rel(self.files, d, self.intent["layers"])

    def dep(self, d: DiskRecord, dep: str) -> str:
        return _rel(self.files, d, self.intent["into_layers"][dep])

    def parent(self, d: DiskRecord) -> str:
        """P's real file, or the base image (absolute: files.file leaves it as it is)."""
        names = self.intent["parent_layers"]
        return d.base if names is None else _rel(self.files, d, names)

    def parent_backing(self, d: DiskRecord) -> dict:
        """The backing link and format a layer on P gets (as offline: basename or the base's path)."""
        names = self.intent["parent_layers"]
        return {"backing": d.base, "fmt": d.format} if names is None else {"backing": names[d.target], "fmt": "qcow2"}


async def _switch_to(q: qmp.QMP, switches: list[tuple[str, str]]) -> None:
    """Each (active node, new overlay file) switched at one instant. One transaction of
    blockdev-snapshot-sync in mode `existing` opens each overlay (the file qemu-img made, as
    the old node was opened) and switches to it: a command fewer per disk than blockdev-add
    then blockdev-snapshot (5-10 ms, not 12-19, for two disks here). In that mode QEMU 7.2
    writes nothing to the file (no json:{} backing, nothing made over it: DESIGN section 8
    warns of the other modes). Should it fail (e.g. a crashed snapfs added an overlay
    already), nothing changed (a transaction is all or nothing): the overlays are then added
    (those not added yet) and switched with blockdev-snapshot."""
    sync = [
        {
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": node,
                "snapshot-file": path,
                "snapshot-node-name": node_name(path),
                "format": "qcow2",
                "mode": "existing",
            },
        }
        for node, path in switches
    ]
    try:
        await q.execute("transaction", actions=sync)
        return
    except qmp.QMPCommandError:
        pass
    await _add_nodes(q, [path for _, path in switches])
    snapshots = [{"type": "blockdev-snapshot", "data": {"node": n, "overlay": node_name(p)}} for n, p in switches]
    await q.execute("transaction", actions=snapshots)


async def _add_nodes(q: qmp.QMP, paths: list[str], nodes: list[Node] | None = None) -> None:
    """blockdev-add each overlay (backing: null: the transaction links it) not added yet:
    not among `nodes`, or (none given) not found after an add failed (the nodes are listed
    only then: a second add, after a crash, fails on the node name or QEMU's own lock)."""
    for path in paths:
        if nodes is not None and nodes_on(nodes, path, formats_only=False):
            continue  # added before a crash
        file = {"driver": "file", "filename": path}
        try:
            await q.execute(
                "blockdev-add", {"driver": "qcow2", "node-name": node_name(path), "file": file}, backing=None
            )
        except qmp.QMPCommandError:
            if nodes is not None or not nodes_on(await block_nodes(q), path, formats_only=False):
                raise


def _delete_freeing_later(path: str, syncs: DirSyncs) -> None:
    unlink_freeing_later(path)
    sync_dir_of(path, syncs)


def _rel(files: DomainFiles, d: DiskRecord, names: dict[str, str]) -> str:
    """The real layer file `names` ({target: basename}) gives disk d, relative to the domain."""
    return os.path.relpath(files.layer_path(d.target, names[d.target]), files.path)


def _abs(files: DomainFiles, name: str) -> str:
    """A step's file as QEMU is given it (and records it): an absolute path."""
    return os.path.abspath(files.file(name))
