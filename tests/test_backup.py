"""Snapshot disks for backup tools, through a real mount (issue 6).

    /<dom>/snapshots/<name>/disks/<target>.raw      the disk at that snapshot, read-only
    /<dom>/snapshots/<name>/disks/<target>.changes  what it changed since its parent (JSON lines)
    /<dom>/disks/<target>                           -> the live layer

Every byte is checked against `qemu-img convert -O raw` of the snapshot's layer; the
backup script in contrib/ is run for a full, incremental (also since a grandparent) and
restore cycle; merges, discards and renames of a snapshot whose .raw is open are refused
or harmless, never a source of wrong bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
import time

import pytest
from fsfixtures import (  # noqa: F401  (fixtures are used by name)
    BASH_ENV,
    CLUSTER,
    DISK_SIZE,
    PYTHON,
    REPO,
    FsEnv,
    errno_of,
    fs_fixture,
    write_pattern,
)
from helpers import SNAPFS, read_raw, write_zeros
from refusal import os_errno

import snapfs

pytestmark = pytest.mark.timeout(300)

TARGETS = ("vda", "vdb")
BACKUP = os.path.join(REPO, "contrib", "snapfs-backup")
CHANGE_KEYS = ["start", "length", "zero"]


# ---- the tree ---------------------------------------------------------------------------
def build_tree(fs: FsEnv) -> dict[str, str | None]:
    """root <- mid (gzip, set by the API) <- deep (zstd, set through the compression
    file) <- deeper; root <- branch. Writes cross cluster edges and include zero writes,
    so the maps hold data, zero, unallocated and compressed extents. Returns the parents."""
    dom = snapfs.open_store(fs.store).lookup_domain("vm1")

    def write(pattern: int, offset: int, length: int) -> None:
        for target in TARGETS:
            write_pattern(fs.live(target), pattern, offset, length)

    write(0x11, CLUSTER // 2, 3 * CLUSTER)
    os.mkdir(fs.snap("root"))
    write(0x22, 5 * CLUSTER, 4 * CLUSTER)
    for target in TARGETS:
        write_zeros(fs.live(target), 0, CLUSTER)  # hides the base's first cluster
        write_zeros(fs.live(target), CLUSTER, CLUSTER)
    dom.snapshot_create_xml("<domainsnapshot><name>mid</name><compression>gzip</compression></domainsnapshot>")
    write(0x33, 6 * CLUSTER + 100, 2 * CLUSTER)
    write(0x34, DISK_SIZE - CLUSTER, CLUSTER)
    os.mkdir(fs.snap("deep"))
    with open(fs.snap("deep", "compression"), "w") as f:
        f.write("zstd\n")
    write(0x35, 20 * CLUSTER + 7, 5 * CLUSTER)
    for target in TARGETS:
        write_zeros(fs.live(target), 6 * CLUSTER, CLUSTER)
    os.mkdir(fs.snap("deeper"))
    assert fs.read("vm1/snapshots/mid/compression") == "gzip\n"
    assert fs.read("vm1/snapshots/deep/compression") == "zstd\n"
    with open(fs.snap("root", "control"), "w") as f:
        f.write("revert\n")
    write(0x44, 2 * CLUSTER, CLUSTER)
    os.mkdir(fs.snap("branch"))
    return {"root": None, "mid": "root", "deep": "mid", "deeper": "deep", "branch": "root"}


def raw_path(fs: FsEnv, snapshot: str, target: str) -> str:
    return fs.snap(snapshot, f"disks/{target}.raw")


def changes_path(fs: FsEnv, snapshot: str, target: str) -> str:
    return fs.snap(snapshot, f"disks/{target}.changes")


def expected_image(fs: FsEnv, snapshot: str, target: str) -> bytes:
    return read_raw(fs.layer(snapshot, target))


def base_image(fs: FsEnv, target: str) -> bytes:
    path, fmt = fs.setup.images[target]
    return read_raw(path, fmt)


def read_changes(fs: FsEnv, snapshot: str, target: str) -> list[dict]:
    path = changes_path(fs, snapshot, target)
    with open(path, "rb") as f:
        data = f.read()
    assert os.stat(path).st_size == len(data), "st_size is the exact length of a read"
    lines = data.decode("ascii").splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    changes = [json.loads(line) for line in lines]
    assert all(list(c) == CHANGE_KEYS for c in changes), changes
    return changes


def pread_all(path: str, ranges: list[tuple[int, int]]) -> tuple[bytes, list[bytes]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = bytearray()
        while chunk := os.read(fd, 3 * 1024 * 1024 + 17):  # odd sizes, large buffer
            whole += chunk
        return bytes(whole), [os.pread(fd, length, offset) for offset, length in ranges]
    finally:
        os.close(fd)


# ---- .raw -------------------------------------------------------------------------------
def test_raw_files_equal_qemu_img_convert(fs):
    parents = build_tree(fs)
    edges = {0, DISK_SIZE}
    for name in parents:
        for target in TARGETS:
            for change in read_changes(fs, name, target):
                edges |= {change["start"], change["start"] + change["length"]}
    rng = random.Random(6)
    ranges = [(max(0, edge + rng.randrange(-3000, 3000)), rng.randrange(1, 3 * CLUSTER)) for edge in sorted(edges)]
    ranges += [(rng.randrange(DISK_SIZE), rng.randrange(1, 2 * 1024 * 1024)) for _ in range(30)]
    ranges += [(CLUSTER - 1, 2), (DISK_SIZE - 10, 100), (DISK_SIZE, 10), (0, DISK_SIZE)]
    assert sorted(os.listdir(fs.snap("deep", "disks"))) == [
        "vda.changes",
        "vda.map",
        "vda.raw",
        "vdb.changes",
        "vdb.map",
        "vdb.raw",
    ]
    for name in parents:
        for target in TARGETS:
            expected = expected_image(fs, name, target)
            path = raw_path(fs, name, target)
            st = os.stat(path)
            assert st.st_size == DISK_SIZE == len(expected)
            assert st.st_mode & 0o777 == 0o400  # the layer's read bits: 0600 in a store of one owner
            whole, pieces = pread_all(path, ranges)
            assert whole == expected, f"{name}/{target}"
            for (offset, length), piece in zip(ranges, pieces, strict=True):
                assert piece == expected[offset : offset + length], f"{name}/{target} at {offset}+{length}"


def test_changes_applied_to_the_parent_give_the_snapshot(fs):
    parents = build_tree(fs)
    for name, parent in parents.items():
        for target in TARGETS:
            before = base_image(fs, target) if parent is None else expected_image(fs, parent, target)
            wanted = expected_image(fs, name, target)
            rebuilt = bytearray(before)
            changes = read_changes(fs, name, target)
            assert changes, f"{name}/{target} changed something"
            with open(raw_path(fs, name, target), "rb") as raw:
                for change in changes:
                    assert change["length"] > 0 and change["start"] % 512 == 0
                    start, end = change["start"], change["start"] + change["length"]
                    raw.seek(start)
                    data = raw.read(change["length"])
                    if change["zero"]:
                        assert data == bytes(change["length"])
                    rebuilt[start:end] = data
            assert bytes(rebuilt) == wanted, f"{name}/{target}"
    # snapshots that changed nothing list nothing
    os.mkdir(fs.snap("empty"))
    os.mkdir(fs.snap("empty-child"))
    assert read_changes(fs, "empty-child", "vda") == []


def test_changes_follow_a_merge_of_the_parent(fs):
    """Merging S's parent moves the parent's changes into L(S): S's .changes (cached per
    generation) then lists them, against S's new parent."""
    parents = build_tree(fs)
    assert parents["deeper"] == "deep"
    before = {t: read_changes(fs, "deeper", t) for t in TARGETS}
    with open(fs.snap("deep", "control"), "w") as f:
        f.write("merge\n")
    assert os.readlink(fs.snap("deeper", "parent")) == "../mid"
    for target in TARGETS:
        after = read_changes(fs, "deeper", target)
        assert after != before[target]
        rebuilt = bytearray(expected_image(fs, "mid", target))
        wanted = expected_image(fs, "deeper", target)
        for change in after:
            start, end = change["start"], change["start"] + change["length"]
            rebuilt[start:end] = bytes(end - start) if change["zero"] else wanted[start:end]
        assert bytes(rebuilt) == wanted


