"""The store on disk: its layout, and the records' files (read and written atomically).

    STORE/store.lock                      serialises define/undefine
    STORE/run/<token>                     one registration per mount (notify.py)
    STORE/domains/<dom>/domain.json       name, uuid, disks (target, base, format, size)
    STORE/domains/<dom>/domain.xml        the libvirt XML as defined
    STORE/domains/<dom>/state.json        current snapshot id, a generation counter, and
                                          `live`: {target: basename of the live layer's real file}
    STORE/domains/<dom>/snapshots/<id>.json   one metadata file per snapshot (`layers`: its real files)
    STORE/domains/<dom>/layers/<target>/<uuid>.qcow2  the real layer files (L(S) of each snapshot,
                                          and A); a file keeps its name from birth to deletion
    STORE/domains/<dom>/layers/<target>/live.qcow2    -> <uuid>.qcow2: the live layer's stable
                                          name, a relative symlink retargeted atomically
    STORE/domains/<dom>/memory/<id>       a snapshot's saved guest memory (made when first needed)
    STORE/domains/<dom>/staged/<target>.qcow2  the next live layer, made ahead (engines/qemu_img.py
                                          prestage): never a layer until a create renames it into layers/
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
from collections.abc import AsyncIterator, Callable

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
from .plaindata import asdict
from .records import (
    LIVE_LINK,
    DomainRecord,
    Layered,
    MetadataView,
    SnapshotRecord,
    carry_name_index,
    fresh_layer_name,
    layer_name,
    live_name,
)

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
        self._clean_stamps: dict[str, tuple[int, ...] | None] = {}  # remove_temporaries

    # paths
    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def snapshots_dir(self) -> str:
        return self.file("snapshots")

    def layers_dir(self, target: str) -> str:
        return os.path.join(self.path, "layers", target)

    def layer_path(self, target: str, name: str) -> str:
        """The real layer file `name` (a basename) of disk `target`."""
        return os.path.join(self.layers_dir(target), name)

    def snapshot_layer(self, record: SnapshotRecord, target: str) -> str:
        """The real path of L(S) on disk `target`."""
        return self.layer_path(target, layer_name(record, target))

    def live_layer(self, view: MetadataView, target: str) -> str:
        """The real path of the live layer of disk `target` (what QEMU and qemu-img are given)."""
        return self.layer_path(target, live_name(view, target))

    def staged_path(self, target: str) -> str:
        """Disk `target`'s pre-staged next live layer (outside layers/: never taken for one)."""
        return os.path.join(self.path, STAGED_DIR, f"{target}.qcow2")

    def live_link(self, target: str) -> str:
        """The live layer's stable path: a symlink to its real file (DESIGN section 8)."""
        return self.layer_path(target, LIVE_LINK)

    def check_live_links(self, view: MetadataView) -> None:
        """CorruptError unless each disk's live.qcow2 is exactly the symlink to the live
        layer the state names (recovery finishing a journal is the only time it may not be)."""
        for target, name in view.live.items():
            link = self.live_link(target)
            try:
                shown = os.readlink(link)
            except OSError:
                shown = None
            if shown != name:
                raise CorruptError(link, f"it should be a symbolic link to {name}")

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

    def live_names(self) -> dict[str, str]:
        """state.json's `live` ({target: basename of the live layer's real file}), read now."""
        live = self._state().get("live")
        return dict(live) if _is_live_names(live) else {}

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
                updates = {snap_id: self._read_one(snap_id) for snap_id in state["changed"]}
                snapshots = Layered.carried(cached.snapshots, updates)  # O(changes), not a copy of every record
                view = MetadataView(generation, state["current"], snapshots, epoch, state.get("live") or {})
                carry_name_index(cached, view, state["changed"])
                cached = self._cache = view
            else:
                snapshots = self._load_all()
                cached = self._cache = MetadataView(
                    generation, state["current"], snapshots, epoch, state.get("live") or {}
                )
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
                    snap_id = entry.name[: -len(".json")]
                    record = self._read_one(snap_id)
                    if record is not None:
                        snapshots[snap_id] = record
        return snapshots

    def _read_one(self, snap_id: str) -> SnapshotRecord | None:
        """The snapshot's record, or None when its file is gone."""
        path = self._snapshot_file(snap_id)
        try:
            record = SnapshotRecord.from_json(read_json(path))
        except FileNotFoundError:
            return None
        except (KeyError, TypeError) as exc:
            raise CorruptError(path, f"not a snapshot record: {exc}") from None
        if record.layers is not None and not _is_live_names(record.layers):
            raise CorruptError(path, "its layers are not file names")
        return record

    def write_snapshot(self, record: SnapshotRecord, syncs: DirSyncs | None = None) -> None:
        write_json(self._snapshot_file(record.id), asdict(record), syncs)

    def delete_snapshot(self, snap_id: str, syncs: DirSyncs | None = None) -> None:
        path = self._snapshot_file(snap_id)
        unlink_if_present(path)
        sync_dir_of(path, syncs)

    def write_state(
        self,
        current: str | None,
        changed: list[str] | None = None,
        syncs: DirSyncs | None = None,
        live: dict[str, str] | None = None,
    ) -> None:
        """Record current (and the live layers' real names, when they change) and bump the
        generation: the last write of every change.

        `changed` names the snapshot files the change wrote or deleted, so a reader one
        generation behind re-reads only those instead of every snapshot's file."""
        previous = self._state(must_exist=False)
        import uuid  # here, not at the top: the reading verbs never write a state

        epoch = previous.get("epoch") or uuid.uuid4().hex
        state: dict = {"current": current, "epoch": epoch, "generation": previous["generation"] + 1}
        live = live if live is not None else previous.get("live")
        if live is not None:
            state["live"] = dict(live)
        if changed is not None:
            state["changed"] = sorted(set(changed))
        write_json(self.file("state.json"), state, syncs)

    # the layout of DESIGN section 8, carried over from a store made before it
    def needs_carry_over(self, targets: list[str]) -> bool:
        """Whether a disk's live.qcow2 is still the live layer's real file (a store made
        before live layers had names of their own), or the state does not name them yet."""
        # state.json alone (not every snapshot's record): every open of the store asks this
        return not self._state().get("live") or any(not os.path.islink(self.live_link(t)) for t in targets)

    def carry_over(self, targets: list[str]) -> None:
        """Give an old-layout domain's live layers real names of their own: record
        live={t: <uuid>.qcow2} in the state (durable) first, then per disk hard-link
        live.qcow2 to that name and rename a symlink to it over live.qcow2. Safe to run
        again from any point: live.qcow2 is always the regular file or the symlink to the
        same inode. The caller holds the domain's lock and has finished its journal; EBUSY
        (nothing changed) while a process holds a live layer."""
        from . import layerlock  # only an old store needs it here

        view = self.view()
        live = dict(view.live)
        regular = [t for t in targets if not os.path.islink(self.live_link(t))]
        busy = layerlock.in_use([self.live_link(t) for t in regular])
        if busy is not None:
            target = os.path.basename(os.path.dirname(busy))
            raise SnapfsError(
                errno.EBUSY,
                f"The live disk {target} of domain {self.name!r} is in use by another process, so its layer "
                "cannot be given the new layout's name yet; the next change on the domain does it once it is closed.",
            )
        if any(t not in live for t in targets):
            live.update({t: fresh_layer_name() for t in targets if t not in live})
            self.write_state(view.current, [], live=live)
            _carry_over_point("state")
        for target in regular:
            self._link_live_to_own_name(target, live[target])

    def _link_live_to_own_name(self, target: str, name: str) -> None:
        link, real = self.live_link(target), self.layer_path(target, name)
        try:
            os.link(link, real)
        except FileExistsError:
            if not os.path.samestat(os.stat(real), os.lstat(link)):
                raise CorruptError(real, f"it should be the same file as {link}") from None
        fsync_dir(self.layers_dir(target))
        _carry_over_point(f"{target}:link")
        replace_with_symlink(link, name, crash_point=lambda: _carry_over_point(f"{target}:symlink"))
        _carry_over_point(f"{target}:done")

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

    def clear_journal(self, durable: bool = True) -> None:
        unlink_if_present(self.journal_path)
        if durable:
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
    def remove_temporaries(self, layer_suffixes: tuple[str, ...], thorough: bool = True) -> None:
        """Remove every temporary file of a known shape that an interrupted or failed
        operation left (the caller holds the domain's lock, so none is being written):
        atomic writes' `<file>.tmp<pid>.<thread>` and `job.tmp<pid>` in the domain and
        snapshots directories, and the engine's files built beside a layer (`layer_suffixes`).
        `last-error` is written without the lock: its temporaries go only once their
        process is gone.

        The small directories (the domain's, staged/) are always listed. The large ones
        (snapshots/, layers/<target>/: one entry per snapshot) are skipped unless
        `thorough` when this process saw them clean at the end of its last operation and
        they have not changed since (remember_clean): with no journal pending, every
        temporary in them was renamed or removed by the operation that made it."""
        for directory in (self.path, self.file(STAGED_DIR)):
            self._remove_in(directory, layer_suffixes)
        for directory in self._large_dirs():
            if thorough or self._clean_stamps.pop(directory, _UNSEEN) != _dir_stamp(directory):
                self._remove_in(directory, layer_suffixes)

    def remember_clean(self) -> None:
        """Note the large directories as clean: called under the lock right after an
        operation finished (its journal cleared), so none holds a temporary."""
        self._clean_stamps = {directory: _dir_stamp(directory) for directory in self._large_dirs()}

    def forget_clean(self) -> None:
        """The next remove_temporaries lists every directory again."""
        self._clean_stamps = {}

    def _large_dirs(self) -> list[str]:
        targets = _names(os.path.join(self.path, "layers"))
        return [self.snapshots_dir, *(self.layers_dir(target) for target in targets)]

    def _remove_in(self, directory: str, layer_suffixes: tuple[str, ...]) -> None:
        in_layers = directory != self.path and directory != self.snapshots_dir
        for name in _names(directory):
            if in_layers and name.endswith((*layer_suffixes, STAGING_SUFFIX)):
                unlink_if_present(os.path.join(directory, name))
            elif _is_atomic_temporary(name) and not (name.startswith("last-error.") and _pid_alive(name)):
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
        """The domain's exclusive lock (flock), polled without blocking the event loop;
        taken once this process's pre-staging on the domain (prestage.py) is done."""
        from . import prestage

        await prestage.wait_for(self.path)
        async with flocked(self.file("lock"), f"Another operation holds domain {self.name!r}.", wait):
            yield


