"""The store on disk: layout, atomic metadata writes, per-domain locks, the journal.

    STORE/store.lock                      serialises define/undefine
    STORE/domains/<dom>/domain.json       name, uuid, disks (target, base, format, size)
    STORE/domains/<dom>/domain.xml        the libvirt XML as defined
    STORE/domains/<dom>/state.json        current snapshot id and a generation counter
    STORE/domains/<dom>/snapshots/<id>.json   one metadata file per snapshot
    STORE/domains/<dom>/layers/<target>/<id>.qcow2   L(S); live.qcow2 is A
    STORE/domains/<dom>/journal.json      the intent of an unfinished operation
    STORE/domains/<dom>/last-error        the latest refusal, one line
    STORE/domains/<dom>/lock              flock'd by every operation

Every metadata file is replaced by write-temp + fsync + rename, so a reader that takes
no lock sees each file before or after a change, never half of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import trio

from .errors import SnapfsError, busy, not_found

LIVE = "live"
LOCK_WAIT_SECONDS = float(os.environ.get("SNAPFS_LOCK_WAIT", "10"))


def default_store_path() -> str:
    if os.environ.get("SNAPFS_STORE"):
        return os.environ["SNAPFS_STORE"]
    if os.geteuid() == 0:
        return "/var/lib/snapfs"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "snapfs")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSyncs:
    """Directories whose entries a journalled operation changed and has not fsynced yet.

    A step's rename is durable once its directory is fsynced; the journal only needs that
    before it records the step as done (and before it is cleared). So the steps between
    two journal writes leave their directories here, and flush() fsyncs each once, just
    before the journal is written: on ext4 the first fsync commits them all, the others
    find nothing to do. Files themselves are still fsynced before they are renamed into
    place, so a path never holds a half-written file."""

    def __init__(self) -> None:
        self.dirs: set[str] = set()

    def add(self, directory: str) -> None:
        self.dirs.add(directory)

    def flush(self) -> None:
        while self.dirs:
            fsync_dir(self.dirs.pop())


def sync_dir_of(path: str, syncs: DirSyncs | None) -> None:
    """fsync path's directory now, or leave it to syncs.flush()."""
    if syncs is None:
        fsync_dir(os.path.dirname(path))
    else:
        syncs.add(os.path.dirname(path))


def atomic_write(path: str, data: bytes, syncs: DirSyncs | None = None) -> None:
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    sync_dir_of(path, syncs)


def write_json(path: str, obj: object, syncs: DirSyncs | None = None) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode(), syncs)


def read_json(path: str) -> dict:
    with open(path, "rb") as f:
        return json.load(f)


def unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass
class DiskRecord:
    target: str
    base: str
    format: str
    size: int


@dataclass
class DomainRecord:
    name: str
    uuid: str
    disks: list[DiskRecord]
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> DomainRecord:
        disks = [DiskRecord(**d) for d in data["disks"]]
        return cls(data["name"], data["uuid"], disks, list(data.get("skipped", [])))


@dataclass
class SnapshotRecord:
    id: str
    name: str
    parent: str | None
    creation_time: int
    description: str = ""
    state: str = "shutoff"
    compression: str = "none"

    @classmethod
    def from_json(cls, data: dict) -> SnapshotRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class MetadataView:
    """One consistent-enough reading of a domain's metadata (see DomainFiles.view)."""

    generation: int
    current: str | None
    snapshots: dict[str, SnapshotRecord]
    epoch: str | None = None

    @functools.cached_property
    def _by_name(self) -> dict[str, SnapshotRecord]:
        return {record.name: record for record in self.snapshots.values()}

    @functools.cached_property
    def _children(self) -> dict[str | None, list[SnapshotRecord]]:
        kids: dict[str | None, list[SnapshotRecord]] = {}
        for record in sorted(self.snapshots.values(), key=lambda r: (r.creation_time, r.name)):
            kids.setdefault(record.parent, []).append(record)
        return kids

    def by_name(self, name: str) -> SnapshotRecord | None:
        return self._by_name.get(name)

    def children(self, snap_id: str | None) -> list[SnapshotRecord]:
        """Oldest first. Indexes are built once per view, so walking a tree stays linear."""
        return list(self._children.get(snap_id, ()))


