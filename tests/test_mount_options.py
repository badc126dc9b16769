"""What the mount says about itself and how it refuses (DESIGN section 2, issue 15 item 10):
`--read-only` / `-o ro` refuses every change with EROFS, `df` reports the store's
filesystem, `findmnt` names the store as the source, `rm -rf` of a snapshot says what to
do instead (once in last-error), and a busy layer is named by its snapshot and disk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
import subprocess
import time

import pytest
from fsfixtures import (  # noqa: F401  (fixtures are used by name)
    BASH_ENV,
    PYTHON,
    REPO,
    FsEnv,
    Mount,
    PyDriver,
    core_call,
    define_store,
    errno_of,
    fs_fixture,
    start_env,
    unmount_and_wait,
)

pytestmark = pytest.mark.timeout(180)
call = PyDriver._call
DRIVER_PY = PyDriver()
SNAPFS = os.path.join(os.path.dirname(PYTHON), "snapfs")


def bash(script: str, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script, "bash", *args], capture_output=True, text=True, env=BASH_ENV, cwd=cwd, timeout=120
    )


def mount_line(path: str) -> list[str]:
    """The mount's line of /proc/mounts: source, target, type, options (octal escapes decoded)."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field) for field in line.split()]
            if fields[1] == path:
                return fields
    raise AssertionError(f"{path} is not in /proc/mounts")


def make_snapshots(store: str) -> None:
    run = core_call(store, "d = store.domain('vm1')\nawait d.create('a', 'first')\nawait d.create('b')")
    assert run.returncode == 0, run.stderr


@pytest.fixture(name="ro_fs")
def ro_fs_fixture(tmp_path):
    """vm1 with snapshots a <- b (a's description 'first'), mounted --read-only."""
    setup = define_store(str(tmp_path))
    make_snapshots(setup.root)  # before the mount: it can make none
    mount = Mount(setup.root, str(tmp_path / "mnt"), options=("--read-only",)).start()
    try:
        yield FsEnv(setup, mount)
    finally:
        mount.stop()


# ---- read-only -----------------------------------------------------------------------------
def every_change(fs: FsEnv) -> list[tuple[str, int]]:
    """Each change the mount could make, tried with Python calls: (what, errno)."""
    a, b = fs.snap("a"), fs.snap("b")
    attempts = {
        "mkdir": lambda: call(os.mkdir, fs.snap("x")),
        "rmdir": lambda: call(os.rmdir, b),
        "rename": lambda: call(os.rename, b, fs.snap("c")),
        "control": lambda: DRIVER_PY.write(os.path.join(b, "control"), b"merge\n"),
        "description": lambda: DRIVER_PY.write(os.path.join(a, "description"), b"second\n"),
        "compression": lambda: DRIVER_PY.write(os.path.join(a, "compression"), b"zstd\n"),
        "open xml for write": lambda: call(lambda: os.close(os.open(os.path.join(a, "xml"), os.O_WRONLY))),
        "open description O_RDWR": lambda: call(lambda: os.close(os.open(os.path.join(a, "description"), os.O_RDWR))),
        "truncate": lambda: call(os.truncate, os.path.join(a, "description"), 0),
        "chmod": lambda: call(os.chmod, os.path.join(a, "description"), 0o600),
        "touch": lambda: call(os.utime, os.path.join(a, "description")),
        "unlink": lambda: call(os.unlink, os.path.join(a, "xml")),
        "create": lambda: call(lambda: os.close(os.open(os.path.join(a, "new"), os.O_CREAT | os.O_WRONLY))),
        "symlink": lambda: call(os.symlink, "a", fs.snap("link")),
        "link": lambda: call(os.link, os.path.join(a, "xml"), fs.snap("hard")),
    }
    return [(what, attempt()) for what, attempt in attempts.items()]


SHELL_CHANGES = [
    'mkdir "$1"/x',
    'rmdir "$1"/b',
    'mv "$1"/b "$1"/c',
    'echo merge > "$1"/b/control',
    'echo second > "$1"/a/description',
    'echo zstd > "$1"/a/compression',
    ': > "$1"/a/description',
    'rm -rf "$1"/b',
]


def assert_nothing_changed(fs: FsEnv, before: dict, error_before: str) -> None:
    assert fs.fingerprint() == before, "the read-only mount changed the store"
    assert fs.last_error() == error_before, "the read-only mount wrote last-error"
    assert fs.read("vm1/snapshots/a/description") == "first\n"
    assert sorted(os.listdir(fs.p("vm1/snapshots"))) == ["a", "b"]


