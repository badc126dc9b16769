"""Several processes at once on one store (DESIGN section 5: the domain lock).

test_many_hands_one_domain: for a bounded time, CLI workers create/merge/discard/revert,
two mounts of the same store do mkdir / echo WORD > control / rmdir, and readers run
`ls -lR` and `cat` on both mounts. Refusals that a race explains are logged outcomes
(EBUSY "Another operation holds domain", a snapshot that vanished, a discard refused
because something depends on it); anything else fails the test.

The checkable invariant: a snapshot's content never changes. Before each create a worker
writes a unique pattern into the live disk, and after a create that succeeded it reads
the new snapshot's content; both under the domain's own lock (the flock every snapfs
operation takes), so no operation runs meanwhile. Afterwards: every snapshot reported
created and not reported merged or discarded exists with exactly that content, none
reported removed exists, the metadata tree equals the file tree (backing links), no
journal or temporary file is left, `qemu-img check` is clean on every layer.

test_domains_do_not_wait_for_each_other: a merge held up for seconds on domain A (a
qemu-img wrapper that sleeps before `commit`) does not delay a create on domain B,
through the CLI and through one mount, while A's lock is provably held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import trio
from fsfixtures import Mount
from helpers import CLUSTER, DISK_SIZE, make_image, read_raw, store_integrity_problems, write_pattern

from snapfs.catalog import StoreCore

SNAPFS = os.path.join(os.path.dirname(sys.executable), "snapfs")
DOM = "vm1"
TARGETS = ("vda", "vdb")
RUN_SECONDS = float(os.environ.get("SNAPFS_CONCURRENCY_SECONDS", "25"))
BUSY = "Another operation holds domain"
# Refusals a race explains: the lock was held too long, the target vanished, something
# came to depend on it. Anything else is a failure.
CLI_RACES = (BUSY, "has no snapshot named", "has no such snapshot", "cannot be discarded")
FS_RACES = {  # by operation
    "mkdir": {errno.EBUSY},
    "rmdir": {errno.EBUSY, errno.ENOENT, errno.ENOTEMPTY},
    "control": {errno.EBUSY, errno.ENOENT},
}


def define(root: str, images: str, names: list[str]) -> None:
    os.makedirs(images, exist_ok=True)

    async def go() -> None:
        store = StoreCore(root)
        for name in names:
            vda = make_image(os.path.join(images, f"{name}-vda.qcow2"), "qcow2")
            vdb = make_image(os.path.join(images, f"{name}-vdb.img"), "raw")
            write_pattern(vda, 0xA1, 0)
            write_pattern(vdb, 0xB1, 0, fmt="raw")
            await store.define(name, [("vda", vda, "qcow2"), ("vdb", vdb, "raw")])

    trio.run(go)


def cli(root: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAPFS, "--store", root, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


class Ledger:
    """What the workers did, shared by all threads."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.content: dict[str, dict[str, str]] = {}  # snapshot -> target -> sha256, recorded under the lock
        self.created: set[str] = set()
        self.removed: set[str] = set()
        self.outcomes: Counter = Counter()
        self.events: list[str] = []  # every operation and its result, for the failure message
        self.start = time.monotonic()
        self.failures: list[str] = []
        self.names = itertools.count()
        self.patterns = itertools.count(0x20)
        self.core = StoreCore(root).domain(DOM)

    def new_name(self, who: str) -> str:
        with self.lock:
            return f"{who}-{next(self.names)}"

    def note(self, what: str) -> None:
        with self.lock:
            self.outcomes[what] += 1

    def event(self, who: str, op: str, target: str, result: str) -> None:
        with self.lock:
            self.events.append(f"{time.monotonic() - self.start:7.3f} {who} {op} {target}: {result}")

    def history(self, names: set[str]) -> str:
        return "\n".join(e for e in self.events if any(f" {n}:" in e for n in names))

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def snapshot_names(self) -> list[str]:
        """Lock-free read of the metadata, as any reader does."""
        return sorted(r.name for r in self.core.view().snapshots.values())

    @contextlib.contextmanager
    def domain_lock(self):
        fd = os.open(os.path.join(self.root, "domains", DOM, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write_live(self) -> None:
        """A unique pattern at a random cluster of each live disk, under the domain lock."""
        with self.lock:
            pattern = 0x20 + next(self.patterns) % 0xD0
        offset = random.randrange(1, DISK_SIZE // CLUSTER) * CLUSTER
        with self.domain_lock():
            for target in TARGETS:
                write_pattern(self.core.live_path(target), pattern, offset)

    def created_ok(self, name: str) -> None:
        """Record the new snapshot's content under the lock (unless it is already gone)."""
        with self.domain_lock():
            record = self.core.view().by_name(name)
            digests = None
            if record is not None:
                digests = {t: digest(self.core.layer_path(t, record.id)) for t in TARGETS}
        with self.lock:
            self.created.add(name)
            if digests is not None:
                self.content[name] = digests

    def removed_ok(self, name: str) -> None:
        with self.lock:
            self.removed.add(name)


def digest(path: str) -> str:
    return hashlib.sha256(read_raw(path)).hexdigest()


def guarded(fn):
    """A worker that dies of an exception is a failure, not a silent thread end."""

    def run(ledger: Ledger, *args) -> None:
        try:
            fn(ledger, *args)
        except BaseException as exc:
            ledger.fail(f"{fn.__name__} died: {exc!r}")

    return run


@guarded
def cli_worker(ledger: Ledger, who: str, deadline: float) -> None:
    rng = random.Random(who)
    while time.monotonic() < deadline:
        names = ledger.snapshot_names()
        op = rng.choice(["create", "create", "merge", "discard", "revert"] if names else ["create"])
        if op == "create":
            ledger.write_live()
            target = ledger.new_name(who)
            run = cli(ledger.root, "snapshot-create-as", DOM, target)
        else:
            target = rng.choice(names)
            args = {
                "merge": ["snapshot-deactivate", DOM, target, "--merge"],
                "discard": ["snapshot-deactivate", DOM, target, "--delete"],
                "revert": ["create-with-snapshot", DOM, target],
            }[op]
            run = cli(ledger.root, *args)
        ledger.event(who, op, target, f"status {run.returncode} {run.stderr.strip()}")
        if run.returncode == 0:
            ledger.note(f"cli {op} done")
            if op == "create":
                ledger.created_ok(target)
            elif op in ("merge", "discard"):
                ledger.removed_ok(target)
        elif run.returncode == 1 and any(text in run.stderr for text in CLI_RACES):
            reason = next(text for text in CLI_RACES if text in run.stderr)
            ledger.note(f"cli {op} refused: {reason}")
        else:
            ledger.fail(f"{who} {op} {target}: status {run.returncode}: {run.stderr.strip()}")


def control_write(path: str, word: str) -> None:
    """One write(2) of the word, as the shell's `echo word > control` does.

    Never `with open(path, "w") as f: f.write(word)`: when the write fails, Python's
    close() sends the same bytes again (BufferedWriter.close flushes once more after
    TextIOWrapper.close's flush failed) and raises the first error. The mount acts on
    each write, so a `discard` refused with EBUSY (something depended on the snapshot)
    could be carried out by the re-sent write once the dependent was gone, while the
    worker logged a refusal: a snapshot "missing" with nobody reporting its removal
    (tests/test_consistency.py shows it step by step)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        data = (word + "\n").encode()
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


@guarded
def fs_worker(ledger: Ledger, mnt: str, who: str, deadline: float) -> None:
    rng = random.Random(who)
    snaps = os.path.join(mnt, DOM, "snapshots")
    while time.monotonic() < deadline:
        names = ledger.snapshot_names()
        op = rng.choice(["mkdir", "mkdir", "merge", "discard", "rmdir", "revert"] if names else ["mkdir"])
        target = ledger.new_name(who) if op == "mkdir" else rng.choice(names)
        if op == "mkdir":
            ledger.write_live()
        try:
            if op == "mkdir":
                os.mkdir(os.path.join(snaps, target))
            elif op == "rmdir":
                os.rmdir(os.path.join(snaps, target))
            else:
                control_write(os.path.join(snaps, target, "control"), op)
        except OSError as exc:
            ledger.event(who, op, target, f"{errno.errorcode.get(exc.errno, exc.errno)}")
            if exc.errno in FS_RACES[op if op in FS_RACES else "control"]:
                ledger.note(f"fs {op} refused: {errno.errorcode[exc.errno]}")
            else:
                ledger.fail(f"{who} {op} {target}: {exc!r}")
            continue
        ledger.event(who, op, target, "done")
        ledger.note(f"fs {op} done")
        if op == "mkdir":
            ledger.created_ok(target)
        elif op in ("merge", "discard", "rmdir"):
            ledger.removed_ok(target)


@guarded
def reader(ledger: Ledger, mnt: str, deadline: float) -> None:
    """ls -lR and cat of every file; a file that vanished between listing and reading is fine."""
    script = (
        'shopt -s nullglob; ls -lR "$1" > /dev/null; '
        'for f in "$1"/snapshots/*/*; do [ -L "$f" ] || [ -d "$f" ] || cat "$f" > /dev/null; done'
    )
    while time.monotonic() < deadline:
        run = subprocess.run(
            ["bash", "-c", script, "bash", os.path.join(mnt, DOM)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "LC_ALL": "C"},
        )
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        # a snapshot's disks/ files answer EBUSY while an unfinished operation names their layers
        bad = [
            line
            for line in lines
            if not line.endswith("No such file or directory")
            and not ("/disks/" in line and line.endswith("Device or resource busy"))
        ]
        ledger.note("read passes")
        if lines:
            ledger.note("read saw a vanished entry")
        if bad:
            ledger.fail(f"reader on {mnt}: {bad[:3]}")


@pytest.mark.timeout(RUN_SECONDS + 180)
def test_many_hands_one_domain(tmp_path):
    root = str(tmp_path / "store")
    define(root, str(tmp_path / "images"), [DOM])
    ledger = Ledger(root)
    mounts = [Mount(root, str(tmp_path / f"mnt{i}")) for i in (1, 2)]
    try:
        for mount in mounts:
            mount.start()
        deadline = time.monotonic() + RUN_SECONDS
        jobs = [threading.Thread(target=cli_worker, args=(ledger, f"cli{i}", deadline)) for i in (1, 2)]
        jobs += [
            threading.Thread(target=fs_worker, args=(ledger, m.path, f"fs{i}", deadline)) for i, m in enumerate(mounts)
        ]
        jobs += [threading.Thread(target=reader, args=(ledger, m.path, deadline)) for m in mounts]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(timeout=RUN_SECONDS + 120)
        assert not any(job.is_alive() for job in jobs), "a worker hung"
    finally:
        codes = [mount.stop() for mount in mounts]
    print("outcomes:", dict(sorted(ledger.outcomes.items())))
    assert ledger.failures == []
    assert codes == [0, 0], [m.log()[-2000:] for m in mounts]
    # Each kind of work really happened, so the test is not vacuous.
    for done in ("cli create done", "fs mkdir done", "read passes"):
        assert ledger.outcomes[done] > 0, ledger.outcomes
    assert any(ledger.outcomes[f"{w} done"] for w in ("cli merge", "fs merge", "cli discard", "fs rmdir"))

    assert store_integrity_problems(root, DOM) == []
    names = {r.name for r in StoreCore(root).domain(DOM).view().snapshots.values()}
    survivors = ledger.created - ledger.removed
    missing, lingering = survivors - names, ledger.removed & names
    assert missing == set(), f"created, never removed, missing:\n{ledger.history(missing)}"
    assert lingering == set(), f"reported merged or discarded, still there:\n{ledger.history(lingering)}"
    core = StoreCore(root).domain(DOM)
    for name, digests in ledger.content.items():
        if name in survivors:
            record = core.view().by_name(name)
            for target in TARGETS:
                assert digest(core.layer_path(target, record.id)) == digests[target], f"{name} {target} changed"


# ---- different domains do not wait for each other -------------------------------------------
SLOW_SECONDS = 6


def slow_qemu_img(directory: str) -> str:
    """A qemu-img that sleeps before `commit`, to hold a merge (and its lock) for a while."""
    path = os.path.join(directory, "slow-qemu-img")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\n[ "$1" = commit ] && sleep {SLOW_SECONDS}\nexec qemu-img "$@"\n')
    os.chmod(path, 0o755)
    return path


def _prepare_merge(root: str) -> None:
    for args in (("snapshot-create-as", "A", "s1"),):
        assert cli(root, *args).returncode == 0


def _wait_for(predicate, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_domains_do_not_wait_for_each_other_cli(tmp_path):
    root = str(tmp_path / "store")
    define(root, str(tmp_path / "images"), ["A", "B"])
    _prepare_merge(root)
    journal = os.path.join(root, "domains", "A", "journal.json")
    merge = subprocess.Popen(
        [SNAPFS, "--store", root, "snapshot-delete", "A", "s1"],
        env={**os.environ, "SNAPFS_QEMU_IMG": slow_qemu_img(str(tmp_path))},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: os.path.exists(journal), "the merge on A to start")
        started = time.monotonic()
        on_b = cli(root, "snapshot-create-as", "B", "b1")
        took = time.monotonic() - started
        assert on_b.returncode == 0, on_b.stderr
        on_a = cli(root, "snapshot-create-as", "A", "a2", env={"SNAPFS_LOCK_WAIT": "0.5"})
        assert merge.poll() is None, "the merge on A ended too early to prove anything"
        assert on_a.returncode == 1 and BUSY in on_a.stderr, on_a.stderr  # A's lock is held
        assert took < SLOW_SECONDS / 2, f"a create on B waited {took:.1f}s for a merge on A"
    finally:
        out, err = merge.communicate(timeout=60)
    assert merge.returncode == 0, err
    assert cli(root, "snapshot-list", "A", "--name").stdout == "\n"
    assert cli(root, "snapshot-list", "B", "--name").stdout == "b1\n\n"
    for dom in ("A", "B"):
        assert store_integrity_problems(root, dom) == []


@pytest.mark.timeout(120)
def test_domains_do_not_wait_for_each_other_mount(tmp_path):
    """One mount: `echo merge > A/.../control` is held up; mkdir on B and reads of A go on."""
    root = str(tmp_path / "store")
    define(root, str(tmp_path / "images"), ["A", "B"])
    _prepare_merge(root)
    journal = os.path.join(root, "domains", "A", "journal.json")
    mount = Mount(root, str(tmp_path / "mnt"), {"SNAPFS_QEMU_IMG": slow_qemu_img(str(tmp_path))})
    mount.start()
    try:
        control = os.path.join(mount.path, "A", "snapshots", "s1", "control")
        merge = subprocess.Popen(["bash", "-c", f"echo merge > {control}"], stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: os.path.exists(journal), "the merge on A to start")
        started = time.monotonic()
        os.mkdir(os.path.join(mount.path, "B", "snapshots", "b1"))
        listed = sorted(os.listdir(os.path.join(mount.path, "A", "snapshots")))
        with open(os.path.join(mount.path, "A", "xml")) as f:
            assert "<domain" in f.read()
        took = time.monotonic() - started
        assert merge.poll() is None, "the merge on A ended too early to prove anything"
        assert listed == ["s1"]
        assert took < SLOW_SECONDS / 2, f"mkdir on B and reads of A waited {took:.1f}s for a merge on A"
        assert merge.wait(timeout=60) == 0, merge.stderr.read()
        assert os.listdir(os.path.join(mount.path, "A", "snapshots")) == []
        assert os.listdir(os.path.join(mount.path, "B", "snapshots")) == ["b1"]
    finally:
        assert mount.stop() == 0, mount.log()
    for dom in ("A", "B"):
        assert store_integrity_problems(root, dom) == []
