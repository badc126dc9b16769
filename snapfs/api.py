"""The synchronous Python API of the seed (DESIGN section 4).

Each call runs the one async implementation in domain.py under `trio.run`, so the API,
the command line and the mount share every rule.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

from .catalog import StoreCore
from .domain import DomainCore
from .errors import SnapfsError, invalid, single
from .records import SnapshotRecord
from .rules import DeactivateFlags
from .store import default_store_path

TYPE_CHECKING = False  # not typing's: a reading verb does not import typing (issue 16)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

SNAPSHOT_CREATE_DISK_ONLY = 16  # libvirt's VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
SNAPSHOT_REVERT_RUNNING = 1  # libvirt's VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
SNAPSHOT_REVERT_PAUSED = 2  # libvirt's VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
# libvirt-python's names for Domain.state()'s first item, and the reasons snapfs gives: taken
# from runtime.py on first use (runtime brings trio and QMP, which reading the store needs not).
_RUNTIME_NAMES = {
    "DomainState": "State",
    **{f"VIR_DOMAIN_{word}": f"State.{word}" for word in ("NOSTATE", "RUNNING", "BLOCKED", "PAUSED")},
    **{f"VIR_DOMAIN_{word}": f"State.{word}" for word in ("SHUTDOWN", "SHUTOFF", "CRASHED", "PMSUSPENDED")},
    **{
        f"VIR_DOMAIN_{reason}": reason
        for reason in ("RUNNING_UNKNOWN", "RUNNING_BOOTED", "PAUSED_USER", "SHUTOFF_UNKNOWN")
        + ("SHUTOFF_SHUTDOWN", "SHUTOFF_DESTROYED", "SHUTOFF_CRASHED")
    },
}


def __getattr__(name: str):
    if name not in _RUNTIME_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import runtime

    found = runtime
    for part in _RUNTIME_NAMES[name].split("."):
        found = getattr(found, part)
    return found


def _runtime():
    from . import runtime

    return runtime


def _run(fn: Callable[..., Awaitable[T]], *args) -> T:
    """Run one core call; a failure comes out as one exception, never a group."""
    try:
        import trio  # here, not at the top: reading the store needs no event loop

        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        raise single(group) from None


def is_store(path: str) -> bool:
    """A store is a directory holding domains/ (made by the first define)."""
    return os.path.isdir(os.path.join(path, "domains"))


def version() -> str:
    """The installed snapfs's version (cliargs.version, beside --version; loaded when asked,
    as a reading verb needs no argparse)."""
    from .cliargs import version as installed

    return installed()


def open_store_core(path: str, create: bool = False) -> StoreCore:
    """The store at `path`; a path that is not a store is an error unless `create`
    (only define makes a store: a mistyped path must not become an empty one)."""
    if not create and not is_store(path):
        raise SnapfsError(
            errno.ENOENT,
            f"There is no snapfs store at {os.path.abspath(path)} (check --store or $SNAPFS_STORE; "
            "define creates a store).",
        )
    return StoreCore(path)


def open_store(path: str | None = None, create: bool = False) -> Store:
    """Open a store and finish any operation a crash interrupted. A path that is not a
    store is an error (SnapfsError, ENOENT) unless create=True, which makes it."""
    store = Store(open_store_core(path or default_store_path(), create))
    _run(store.core.recover)
    return store


def _check_flags(flags: object, allowed: int = 0) -> int:
    """libvirt refuses flag bits a call does not know; so does snapfs."""
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0 or flags & ~allowed:
        raise invalid(f"Unsupported flags {flags!r}: this call accepts {'none' if not allowed else hex(allowed)}.")
    return flags


def drop_final_newline(text: str) -> str:
    """A description loses one trailing newline, as the mount's description file does."""
    return text[:-1] if isinstance(text, str) and text.endswith("\n") else text