def test_read_only_refuses_every_change_with_erofs(ro_fs: FsEnv) -> None:
    fs = ro_fs
    assert "ro" in mount_line(fs.mnt)[3].split(",")
    before, error_before = fs.fingerprint(), fs.last_error()
    refused = every_change(fs)
    assert [what for what, code in refused if code != errno.EROFS] == [], refused
    for script in SHELL_CHANGES:
        run = bash(script, fs.p("vm1/snapshots"))
        assert run.returncode != 0, script
        assert {errno_of(line) for line in run.stderr.splitlines()} == {errno.EROFS}, (script, run.stderr)
    assert_nothing_changed(fs, before, error_before)


def test_read_only_still_reads_and_hears_of_changes(ro_fs: FsEnv) -> None:
    fs = ro_fs
    assert "<name>b</name>" in fs.read("vm1/snapshots/b/xml")
    with open(fs.snap("a", "disks/vda.raw"), "rb") as f:
        assert f.read(16) == bytes([0xA1]) * 16  # the base's pattern, read through the snapshot
    run = subprocess.run(
        [PYTHON, "-m", "snapfs.cli", "--store", fs.store, "snapshot-create-as", "vm1", "made-elsewhere"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(fs.p("vm1/snapshots"))) == ["a", "b", "made-elsewhere"]


def test_read_only_holds_after_a_remount_rw(ro_fs: FsEnv) -> None:
    """The handlers refuse too: a `mount -o remount,rw` lifts the kernel's check only."""
    fs = ro_fs
    run = subprocess.run(["mount", "-i", "-o", "remount,rw", fs.mnt], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "rw" in mount_line(fs.mnt)[3].split(","), "the kernel kept the mount read-only: nothing tested"
    before, error_before = fs.fingerprint(), fs.last_error()
    refused = every_change(fs)
    assert [what for what, code in refused if code != errno.EROFS] == [], refused
    assert_nothing_changed(fs, before, error_before)


@pytest.mark.parametrize("how", ["snapfs-mount", "mount-helper-o-ro"])
def test_read_only_from_the_command_line_and_the_mount_helper(tmp_path, how: str) -> None:
    setup = define_store(str(tmp_path))
    make_snapshots(setup.root)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if how == "snapfs-mount":
        command = [SNAPFS, "--store", setup.root, "mount", str(mnt), "--read-only"]
    else:
        command = [os.path.join(REPO, "contrib", "mount.fuse.snapfs"), setup.root, str(mnt), "-o", "allow_other,ro"]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "SNAPFS": SNAPFS}, timeout=60)
    try:
        assert run.returncode == 0, run.stderr
        assert "ro" in mount_line(str(mnt))[3].split(",")
        assert call(os.mkdir, mnt / "vm1/snapshots/x") == errno.EROFS
        assert call(os.rmdir, mnt / "vm1/snapshots/b") == errno.EROFS
    finally:
        unmount_and_wait(str(mnt))
    assert not os.path.ismount(mnt)


