"""The store's domains: lookup, define, undefine, recovery; and who is told of changes.

Every change to a domain (an operation, a define, an undefine, a recovery) is announced
to the store's subscribers once the domain's lock is released, and the call that made
the change returns only after every subscriber has returned: first the handlers
subscribed in this process (a mount's own), in the order they subscribed, then the
announcer, which tells the other processes that registered for news (notify.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable

from .domain import DomainCore
from .durable import atomic_write, write_json
from .errors import SnapfsError, busy, exists, invalid, not_found
from .plaindata import asdict
from .records import DiskRecord, DomainRecord, fresh_layer_name
from .rules import validate_name
from .store import DomainFiles, StoreFiles, replace_with_symlink

TYPE_CHECKING = False  # not typing's: a reading verb does not import typing (issue 16)
if TYPE_CHECKING:
    from . import notify
    from .engines import Engine

BASE_FORMATS = ("qcow2", "raw")

Subscriber = Callable[[str], Awaitable[None]]  # told a domain's name after it changed


class _DeferredEngine:
    """The qemu-img engine, imported (and with it trio and qemu.py) on its first use: the
    command line's reading verbs make a StoreCore and never use the engine."""

    def __init__(self) -> None:
        self._engine: Engine | None = None

    def __getattr__(self, name: str) -> object:
        if self._engine is None:
            from .engines.qemu_img import QemuImgEngine

            self._engine = QemuImgEngine()
        return getattr(self._engine, name)


