"""Deterministic checks behind test_concurrency.py's invariants (one outcome per request,
and no plan made from an out-of-date metadata view).

The report: once, test_many_hands_one_domain found a snapshot created through a mount
missing while no worker reported removing it. Traced (the mount logging every write and
every plan): a worker's `discard` through `control` was refused with EBUSY (something
depended on the snapshot); Python's close() sent the same bytes again
(BufferedWriter.close flushes once more after the failed flush of TextIOWrapper.close);
by then the dependent was gone, the mount carried the discard out and answered that
second write with success, and close() still raised the first EBUSY. snapfs acted on
each request exactly as asked; the worker's model of "refused means not done" did not
hold for a buffered Python write. The worker now writes once, as `echo` does.

test_buffered_close_resends_a_refused_control_write replays that sequence step by step
(with the domain lock instead of a dependent, to make the timing exact): the mount now
refuses every write on a handle after a refused one, so the re-sent bytes do nothing.

The rest pins the metadata view cache (store.DomainFiles.view) that every plan is made
from under the domain lock: a cache one generation behind re-reads only the snapshot
files the latest change names; any other gap reloads everything; every operation bumps
the generation by exactly one and names every file it wrote or deleted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import threading
import time

import pytest
import trio
from factory import new_domain
from fsfixtures import Mount, define_store

import snapfs
from snapfs.catalog import StoreCore
from snapfs.domain import DomainCore
from snapfs.durable import read_json
from snapfs.records import MetadataView
from snapfs.store import DomainFiles

DOM = "vm1"
LOCK_WAIT = 2.0  # the mount's SNAPFS_LOCK_WAIT in the control-write tests


# ---- one request, one outcome: control writes through a mount --------------------------------
class HeldLock:
    """The domain's flock, held by the test the way any snapfs operation holds it."""

    def __init__(self, store_root: str) -> None:
        self.fd = os.open(os.path.join(store_root, "domains", DOM, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def mounted(tmp_path):
    """vm1 with s1 <- s2, current s1 (so s2 is a leaf nothing depends on), mounted with a
    short lock wait."""
    setup = define_store(str(tmp_path))
    domain = api_domain(setup.root)
    s1 = domain.snapshot_create_xml(snapshot_xml("s1"))
    domain.snapshot_create_xml(snapshot_xml("s2"))
    domain.create_with_snapshot(s1)
    mount = Mount(setup.root, str(tmp_path / "mnt"), {"SNAPFS_LOCK_WAIT": str(LOCK_WAIT)})
    mount.start()
    try:
        yield setup.root, mount
    finally:
        assert mount.stop() == 0, mount.log()


def api_domain(store_root: str) -> snapfs.Domain:
    return snapfs.Store(snapfs.api.open_store_core(store_root)).lookup_domain(DOM)


def snapshot_xml(name: str) -> str:
    return f"<domainsnapshot><name>{name}</name></domainsnapshot>"


def names(store_root: str) -> set[str]:
    return set(api_domain(store_root).list_snapshot_names())


def last_error(store_root: str) -> str:
    try:
        with open(os.path.join(store_root, "domains", DOM, "last-error"), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def os_write_once(path: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"discard\n")
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return 0


def shell_echo(path: str) -> int:
    run = subprocess.run(["bash", "-c", 'echo discard > "$1"', "bash", path], capture_output=True, text=True)
    return errno.EBUSY if run.returncode != 0 and "busy" in run.stderr.lower() else run.returncode


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write", [os_write_once, shell_echo], ids=["os.write", "echo"])
def test_a_refused_single_write_changes_nothing(mounted, write):
    """One write(2) refused (EBUSY: the lock stayed held past the wait) did nothing, and
    nothing of it is left to happen once the lock is free."""
    root, mount = mounted
    control = os.path.join(mount.path, DOM, "snapshots", "s2", "control")
    lock = HeldLock(root)
    try:
        assert write(control) == errno.EBUSY
    finally:
        lock.release()
    assert "Another operation holds domain" in last_error(root)
    # One more operation takes the lock: anything still queued would have run before it.
    api_domain(root).snapshot_create_xml(snapshot_xml("s3"))
    assert names(root) == {"s1", "s2", "s3"}
    assert os_write_once(control) == 0  # and the same single write, once free, acts once
    assert names(root) == {"s1", "s3"}


@pytest.mark.timeout(60)
def test_buffered_close_resends_a_refused_control_write(mounted):
    """The sequence behind the report: `with open(control, "w") as f: f.write("discard\\n")`
    gets EBUSY from close(), and close() sends the bytes again. The mount refuses every
    write after a refused one on the same handle, so s2 is NOT discarded: what the caller
    is told (refused) is what happened."""
    root, mount = mounted
    control = os.path.join(mount.path, DOM, "snapshots", "s2", "control")
    outcome: list[BaseException | None] = []

    def buffered_write() -> None:
        try:
            with open(control, "w") as f:
                f.write("discard\n")
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    lock = HeldLock(root)
    writer = threading.Thread(target=buffered_write)
    try:
        writer.start()
        # The first write waits LOCK_WAIT for the lock and is refused (last-error says so);
        # close() sends the bytes again at once, and that write waits for the lock anew.
        wait_for(lambda: "Another operation holds domain" in last_error(root), "the first write to be refused")
    finally:
        lock.release()
    writer.join(timeout=30)
    assert not writer.is_alive()
    [error] = outcome
    assert isinstance(error, OSError) and error.errno == errno.EBUSY, error  # close() reports the first write
    assert names(root) == {"s1", "s2"}  # ... and the re-sent bytes were refused too


# ---- the metadata view cache ---------------------------------------------------------------
class Counting(DomainFiles):
    """A reader (another process's cache) that counts its full reloads."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.full_loads = 0

    def _load_all(self):
        self.full_loads += 1
        return super()._load_all()


def fresh(path: str) -> MetadataView:
    """What a process opening the store now reads: everything, from disk."""
    return DomainFiles(path).view()


def same(a: MetadataView, b: MetadataView) -> bool:
    return (a.generation, a.current, a.snapshots, a.epoch) == (b.generation, b.current, b.snapshots, b.epoch)


@pytest.fixture
def core(tmp_path) -> DomainCore:
    new_domain(str(tmp_path), DOM)
    return StoreCore(str(tmp_path / "store")).domain(DOM)


@pytest.fixture
def where(tmp_path) -> str:
    """The domain's directory in the store (DESIGN's layout): what DomainFiles reads."""
    return str(tmp_path / "store" / "domains" / DOM)


def run(fn, *args):
    return trio.run(fn, *args)


def test_every_operation_bumps_the_generation_once_and_names_what_it_changed(core, where):
    """After each kind of operation, a cache exactly one generation behind (re-reading only
    the files the change names) equals a full reading from disk."""
    reader = Counting(where)
    reader.view()
    ids: dict[str, str] = {}

    def create(name: str):
        async def go() -> None:
            ids[name] = (await core.create(name)).id

        return go

    steps = [
        ("create a", create("a")),
        ("create b", create("b")),
        ("create c", create("c")),  # a <- b <- c, current c
        ("rename c", lambda: core.rename(ids["c"], "c2")),
        ("description b", lambda: core.set_description(ids["b"], "kept")),
        ("compression a", lambda: core.set_compression(ids["a"], "zstd")),
        ("merge b, one dependent", lambda: core.merge(ids["b"])),  # a <- c2
        ("revert a", lambda: core.revert(ids["a"])),
        ("merge a, two dependents", lambda: core.merge(ids["a"])),  # c2 a root; live on the base
        ("create d", create("d")),
        ("revert c2", lambda: core.revert(ids["c"])),
        ("deactivate c2", lambda: core.deactivate_only(ids["c"])),
        ("create e", create("e")),
        ("create f", create("f")),
        ("discard d", lambda: core.discard(ids["d"])),
        ("discard-force e, live inside", lambda: core.discard_force(ids["e"])),
    ]
    for what, step in steps:
        before = fresh(where).generation
        run(step)
        after = fresh(where)
        assert after.generation == before + 1, what
        assert same(reader.view(), after), what
    assert reader.full_loads == 1, "a cache one generation behind re-reads only the named files"
    assert sorted(r.name for r in fresh(where).snapshots.values()) == ["c2"]


def test_a_cache_two_generations_behind_reloads_everything(core, where):
    """Another process made two changes: the latest names only its own file, so applying
    it alone would miss the first; the generation gap sends the reader to a full reload."""
    reader = Counting(where)
    reader.view()
    run(core.create, "s1")
    s2 = run(core.create, "s2")
    state = read_json(os.path.join(where, "state.json"))
    assert state["changed"] == [s2.id]  # s1 is not named by the latest change
    view = reader.view()
    assert reader.full_loads == 2
    assert same(view, fresh(where))
    assert sorted(r.name for r in view.snapshots.values()) == ["s1", "s2"]


def test_two_processes_plan_from_the_latest_state(core, where, tmp_path):
    """Two cores on one domain (two processes' caches), each a step or two behind the
    other, alternate operations; every plan sees what the other did: s2 made by B is seen
    by A's merge of s1 (one dependent, not the live disk), and so on."""
    other = StoreCore(os.path.dirname(os.path.dirname(where))).domain(DOM)
    assert other is not core and other.files is not core.files
    s1 = run(core.create, "s1")
    core.view()
    s2 = run(other.create, "s2")  # A's cache: one behind
    run(other.create, "s3")  # A's cache: two behind
    run(core.merge, s1.id)  # A plans: s2 is s1's only dependent (commit s2 into L(s1))
    assert {r.name: r.parent for r in fresh(where).snapshots.values()} == {"s2": None, "s3": s2.id}
    run(other.discard_force, s2.id)  # B is one behind (A's merge): the subtree is s2 and s3
    view = fresh(where)
    assert view.snapshots == {} and view.current is None
    assert same(core.view(), view) and same(other.view(), view)


class ScanHook(DomainFiles):
    """A reader whose next full reload lets `before_scan` run after state.json was read
    and before the snapshot files are: a writer's change landing in between."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.before_scan = None
        self.full_loads = 0

    def _load_all(self):
        self.full_loads += 1
        hook, self.before_scan = self.before_scan, None
        if hook is not None:
            hook()
        return super()._load_all()


def test_a_full_reload_racing_a_writer_is_corrected(core, where):
    """A reader that read state.json at generation N and then scanned the snapshot files
    while a writer finished change N+1 holds newer files under generation N. That is safe:
    the next reading sees N+1, exactly one behind, and re-reads the files it names. (A
    file can never be older than its label: state.json is written last and read first.)"""
    s1 = run(core.create, "s1")
    reader = ScanHook(where)
    reader.before_scan = lambda: run(core.set_description, s1.id, "written during the scan")
    stale = reader.view()
    assert stale.generation == 2  # define was 1, create s1 was 2
    assert stale.snapshots[s1.id].description == "written during the scan"  # a file from generation 3
    run(core.create, "s2")
    run(core.set_description, s1.id, "and again")
    assert reader.view().generation == 5  # 2 -> 5: a gap, so a full reload
    run(core.rename, s1.id, "s1b")
    view = reader.view()
    assert same(view, fresh(where))
    assert view.snapshots[s1.id].name == "s1b" and view.snapshots[s1.id].description == "and again"
    assert reader.full_loads == 2  # the first, and the gap; the rename came in incrementally