def replace_with_symlink(
    path: str, target: str, syncs: DirSyncs | None = None, crash_point: Callable[[], None] | None = None
) -> None:
    """Make `path` a symlink to `target` atomically (a new symlink renamed over it): the
    one way a live layer's stable name is retargeted. Idempotent."""
    tmp = path + LINK_SUFFIX
    unlink_if_present(tmp)
    os.symlink(target, tmp)
    if crash_point is not None:
        crash_point()
    os.rename(tmp, path)
    sync_dir_of(path, syncs)


def staged_beside(layer: str) -> str:
    """The pre-staged next live layer of the disk whose layer file `layer` is
    (<dom>/layers/<target>/<name> -> <dom>/staged/<target>.qcow2)."""
    disk_dir = os.path.dirname(layer)
    return os.path.join(os.path.dirname(os.path.dirname(disk_dir)), STAGED_DIR, os.path.basename(disk_dir) + ".qcow2")


def _carry_over_point(point: str) -> None:
    """Fault injection for the tests (as journal.fault_point): SNAPFS_CRASH_AT=carry-over:<point>
    kills the process there, as a power cut would."""
    if os.environ.get("SNAPFS_CRASH_AT") == f"carry-over:{point}":
        os._exit(86)


LINK_SUFFIX = ".link"  # a symlink being made beside live.qcow2; recovery removes one left over
STAGED_DIR = "staged"  # the pre-staged next live layers, one per disk (<target>.qcow2)
STAGING_SUFFIX = ".part"  # a pre-staged layer being made; removed with the other temporaries
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


_UNSEEN = ()  # no directory's stamp


def _dir_stamp(directory: str) -> tuple[int, ...] | None:
    """What changes when an entry is added to or removed from a directory (None: absent)."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


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
        and _is_live_names(state.get("live", {}))
    ):
        raise CorruptError(path, "not a domain state (current, generation, live)")
    return state


def _is_live_names(live: object) -> bool:
    """{target: basename}: bare file names, never a path (they are joined to a layer directory)."""
    return isinstance(live, dict) and all(
        isinstance(t, str) and isinstance(n, str) and n and "/" not in n and n not in (".", "..", LIVE_LINK)
        for t, n in live.items()
    )


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