class Store:
    def __init__(self, core: StoreCore) -> None:
        self.core = core

    @property
    def path(self) -> str:
        return self.core.root

    def list_domains(self) -> list[str]:
        return self.core.domain_names()

    def lookup_domain(self, name: str) -> Domain:
        return Domain(self.core.domain(name))

    def define_xml(self, text: str | bytes) -> Domain:
        core, _ = _run(self.core.define_xml, text)
        return Domain(core)

    def define(self, name: str, disks: list[tuple[str, str, str | None]]) -> Domain:
        """disks: (target, image path, 'qcow2' | 'raw' | None to probe once)."""
        core, _ = _run(self.core.define, name, disks)
        return Domain(core)

    def undefine(self, name: str, remove_snapshots: bool = False) -> None:
        _run(self.core.undefine, name, remove_snapshots)


class Domain:
    def __init__(self, core: DomainCore) -> None:
        self.core = core

    @property
    def name(self) -> str:
        return self.core.name

    def uuid(self) -> str:
        return self.core.record().uuid

    def xml_desc(self) -> str:
        return self.core.domain_xml()

    def __repr__(self) -> str:
        return f"<Domain {self.name}>"

    def snapshot_create_xml(self, xml_desc: str | bytes, flags: int = 0) -> Snapshot:
        """Of a running domain, its memory is saved too unless flags has SNAPSHOT_CREATE_DISK_ONLY
        (libvirt's 16) or the XML says <memory snapshot='no'/>."""
        flags = _check_flags(flags, SNAPSHOT_CREATE_DISK_ONLY)
        record = _run(self.core.create_from_xml, xml_desc, None, bool(flags & SNAPSHOT_CREATE_DISK_ONLY))
        return Snapshot(self, record.id)

    def snapshot_num(self, flags: int = 0) -> int:
        _check_flags(flags)
        return len(self.core.view().snapshots)

    def list_snapshot_names(self, flags: int = 0) -> list[str]:
        """In the store's order: creation time, then name."""
        _check_flags(flags)
        return [r.name for r in self.core.view().in_order()]

    def snapshot_lookup_by_name(self, name: str, flags: int = 0) -> Snapshot:
        _check_flags(flags)
        return Snapshot(self, self.core.lookup(name).id)

    def create_with_snapshot(self, snapshot: Snapshot | str, flags: int = 0) -> None:
        """Revert to `snapshot`: a Snapshot of this domain, or (a convenience) its name. A
        snapshot with memory leaves the domain running (or paused) as it was then; flags
        SNAPSHOT_REVERT_RUNNING / SNAPSHOT_REVERT_PAUSED start it running or paused anyway."""
        flags = _check_flags(flags, SNAPSHOT_REVERT_RUNNING | SNAPSHOT_REVERT_PAUSED)
        if flags == SNAPSHOT_REVERT_RUNNING | SNAPSHOT_REVERT_PAUSED:
            raise invalid("SNAPSHOT_REVERT_RUNNING and SNAPSHOT_REVERT_PAUSED exclude each other.")
        start = True if flags & SNAPSHOT_REVERT_RUNNING else False if flags & SNAPSHOT_REVERT_PAUSED else None
        if isinstance(snapshot, str):
            snapshot = self.snapshot_lookup_by_name(snapshot)
        if not isinstance(snapshot, Snapshot):
            raise invalid(f"create_with_snapshot takes a Snapshot or a snapshot name, not {type(snapshot).__name__}.")
        if snapshot.domain.name != self.name:
            raise invalid(f"Snapshot {snapshot.name!r} belongs to domain {snapshot.domain.name!r}, not {self.name!r}.")
        _run(self.core.revert, snapshot.id, start)

    def current_snapshot(self, flags: int = 0) -> Snapshot | None:
        _check_flags(flags)
        current = self.core.view().current
        return Snapshot(self, current) if current else None

    def last_error(self) -> str:
        return self.core.last_error()

    # ---- who runs QEMU (DESIGN section 8), libvirt-python's calls ----------------------
    def create(self, flags: int = 0, qemu_args: list[str] | None = None) -> int:
        """Start the domain's QEMU (libvirt's virDomainCreate): with `qemu_args` (recorded for
        the next start) or the recorded ones. Returns 0, as libvirt does."""
        _check_flags(flags)
        _run(_runtime().start, self.core, qemu_args)
        return 0

    def shutdown(self, timeout: float | None = None) -> int:
        """ACPI power-down; QEMU quits if the guest has not stopped after `timeout` seconds."""
        runtime = _runtime()
        _run(runtime.shutdown, self.core, runtime.SHUTDOWN_TIMEOUT if timeout is None else timeout)
        return 0

    def destroy(self) -> int:
        _run(_runtime().destroy, self.core)
        return 0

    def state(self, flags: int = 0) -> list[int]:
        """[state, reason] with libvirt's numbers (VIR_DOMAIN_RUNNING, VIR_DOMAIN_SHUTOFF, ...)."""
        _check_flags(flags)
        found = _run(_runtime().state, self.core.files)
        return [int(found[0]), int(found[1])]

    def isActive(self) -> int:  # noqa: N802  (libvirt-python's name)
        return int(_run(_runtime().is_running, self.core.files))

    def attach(self, socket: str) -> None:
        """Adopt a QEMU started elsewhere (its QMP socket for snapfs alone)."""
        _run(_runtime().attach, self.core, socket)

    def detach(self) -> None:
        _run(_runtime().detach, self.core)

    def live_paths(self) -> dict[str, str]:
        """{target: path of the disk's live layer}, where the domain's writes go; mirrors
        Snapshot.layer_paths()."""
        return {d.target: self.core.live_path(d.target) for d in self.core.disks}

    def live_layer_paths(self) -> dict[str, str]:
        """{target: real file of the disk's live layer}: live_paths() are stable symlinks to
        these (DESIGN section 8); hand a QEMU these, never the symlinks."""
        return {d.target: self.core.live_file(d.target) for d in self.core.disks}

    def base_paths(self) -> dict[str, str]:
        """{target: path of the disk's base image} as defined; snapfs never writes it."""
        return {d.target: d.base for d in self.core.disks}