def _carry_name_index(old: MetadataView, new: MetadataView, changed: list[str]) -> None:
    """Give `new` the name index of `old` updated for the changed ids, if `old` had built
    one: copying a dict of 10,000 names costs a tenth of building it again."""
    names = old.__dict__.get("_by_name")
    if names is None:
        return
    names = dict(names)
    for snap_id in changed:
        before, after = old.snapshots.get(snap_id), new.snapshots.get(snap_id)
        if before is not None and names.get(before.name) is before:
            del names[before.name]
        if after is not None:
            names[after.name] = after
    new.__dict__["_by_name"] = names  # what cached_property itself would store


class DomainFiles:
    """Paths and metadata I/O of one domain directory. Knows no snapshot rule."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self._cache: MetadataView | None = None
        self._seen: tuple[bytes, MetadataView] | None = None  # state.json's bytes and their view
        self._cache_lock = threading.Lock()
        self._state_path = os.path.join(path, "state.json")
        self._domain_json = os.path.join(path, "domain.json")

    # paths
    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def snapshots_dir(self) -> str:
        return self.file("snapshots")

    def layers_dir(self, target: str) -> str:
        return os.path.join(self.path, "layers", target)

    def layer(self, target: str, snap_id: str) -> str:
        """L(S) for a snapshot id, or A for LIVE."""
        return os.path.join(self.layers_dir(target), f"{snap_id}.qcow2")

    def definition_id(self) -> tuple[int, ...] | None:
        """Identity of this definition (domain.json is written once, at define), or None
        when the domain does not exist: tells a domain redefined under the same name. The
        inode number alone is not enough: a file system reuses a freed one at once."""
        try:
            st = os.stat(self._domain_json)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) if stat.S_ISREG(st.st_mode) else None

    def exists(self) -> bool:
        try:
            return stat.S_ISREG(os.stat(self._domain_json).st_mode)
        except OSError:
            return False

    # domain definition
    def record(self) -> DomainRecord:
        try:
            return DomainRecord.from_json(read_json(self.file("domain.json")))
        except FileNotFoundError:
            raise not_found(f"There is no domain named {self.name!r}.") from None

    def original_xml(self) -> str:
        with open(self.file("domain.xml"), encoding="utf-8") as f:
            return f.read()

    # metadata
    def _state(self, must_exist: bool = True) -> dict:
        try:
            return read_json(self.file("state.json"))
        except FileNotFoundError:
            if must_exist and not self.exists():
                raise not_found(f"There is no domain named {self.name!r}.") from None
            return {"current": None, "generation": 0}

    def _state_bytes(self) -> bytes | None:
        """state.json as bytes (None when absent): a few syscalls, no parsing."""
        try:
            fd = os.open(self._state_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 16)
                chunks.append(chunk)
                if len(chunk) < 1 << 16:
                    return b"".join(chunks)
        finally:
            os.close(fd)

    def view(self) -> MetadataView:
        """The metadata, reloaded only when state.json changed.

        Every change rewrites state.json last (write-temp + rename) with generation + 1,
        so state.json's bytes being the ones the cached view was read under means nothing
        changed: a call costs an open, a read and a close, and no parsing. A reader never
        waits for the domain lock. The epoch (a random token made when the domain is
        defined) keeps a domain undefined and defined again under the same name from being
        taken for the old one.
        """
        raw = self._state_bytes()
        seen = self._seen
        if seen is not None and raw == seen[0]:
            return seen[1]
        if raw is None:
            state = self._state()  # raises ENOENT unless the domain exists
        else:
            state = json.loads(raw)
        with self._cache_lock:
            cached = self._cache
            epoch, generation = state.get("epoch"), state["generation"]
            if cached is not None and cached.epoch == epoch and cached.generation == generation:
                pass
            elif (
                cached is not None
                and cached.epoch == epoch
                and cached.generation == generation - 1
                and "changed" in state
            ):
                snapshots = dict(cached.snapshots)
                for snap_id in state["changed"]:
                    self._reload_one(snapshots, snap_id)
                view = MetadataView(generation, state["current"], snapshots, epoch)
                _carry_name_index(cached, view, state["changed"])
                cached = self._cache = view
            else:
                cached = self._cache = MetadataView(generation, state["current"], self._load_all(), epoch)
            if raw is not None:
                self._seen = (raw, cached)
            return cached

    def _snapshot_file(self, snap_id: str) -> str:
        return os.path.join(self.snapshots_dir, f"{snap_id}.json")

    def _load_all(self) -> dict[str, SnapshotRecord]:
        snapshots: dict[str, SnapshotRecord] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.snapshots_dir):
                if entry.name.endswith(".json"):
                    self._reload_one(snapshots, entry.name[: -len(".json")])
        return snapshots

    def _reload_one(self, snapshots: dict[str, SnapshotRecord], snap_id: str) -> None:
        try:
            snapshots[snap_id] = SnapshotRecord.from_json(read_json(self._snapshot_file(snap_id)))
        except FileNotFoundError:
            snapshots.pop(snap_id, None)

    def write_snapshot(self, record: SnapshotRecord, syncs: DirSyncs | None = None) -> None:
        write_json(self._snapshot_file(record.id), asdict(record), syncs)

    def delete_snapshot(self, snap_id: str, syncs: DirSyncs | None = None) -> None:
        path = self._snapshot_file(snap_id)
        unlink_if_present(path)
        sync_dir_of(path, syncs)

    def write_state(self, current: str | None, changed: list[str] | None = None, syncs: DirSyncs | None = None) -> None:
        """Record current and bump the generation: the last write of every change.

        `changed` names the snapshot files the change wrote or deleted, so a reader one
        generation behind re-reads only those instead of every snapshot's file."""
        previous = self._state(must_exist=False)
        epoch = previous.get("epoch") or uuid.uuid4().hex
        state: dict = {"current": current, "epoch": epoch, "generation": previous["generation"] + 1}
        if changed is not None:
            state["changed"] = sorted(set(changed))
        write_json(self.file("state.json"), state, syncs)

    def current(self) -> str | None:
        return self._state()["current"]

    # journal
    @property
    def journal_path(self) -> str:
        return self.file("journal.json")

    def read_journal(self) -> dict | None:
        try:
            return read_json(self.journal_path)
        except FileNotFoundError:
            return None

    def write_journal(self, journal: dict) -> None:
        write_json(self.journal_path, journal)

    def clear_journal(self) -> None:
        unlink_if_present(self.journal_path)
        fsync_dir(self.path)

    # job: what a long operation is doing now, for any front end to show
    def write_job(self, line: str) -> None:
        """Plain overwrite, no fsync: a progress line is worth nothing after a crash."""
        with contextlib.suppress(OSError):
            tmp = self.file(f"job.tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(line)
            os.rename(tmp, self.file("job"))

    def clear_job(self) -> None:
        unlink_if_present(self.file("job"))

    def job(self) -> str:
        try:
            with open(self.file("job"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # last-error
    def record_error(self, operation: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {operation}: {' '.join(message.split())}\n"
        with contextlib.suppress(OSError):
            atomic_write(self.file("last-error"), line.encode())

    def last_error(self) -> str:
        try:
            with open(self.file("last-error"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # lock
    @contextlib.asynccontextmanager
    async def locked(self, wait: float = LOCK_WAIT_SECONDS) -> AsyncIterator[None]:
        """The domain's exclusive lock (flock), polled without blocking the event loop."""
        async with flocked(self.file("lock"), f"Another operation holds domain {self.name!r}.", wait):
            yield


@contextlib.asynccontextmanager
async def flocked(path: str, busy_message: str, wait: float) -> AsyncIterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise not_found(busy_message) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy(busy_message) from None
                await trio.sleep(0.02)
        yield
    finally:
        os.close(fd)


class StoreFiles:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.domains_dir = os.path.join(self.root, "domains")
        self._domains: dict[str, DomainFiles] = {}

    def ensure(self) -> None:
        try:
            os.makedirs(self.domains_dir, exist_ok=True)
        except OSError as exc:
            raise SnapfsError(exc.errno or errno.EIO, f"Cannot use store {self.root}: {exc.strerror}.") from exc

    def domain_names(self) -> list[str]:
        try:
            names = os.listdir(self.domains_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if os.path.isfile(os.path.join(self.domains_dir, n, "domain.json")))

    def domain(self, name: str) -> DomainFiles:
        files = self._domains.get(name)
        if files is None:
            files = DomainFiles(os.path.join(self.domains_dir, name))
            self._domains[name] = files
        return files

    def locked(self) -> contextlib.AbstractAsyncContextManager[None]:
        return flocked(
            os.path.join(self.root, "store.lock"), "Another define or undefine holds the store.", LOCK_WAIT_SECONDS
        )