# ---- the backup script ------------------------------------------------------------------
def backup(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([PYTHON, BACKUP, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run


def test_backup_full_incremental_restore(fs, tmp_path):
    build_tree(fs)
    dest = str(tmp_path / "backups")
    os.makedirs(dest)
    backup("full", fs.mnt, "vm1", "root", dest)
    backup("incremental", fs.mnt, "vm1", "mid", dest, "--since", "root")
    backup("incremental", fs.mnt, "vm1", "deeper", dest, "--since", "mid")  # a grandparent: deep in between
    backup("incremental", fs.mnt, "vm1", "branch", dest, "--since", "root")
    for name in ("root", "mid", "deeper", "branch"):
        out = str(tmp_path / f"restored-{name}")
        backup("restore", dest, name, out)
        assert sorted(os.listdir(out)) == [f"{t}.raw" for t in TARGETS]
        for target in TARGETS:
            with open(os.path.join(out, f"{target}.raw"), "rb") as f:
                restored = f.read()
            assert restored == expected_image(fs, name, target), f"{name}/{target} restored byte for byte"
    # an incremental backup copies what changed, not the disk
    deeper = os.path.getsize(os.path.join(dest, "deeper", "vda.data"))
    assert 0 < deeper < DISK_SIZE // 4


# ---- the live disks -----------------------------------------------------------------------
def test_live_disk_links(fs):
    # each disk's stable name, and beside them every real layer file (here each live layer's)
    shown = sorted(os.listdir(fs.p("vm1/disks")))
    assert shown[-2:] == list(TARGETS) and len(shown) == 4
    for name in shown[:-2]:
        assert os.path.realpath(fs.p(f"vm1/disks/{name}")) in {os.path.realpath(fs.live(t)) for t in TARGETS}
    for target in TARGETS:
        link = fs.p(f"vm1/disks/{target}")
        assert os.readlink(link) == fs.live(target)
        assert os.path.isabs(os.readlink(link))
        info = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", link], capture_output=True, text=True, check=True
        )
        assert json.loads(info.stdout)["virtual-size"] == DISK_SIZE
        assert json.loads(info.stdout)["format"] == "qcow2"
    assert sorted(os.listdir(fs.p("vm2/disks")))[-1] == "vda" and len(os.listdir(fs.p("vm2/disks"))) == 2


# ---- bad input ----------------------------------------------------------------------------
def test_disk_files_are_read_only_and_unknown_names_are_enoent(fs):
    os.mkdir(fs.snap("s"))
    raw, changes, disks = raw_path(fs, "s", "vda"), changes_path(fs, "s", "vda"), fs.snap("s", "disks")
    for path in (raw, changes):
        assert os_errno(os.open, path, os.O_WRONLY) == errno.EACCES
        assert os_errno(os.open, path, os.O_RDWR) == errno.EACCES
        assert os_errno(os.truncate, path, 0) == errno.EACCES
        assert os_errno(os.unlink, path) == errno.EPERM  # nothing here is ever removed (rmdir the snapshot)
        assert os_errno(os.rename, path, os.path.join(disks, "x.raw")) == errno.EPERM
    assert os_errno(os.open, os.path.join(disks, "new.raw"), os.O_WRONLY | os.O_CREAT, 0o644) == errno.EACCES
    assert os_errno(os.mkdir, os.path.join(disks, "d")) == errno.EACCES
    assert os_errno(os.rmdir, disks) == errno.EACCES
    assert os_errno(os.symlink, "x", fs.p("vm1/disks/vdc")) == errno.EACCES
    assert os_errno(os.unlink, fs.p("vm1/disks/vda")) == errno.EPERM
    for name in ("vdz.raw", "vdz.changes", "vda", "vda.qcow2", ".raw", "vda.raw.raw"):
        assert os_errno(os.stat, os.path.join(disks, name)) == errno.ENOENT, name
    assert os_errno(os.stat, fs.p("vm1/disks/vdz")) == errno.ENOENT
    assert os_errno(os.stat, fs.snap("nope", "disks/vda.raw")) == errno.ENOENT
    run = subprocess.run(["bash", "-c", 'echo x > "$1"', "bash", raw], capture_output=True, text=True, env=BASH_ENV)
    assert run.returncode != 0 and errno_of(run.stderr) == errno.EACCES
    assert "read-only" in fs.last_error()
    assert read_raw(fs.layer("s", "vda")) == pread_all(raw, [])[0]  # untouched


# ---- operations while a .raw is open --------------------------------------------------------
def control(fs: FsEnv, snapshot: str, word: str) -> tuple[int, str]:
    """`echo WORD > control` in bash: 0 or the errno, and bash's message."""
    run = subprocess.run(
        ["bash", "-c", 'echo "$2" > "$1"', "bash", fs.snap(snapshot, "control"), word],
        capture_output=True,
        text=True,
        env=BASH_ENV,
        timeout=120,
    )
    return (0 if run.returncode == 0 else errno_of(run.stderr)), run.stderr


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def qemu_nbd_pids(store: str) -> list[int]:
    run = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{store}"], capture_output=True, text=True)
    return [int(pid) for pid in run.stdout.split()]


def test_operations_while_a_raw_is_open(fs):
    build_tree(fs)
    expected = {name: expected_image(fs, name, "vda") for name in ("mid", "deep", "deeper", "branch")}
    fd = os.open(raw_path(fs, "deep", "vda"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * CLUSTER, 5 * CLUSTER) == expected["deep"][5 * CLUSTER : 9 * CLUSTER]
        assert qemu_nbd_pids(fs.store), "deep's compressed clusters are read through qemu-nbd"
        # anything that would rewrite a file of deep's chain is refused, with a sentence
        for snapshot, word in (("deep", "merge"), ("mid", "merge"), ("deep", "discard-force"), ("deep", "compression")):
            if word == "compression":
                code = os_errno(write_file, fs.snap("deep", "compression"), b"none\n")
            else:
                code, _ = control(fs, snapshot, word)
            assert code == errno.EBUSY, (snapshot, word)
            assert "open snapshot disk image" in fs.last_error(), fs.last_error()
        assert sorted(os.listdir(fs.p("vm1/snapshots"))) == ["branch", "deep", "deeper", "mid", "root"]
        # what does not touch deep's chain goes on: a rename, a merge elsewhere
        os.rename(fs.snap("deep"), fs.snap("deep-renamed"))
        assert control(fs, "branch", "merge")[0] == 0
        whole = bytearray()
        while chunk := os.read(fd, 1 << 20):
            whole += chunk
        assert len(whole) == DISK_SIZE
        assert os.pread(fd, DISK_SIZE, 0) == expected["deep"], "the reader's bytes after a rename"
    finally:
        os.close(fd)
    # closed: its qemu-nbd is stopped, its locks released, and the merge goes on
    deadline = time.monotonic() + 10
    while qemu_nbd_pids(fs.store) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_nbd_pids(fs.store)
    deadline = time.monotonic() + 10
    while (code := control(fs, "deep-renamed", "merge")[0]) == errno.EBUSY and time.monotonic() < deadline:
        time.sleep(0.1)  # FUSE's release is asynchronous: close() returns before it is handled
    assert code == 0
    assert os_errno(os.stat, fs.snap("deep-renamed", "disks/vda.raw")) == errno.ENOENT
    assert pread_all(raw_path(fs, "deeper", "vda"), [])[0] == expected["deeper"], "merged into deeper"
    assert pread_all(raw_path(fs, "mid", "vda"), [])[0] == expected["mid"]


def test_an_unfinished_merge_makes_its_files_busy(fs):
    """A merge of deep that stops (a crash) after committing deeper into L(deep) and
    before removing deep: L(deep) then holds deep + deeper while deep still exists. Its
    .raw and .changes are refused (EBUSY, the journal names the file) rather than served;
    the next operation finishes the merge."""
    build_tree(fs)
    expected = {name: expected_image(fs, name, "vda") for name in ("mid", "deeper")}
    env = {**os.environ, "SNAPFS_CRASH_AT": "merge:2:rename:before"}
    args = [SNAPFS, "--store", fs.store, "snapshot-delete", "vm1", "deep"]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 86, run.stderr  # domain.CRASH_EXIT_STATUS
    assert os.path.exists(os.path.join(fs.store, "domains", "vm1", "journal.json"))
    assert "deep" in os.listdir(fs.p("vm1/snapshots"))
    assert os_errno(os.open, raw_path(fs, "deep", "vda"), os.O_RDONLY) == errno.EBUSY
    assert "unfinished merge" in fs.last_error(), fs.last_error()
    assert os_errno(fs.read, "vm1/snapshots/deep/disks/vda.changes") == errno.EBUSY
    assert pread_all(raw_path(fs, "mid", "vda"), [])[0] == expected["mid"]  # not named by the merge
    os.mkdir(fs.snap("after"))  # the next operation finishes the merge first
    assert "deep" not in os.listdir(fs.p("vm1/snapshots"))
    assert pread_all(raw_path(fs, "deeper", "vda"), [])[0] == expected["deeper"]


def test_a_reused_name_is_a_new_file(fs):
    """keep_cache is per snapshot id: a snapshot merged away and a new one under its name
    have different inodes, and the new one reads its own bytes."""
    write_pattern(fs.live("vda"), 0x51, 0)
    os.mkdir(fs.snap("s"))
    old_ino = os.stat(raw_path(fs, "s", "vda")).st_ino
    old = pread_all(raw_path(fs, "s", "vda"), [])[0]
    assert old[:CLUSTER] == bytes([0x51]) * CLUSTER
    assert control(fs, "s", "merge")[0] == 0
    assert os_errno(os.stat, raw_path(fs, "s", "vda")) == errno.ENOENT
    write_pattern(fs.live("vda"), 0x52, 0)
    os.mkdir(fs.snap("s"))
    assert os.stat(raw_path(fs, "s", "vda")).st_ino != old_ino
    new = pread_all(raw_path(fs, "s", "vda"), [])[0]
    assert new[:CLUSTER] == bytes([0x52]) * CLUSTER
    assert new == expected_image(fs, "s", "vda")


def test_reads_of_one_file_do_not_block_others(fs):
    """A .raw read in progress (qemu-nbd started for compressed clusters) does not hold up
    listings and reads of other files."""
    build_tree(fs)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                for name in ("mid", "deep"):
                    pread_all(raw_path(fs, name, "vdb"), [])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        slowest = 0.0
        for _ in range(30):
            start = time.monotonic()
            os.listdir(fs.p("vm1/snapshots"))
            fs.read("vm1/snapshots/root/xml")
            slowest = max(slowest, time.monotonic() - start)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert slowest < 2.0