class StoreCore:
    """A store: its domains, define and undefine, and the subscribers to its changes."""

    def __init__(self, root: str, engine: Engine | None = None) -> None:
        self.files = StoreFiles(root)
        self.files.ensure()
        self.root = self.files.root
        self.engine: Engine = engine if engine is not None else _DeferredEngine()  # type: ignore[assignment]
        self._domains: dict[str, DomainCore] = {}
        self._subscribers: list[Subscriber] = []
        # Tells the other processes' mounts; a mount sets its own token to be left out.
        self._announcer: notify.Announcer | None = None

    @property
    def announcer(self) -> notify.Announcer:
        """Tells the other processes' mounts (made on first use: the reading verbs never
        announce, and notify.py brings sockets and logging)."""
        if self._announcer is None:
            from . import notify

            self._announcer = notify.Announcer(self.root)
        return self._announcer

    def subscribe(self, handler: Subscriber) -> None:
        """Call `await handler(domain_name)` after every change, before the announcer."""
        self._subscribers.append(handler)

    async def changed(self, name: str) -> None:
        """Domain `name` changed (or was defined or undefined): tell every subscriber."""
        for handler in [*self._subscribers, self.announcer]:
            await handler(name)

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

    async def recover(self) -> None:
        """Try to finish every domain's interrupted operation; one that cannot finish now
        writes its last-error and is left for the next change on it (never raised)."""
        for name in self.domain_names():
            try:
                core = self.domain(name)
            except SnapfsError:
                continue  # undefined meanwhile
            await core.recover()

    async def define(
        self,
        name: str,
        disks: list[tuple[str, str, str | None]],
        domain_xml: str | None = None,
        uuid: str | None = None,
    ) -> tuple[DomainCore, list[str]]:
        """Define a domain from (target, image path, format or None) triples.

        A format not given is probed once here and recorded. Returns the domain and the
        messages to show (probed formats)."""
        import uuid as uuidlib

        from . import xml  # lxml: here, not at the top (reading verbs that print no XML never load it)

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
        """Define a domain from libvirt XML; disks that cannot be snapshotted are left out
        and named in the messages."""
        from . import xml

        definition, kept = xml.parse_domain_xml(text)
        disks = [(d.target, d.path, d.format) for d in definition.disks]
        if not disks:
            raise invalid(f"Domain {definition.name!r} has no file-backed disk that snapfs can snapshot.")
        core, messages = await self.define(definition.name, disks, kept, definition.uuid)
        return core, messages + [f"{s} (left out of snapshots)" for s in definition.skipped]

    async def _disk_records(self, disks: list[tuple[str, str, str | None]]) -> tuple[list[DiskRecord], list[str]]:
        records, messages = [], []
        for target, path, given in disks:
            path = os.path.abspath(path)
            if not os.path.exists(path):
                raise not_found(f"Disk {target}: image {path} does not exist.")
            if not os.path.isfile(path):
                raise invalid(f"Disk {target}: {path} is not a regular file; the image must be one.")
            fmt = given
            if fmt is None:
                fmt = await self.engine.probe_format(path)
                messages.append(f"{target}: {path} probed as {fmt}; recorded, and never probed again.")
            if fmt not in BASE_FORMATS:
                raise invalid(f"Disk {target}: format {fmt!r} is not supported; use qcow2 or raw.")
            await _refuse_own_backing(target, path, fmt)
            records.append(DiskRecord(target, path, fmt, await self.engine.virtual_size(path, fmt)))
        return records, messages

    async def _write_domain(self, record: DomainRecord, text: str) -> None:
        import shutil

        import trio  # here and below, not at the top: the reading verbs never load trio

        files = self.files.domain(record.name)
        await trio.to_thread.run_sync(shutil.rmtree, files.path, True)  # a define that crashed
        os.makedirs(files.snapshots_dir)
        live = {disk.target: fresh_layer_name() for disk in record.disks}
        for disk in record.disks:
            os.makedirs(files.layers_dir(disk.target))
            await self.engine.new_live_layer(files.layer_path(disk.target, live[disk.target]), disk)
            await trio.to_thread.run_sync(replace_with_symlink, files.live_link(disk.target), live[disk.target])
        await trio.to_thread.run_sync(atomic_write, files.file("domain.xml"), text.encode("utf-8"))
        await trio.to_thread.run_sync(functools.partial(files.write_state, None, live=live))
        await trio.to_thread.run_sync(write_json, files.file("domain.json"), asdict(record))
        from . import prestage

        prestage.start(files.path)  # the first create's overlays, made ahead

    async def undefine(self, name: str, remove_snapshots: bool = False) -> None:
        import trio

        from . import runtime

        core = self.domain(name)
        try:
            async with self.files.locked(), core.files.locked():
                await runtime.refuse_while_running(core, "undefine it")
                await core.finish_journal()
                count = len(core.view().snapshots)
                if not remove_snapshots:
                    await self._refuse_undefine_with_data(core, count)
                await trio.to_thread.run_sync(_remove_domain, core.files)
                runtime.forget(core.files)
        except SnapfsError as exc:
            if core.files.exists():
                core.record_error("undefine", exc.message)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.changed(name)
        self._domains.pop(name, None)

    async def _refuse_undefine_with_data(self, core: DomainCore, count: int) -> None:
        if count:
            raise busy(f"Domain {core.name!r} has {count} snapshot(s); pass --remove-snapshots to delete them with it.")
        for disk in core.disks:
            if await self.engine.has_own_data(core.live_file(disk.target)):
                raise busy(
                    f"Domain {core.name!r} has changes in its live disk {disk.target} that would be lost; "
                    "pass --remove-snapshots to delete them with it."
                )


async def _refuse_own_backing(target: str, path: str, fmt: str) -> None:
    """A base image must be the whole disk: its own backing chain would let a snapshot (and
    anyone a mount shares it with) read files the definition never named, a json: or
    protocol backing or an external data file anything qemu can open. Read from the
    header; the backing file itself is never opened."""
    import trio

    from . import layerlock

    try:
        backing = await trio.to_thread.run_sync(layerlock.base_backing, path, fmt)
    except SnapfsError as exc:
        raise SnapfsError(exc.errno, f"Disk {target}: {exc.message}") from None
    if backing is not None:
        raise invalid(
            f"Disk {target}: base image {path} has its own backing file {backing!r}, which snapfs does not follow; "
            f"make it a whole image first (qemu-img convert -O qcow2 {path} FLAT.qcow2) and define that."
        )


def _remove_domain(files: DomainFiles) -> None:
    import shutil

    os.unlink(files.file("domain.json"))
    shutil.rmtree(files.path)