class Snapshot:
    """A handle on one snapshot, keyed by its internal id: it survives a rename."""

    def __init__(self, domain: Domain, snap_id: str) -> None:
        self.domain = domain
        self.id = snap_id

    def _record(self) -> SnapshotRecord:
        return self.domain.core.get(self.id)

    @property
    def name(self) -> str:
        return self._record().name

    def __repr__(self) -> str:
        try:
            return f"<Snapshot {self.domain.name}/{self.name}>"
        except SnapfsError:
            return f"<Snapshot {self.domain.name}/(gone: {self.id})>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and other.id == self.id and other.domain.name == self.domain.name

    def __hash__(self) -> int:
        return hash(self.id)

    def get_xml_desc(self, flags: int = 0) -> str:
        _check_flags(flags)
        return self.domain.core.snapshot_xml(self.id)

    def deactivate(self, flags: int = DeactivateFlags.NONE) -> None:
        _check_flags(
            flags,
            int(
                DeactivateFlags.MERGE
                | DeactivateFlags.MERGE_FORCE
                | DeactivateFlags.DISCARD
                | DeactivateFlags.DISCARD_FORCE
            ),
        )
        _run(self.domain.core.deactivate, self.id, flags)

    def rename(self, name: str) -> None:
        _run(self.domain.core.rename, self.id, name)

    def set_description(self, text: str) -> None:
        _run(self.domain.core.set_description, self.id, drop_final_newline(text))

    def get_description(self) -> str:
        return self._record().description

    def get_compression(self) -> str:
        """The compression asked for this snapshot's layers: none, gzip or zstd."""
        return self._record().compression

    def set_compression(self, kind: str) -> None:
        _run(self.domain.core.set_compression, self.id, kind)

    def get_parent(self, flags: int = 0) -> Snapshot | None:
        _check_flags(flags)
        parent = self._record().parent
        return Snapshot(self.domain, parent) if parent else None

    def list_children(self) -> list[Snapshot]:
        return [Snapshot(self.domain, c.id) for c in self.domain.core.view().children(self.id)]

    def layer_paths(self) -> dict[str, str]:
        """target -> L(S): `qemu-img convert` of one gives that disk as it was at S."""
        return {d.target: self.domain.core.layer_path(d.target, self.id) for d in self.domain.core.disks}
