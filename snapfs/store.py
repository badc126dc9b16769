"""The store on disk: its layout, and the records' files (read and written atomically).

    STORE/store.lock                      serialises define/undefine
    STORE/run/<token>                     one registration per mount (notify.py)
    STORE/domains/<dom>/domain.json       name, uuid, disks (target, base, format, size)
    STORE/domains/<dom>/domain.xml        the libvirt XML as defined
    STORE/domains/<dom>/state.json        current snapshot id and a generation counter
    STORE/domains/<dom>/snapshots/<id>.json   one metadata file per snapshot
    STORE/domains/<dom>/layers/<target>/<id>.qcow2   L(S); live.qcow2 is A
    STORE/domains/<dom>/memory/<id>       a snapshot's saved guest memory (made when first needed)
    STORE/domains/<dom>/journal.json      the intent of an unfinished operation
    STORE/domains/<dom>/job               what a long operation is doing now
    STORE/domains/<dom>/last-error        the latest refusal, one line
    STORE/domains/<dom>/lock              flock'd by every operation

Every metadata file is replaced by write-temp + fsync + rename (durable.py), so a reader
that takes no lock sees each file before or after a change, never half of it. The records
themselves are plain data (records.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from .durable import (
    DirSyncs,
    atomic_write,
    flocked,
    fsync_dir,
    read_json,
    sync_dir_of,
    unlink_if_present,
    write_json,
)
from .errors import CorruptError, SnapfsError, not_found
from .records import DomainRecord, MetadataView, SnapshotRecord, carry_name_index

LOCK_WAIT_SECONDS = float(os.environ.get("SNAPFS_LOCK_WAIT", "10"))


def default_store_path() -> str:
    if os.environ.get("SNAPFS_STORE"):
        return os.environ["SNAPFS_STORE"]
    if os.geteuid() == 0:
        return "/var/lib/snapfs"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "snapfs")


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

    @property
    def memory_dir(self) -> str:
        """Where snapshots' saved guest memory goes; made by the first one that needs it."""
        return self.file("memory")

    def memory(self, snap_id: str) -> str:
        return os.path.join(self.memory_dir, snap_id)

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
        path = self.file("domain.json")
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise not_found(f"There is no domain named {self.name!r}.") from None
        try:
            record = DomainRecord.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptError(path, f"not a domain record: {exc}") from None
        if not record.disks or not all(isinstance(d.target, str) and isinstance(d.base, str) for d in record.disks):
            raise CorruptError(path, "its disks are not a list of targets and images")
        return record

    def original_xml(self) -> str:
        with open(self.file("domain.xml"), encoding="utf-8") as f:
            return f.read()

    # metadata
    def _state(self, must_exist: bool = True) -> dict:
        try:
            with open(self._state_path, "rb") as f:
                return _state_from(f.read(), self._state_path)
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
        state = self._state() if raw is None else _state_from(raw, self._state_path)  # _state: ENOENT if undefined
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
                carry_name_index(cached, view, state["changed"])
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
        path = self._snapshot_file(snap_id)
        try:
            snapshots[snap_id] = SnapshotRecord.from_json(read_json(path))
        except FileNotFoundError:
            snapshots.pop(snap_id, None)
        except (KeyError, TypeError) as exc:
            raise CorruptError(path, f"not a snapshot record: {exc}") from None

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
        import uuid  # here, not at the top: the reading verbs never write a state

        epoch = previous.get("epoch") or uuid.uuid4().hex
        state: dict = {"current": current, "epoch": epoch, "generation": previous["generation"] + 1}
        if changed is not None:
            state["changed"] = sorted(set(changed))
        write_json(self.file("state.json"), state, syncs)

    # journal
    @property
    def journal_path(self) -> str:
        return self.file("journal.json")

    def read_journal(self) -> dict | None:
        """The journal, or None; CorruptError (naming the file) if it is not one."""
        try:
            journal = read_json(self.journal_path)
        except FileNotFoundError:
            return None
        problem = _journal_problem(journal)
        if problem:
            raise CorruptError(self.journal_path, problem)
        return journal

    def write_journal(self, journal: dict) -> None:
        write_json(self.journal_path, journal)

    def clear_journal(self) -> None:
        unlink_if_present(self.journal_path)
        fsync_dir(self.path)

    # job: what a long operation is doing now, for any front end to show
    def write_job(self, line: str) -> None:
        """Plain overwrite, no fsync: a progress line is worth nothing after a crash."""
        tmp = self.file(f"job.tmp{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(line)
            os.rename(tmp, self.file("job"))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def clear_job(self) -> None:
        unlink_if_present(self.file("job"))

    def job(self) -> str:
        try:
            with open(self.file("job"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # temporaries
    def remove_temporaries(self, layer_suffixes: tuple[str, ...]) -> None:
        """Remove every temporary file of a known shape that an interrupted or failed
        operation left (the caller holds the domain's lock, so none is being written):
        atomic writes' `<file>.tmp<pid>.<thread>` and `job.tmp<pid>` in the domain and
        snapshots directories, and the engine's files built beside a layer (`layer_suffixes`).
        `last-error` is written without the lock: its temporaries go only once their
        process is gone."""
        for directory in (self.path, self.snapshots_dir):
            for name in _names(directory):
                if _is_atomic_temporary(name) and not (name.startswith("last-error.") and _pid_alive(name)):
                    unlink_if_present(os.path.join(directory, name))
        for target in _names(os.path.join(self.path, "layers")):
            directory = self.layers_dir(target)
            for name in _names(directory):
                if name.endswith(layer_suffixes) or _is_atomic_temporary(name):
                    unlink_if_present(os.path.join(directory, name))

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


_TEMPORARY = re.compile(r"(^job\.tmp\d+$)|(\.tmp\d+\.\d+$)")


def _is_atomic_temporary(name: str) -> bool:
    return _TEMPORARY.search(name) is not None


def _pid_alive(name: str) -> bool:
    """Whether the process whose pid a temporary's name carries (".tmp<pid>.") still runs."""
    found = re.search(r"\.tmp(\d+)", name)
    if not found:
        return False
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _state_from(raw: bytes, path: str) -> dict:
    """state.json's content checked: CorruptError (naming the file) if it is not a state."""
    try:
        state = json.loads(raw)
    except ValueError:
        raise CorruptError(path, "not valid JSON" if raw.strip() else "empty") from None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("generation"), int)
        and (state.get("current") is None or isinstance(state.get("current"), str))
    ):
        raise CorruptError(path, "not a domain state (current, generation)")
    return state


def _journal_problem(journal: dict) -> str | None:
    """What makes a journal unusable, or None: an operation, steps that are objects with
    a `do`, and a `done` within them."""
    steps = journal.get("steps")
    if not isinstance(journal.get("operation"), str):
        return "it names no operation"
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("do"), str) for s in steps):
        return "its steps are not a list of steps"
    done = journal.get("done")
    if not isinstance(done, int) or not 0 <= done <= len(steps):
        return "its progress is not a step number"
    return None


class StoreFiles:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.domains_dir = os.path.join(self.root, "domains")
        self._domains: dict[str, DomainFiles] = {}

    def ensure(self) -> None:
        """Make the store if it is not there: its directory 0700 whatever the umask (VM disks
        are nobody else's business; to share read access with a group, see the README)."""
        try:
            if not os.path.isdir(self.root):
                os.makedirs(os.path.dirname(self.root), exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.root, 0o700)
                    os.chmod(self.root, 0o700)
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