def test_the_mount_helper_rw_after_ro_is_read_write(tmp_path) -> None:
    setup = define_store(str(tmp_path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helper = os.path.join(REPO, "contrib", "mount.fuse.snapfs")
    run = subprocess.run(
        [helper, setup.root, str(mnt), "-o", "ro,rw"],
        capture_output=True,
        text=True,
        env={**os.environ, "SNAPFS": SNAPFS},
    )
    try:
        assert run.returncode == 0, run.stderr
        assert "rw" in mount_line(str(mnt))[3].split(",")
        assert call(os.mkdir, mnt / "vm1/snapshots/x") == 0
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


# ---- what df and findmnt say ------------------------------------------------------------------
def test_statfs_reports_the_store_filesystem(fs: FsEnv) -> None:
    mounted, store = os.statvfs(fs.mnt), os.statvfs(fs.store)
    assert mounted.f_blocks == store.f_blocks > 0
    assert mounted.f_frsize == store.f_frsize and mounted.f_bsize == store.f_bsize
    assert abs(mounted.f_bavail - store.f_bavail) * store.f_frsize < 64 << 20  # free space moves a little
    assert mounted.f_files == store.f_files
    run = bash('df -P "$1" | tail -1', fs.mnt)
    assert run.returncode == 0 and run.stdout.split()[1] != "0", run.stdout


def test_findmnt_shows_the_store_as_the_source(tmp_path) -> None:
    """The store's path, even with a comma (libfuse's option separator) and a space in it."""
    odd = tmp_path / "backups, 2026"
    odd.mkdir()
    env = start_env(odd)
    fs = next(env)
    try:
        run = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", fs.mnt], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.rstrip("\n").rsplit(" ", 1) == [fs.store, "fuse.snapfs"], run.stdout
        assert mount_line(fs.mnt)[0] == fs.store
    finally:
        env.close()


# ---- rm -rf of a snapshot --------------------------------------------------------------------
IN_MOVED_TO, IN_CLOSE_WRITE = 0x80, 0x8


def watch(directory: str) -> int:
    """An inotify descriptor watching `directory` for files written or moved in."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0
    assert libc.inotify_add_watch(fd, directory.encode(), IN_MOVED_TO | IN_CLOSE_WRITE) >= 0
    return fd


def events(fd: int) -> list[str]:
    names: list[str] = []
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return names
    offset = 0
    while offset < len(data):
        _, mask, _, length = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
        if mask & IN_MOVED_TO:
            names.append(name)
        offset += 16 + length
    return names


def test_rm_rf_of_a_snapshot_says_what_to_do_once(fs: FsEnv) -> None:
    os.mkdir(fs.snap("a"))
    os.mkdir(fs.snap("b"))
    before = fs.fingerprint()
    inotify = watch(os.path.join(fs.store, "domains", "vm1"))
    try:
        run = bash('rm -rf "$1"', fs.snap("b"))
        recorded = events(inotify).count("last-error")
    finally:
        os.close(inotify)
    assert run.returncode != 0
    lines = run.stderr.splitlines()
    assert len(lines) >= 8 and {errno_of(line) for line in lines} == {errno.EPERM}, run.stderr
    assert fs.fingerprint() == before
    assert sorted(os.listdir(fs.p("vm1/snapshots"))) == ["a", "b"]
    error = fs.last_error()
    assert "unlink: Files in snapshot /vm1/snapshots/b cannot be removed" in error, error
    assert "rmdir /vm1/snapshots/b discards" in error and "echo merge > /vm1/snapshots/b/control" in error, error
    assert recorded == 1, f"last-error written {recorded} times"
    # Another refusal recorded meanwhile is not hidden by the one recorded before.
    assert DRIVER_PY.write(fs.snap("a", "control"), b"bogus\n") == errno.EINVAL
    assert call(os.unlink, fs.snap("b", "xml")) == errno.EPERM
    assert "unlink: Files in snapshot /vm1/snapshots/b" in fs.last_error()


def test_unlink_outside_a_snapshot_is_eperm(fs: FsEnv) -> None:
    os.mkdir(fs.snap("a"))
    before = fs.fingerprint()
    assert call(os.unlink, fs.p("vm1/xml")) == errno.EPERM
    assert "Files in /vm1 cannot be removed." in fs.last_error()
    assert call(os.unlink, fs.p("vm1/current")) == errno.EPERM
    assert fs.fingerprint() == before


# ---- a busy layer is named by its snapshot and disk -------------------------------------------
def test_a_layer_written_elsewhere_names_the_snapshot_and_disk(fs: FsEnv) -> None:
    """A snapshot disk whose layer another process writes (here qemu-io, as a commit in
    progress would) cannot be opened: the refusal names the snapshot and disk."""
    os.mkdir(fs.snap("a"))
    os.mkdir(fs.snap("b"))
    layer = fs.layer("a", "vda")
    writer = subprocess.Popen(["qemu-io", "-f", "qcow2", layer], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        code = 0
        while time.monotonic() < deadline:
            code = call(lambda: open(fs.snap("a", "disks/vda.raw"), "rb").close())
            if code:
                break
            time.sleep(0.1)  # qemu-io is still starting
        assert code == errno.EBUSY
        error = fs.last_error()
        assert call(lambda: open(fs.snap("a", "disks/vda.changes"), "rb").read()) == errno.EBUSY
        read_error = fs.last_error()
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=10)
    for message, what in ((error, "opened"), (read_error, "read")):
        assert f"Disk vda of snapshot 'a' cannot be {what} while another process writes" in message, message
        assert ".qcow2" not in message and fs.store not in message, message
    with open(fs.snap("a", "disks/vda.raw"), "rb") as f:  # free again
        assert f.read(16) == bytes([0xA1]) * 16
