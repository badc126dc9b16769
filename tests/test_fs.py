"""The FUSE filesystem through a real mount (DESIGN section 2).

Each operation is driven twice (the `drive` fixture): Python file calls and bash with
echo/cat/mkdir/rmdir/mv, checking exit status, errno and last-error, then the disks'
content with byte patterns written and read back by qemu-io.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import stat
import subprocess
import threading
import time

import pytest
from fsfixtures import (  # noqa: F401  (fixtures are used by name)
    BASH_ENV,
    CLUSTER,
    PYTHON,
    REPO,
    FsEnv,
    Mount,
    PyDriver,
    core_call,
    define_store,
    drive_fixture,
    errno_of,
    fs_fixture,
    has_pattern,
    make_image,
    start_env,
    write_pattern,
)

pytestmark = pytest.mark.timeout(180)

TARGETS = ("vda", "vdb")
DRIVER_PY = PyDriver()
call = PyDriver._call
WORDS = "merge merge-force discard discard-force revert deactivate\n"


def write_live(fs: FsEnv, pattern: int, offset: int = 0, dom: str = "vm1") -> None:
    for target in TARGETS if dom == "vm1" else ("vda",):
        write_pattern(fs.live(target, dom), pattern, offset)


def live_has(fs: FsEnv, pattern: int, offset: int = 0) -> bool:
    return all(has_pattern(fs.live(t), pattern, offset) for t in TARGETS)


def snap_has(fs: FsEnv, name: str, pattern: int, offset: int = 0) -> bool:
    return all(has_pattern(fs.layer(name, t), pattern, offset) for t in TARGETS)


def snapshot_names(fs: FsEnv, dom: str = "vm1") -> list[str]:
    return sorted(os.listdir(fs.p(f"{dom}/snapshots")))


def make_chain(fs: FsEnv, drive, names: list[str]) -> None:
    """Snapshots names[0] <- names[1] <- ..., pattern 0x10+i at cluster i of each."""
    for index, name in enumerate(names):
        write_live(fs, 0x10 + index, index * CLUSTER)
        assert drive.mkdir(fs.snap(name)) == 0


def assert_refused(fs: FsEnv, code: int, expected: int | tuple[int, ...], before: dict, words: str = "") -> None:
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert code in expected, f"errno {errno.errorcode.get(code, code)}, wanted {expected}"
    assert fs.fingerprint() == before, "a refused operation changed the store"
    if words:
        assert re.search(words, fs.last_error(), re.I), fs.last_error()


# ---- the tree -------------------------------------------------------------------------
def test_tree_layout(fs: FsEnv, drive) -> None:
    assert sorted(os.listdir(fs.mnt)) == ["vm1", "vm2"]
    assert sorted(os.listdir(fs.p("vm1"))) == [
        "control",
        "disks",
        "job",
        "last-error",
        "snapshots",
        "state",
        "xml",
    ]  # no current yet
    assert "live.qcow2" in fs.read("vm1/xml")
    make_chain(fs, drive, ["one", "two"])
    assert sorted(os.listdir(fs.p("vm1"))) == [
        "control",
        "current",
        "disks",
        "job",
        "last-error",
        "snapshots",
        "state",
        "xml",
    ]
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/two"
    assert drive.readlink(fs.snap("two", "parent")) == "../one"
    assert not os.path.lexists(fs.snap("one", "parent"))
    assert sorted(os.listdir(fs.snap("two"))) == [
        "compression",
        "control",
        "description",
        "disks",
        "parent",
        "state",
        "xml",
    ]
    assert drive.read(fs.snap("two", "state")) == "shutoff\n"
    assert drive.read(fs.snap("two", "compression")) == "none\n"
    assert drive.read(fs.snap("two", "control")) == WORDS
    assert drive.read(fs.snap("two", "description")) == ""
    assert os.path.realpath(fs.p("vm1/current")) == fs.snap("two").rstrip("/")
    xml = drive.read(fs.snap("two", "xml"))
    assert "<name>two</name>" in xml and "<parent>" in xml and "<name>one</name>" in xml
    created = int(re.search(r"<creationTime>(\d+)</creationTime>", xml).group(1))
    assert os.stat(fs.snap("two")).st_mtime == created
    assert stat.S_ISDIR(os.stat(fs.snap("two")).st_mode)


def test_sizes_are_exact(fs: FsEnv) -> None:
    make_chain(fs, drive=DRIVER_PY, names=["a", "b"])
    with open(fs.snap("b", "description"), "w") as f:
        f.write("some text")
    paths = [fs.p("vm1/xml"), fs.p("vm1/last-error")]
    paths += [fs.snap("b", entry) for entry in ("xml", "description", "state", "compression", "control")]
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert os.stat(path).st_size == len(data), path
    assert os.lstat(fs.p("vm1/current")).st_size == len("snapshots/b")
    # tar reads by size
    run = subprocess.run(["tar", "-cf", "/dev/null", "-C", fs.mnt, "vm1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---- create, discard, rename ---------------------------------------------------------------
def test_mkdir_creates_a_snapshot(fs: FsEnv, drive) -> None:
    write_live(fs, 0x11)
    assert drive.mkdir(fs.snap("s1")) == 0
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/s1"
    assert snap_has(fs, "s1", 0x11)
    write_live(fs, 0x22)  # the live disk moves on; s1 keeps its content
    assert snap_has(fs, "s1", 0x11) and live_has(fs, 0x22)
    assert drive.mkdir(fs.snap("s2")) == 0
    assert drive.readlink(fs.snap("s2", "parent")) == "../s1"
    assert snap_has(fs, "s2", 0x22) and snap_has(fs, "s1", 0x11)
    assert snapshot_names(fs, "vm2") == []


def test_rmdir_discards_and_refuses_with_dependents(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b"])
    before = fs.fingerprint()
    assert_refused(fs, drive.rmdir(fs.snap("a")), errno.ENOTEMPTY, before, "'b' depends")
    assert_refused(fs, drive.rmdir(fs.snap("b")), errno.ENOTEMPTY, before, "live disk")
    # a leaf that the live disk does not sit on can go
    assert drive.write(fs.snap("a", "control"), b"revert\n") == 0
    assert drive.rmdir(fs.snap("b")) == 0
    assert snapshot_names(fs) == ["a"]
    assert live_has(fs, 0x10) and not has_pattern(fs.live("vda"), 0x11, CLUSTER)
    assert drive.rmdir(fs.snap("nothing")) == errno.ENOENT


def test_rename(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b", "c"])
    inode = os.stat(fs.snap("a")).st_ino
    file_inode = os.stat(fs.snap("a", "xml")).st_ino
    assert drive.rename(fs.snap("a"), fs.snap("new name")) == 0
    assert snapshot_names(fs) == ["b", "c", "new name"]
    assert os.stat(fs.snap("new name")).st_ino == inode
    assert os.stat(fs.snap("new name", "xml")).st_ino == file_inode
    assert drive.readlink(fs.snap("b", "parent")) == "../new name"
    assert "<name>new name</name>" in drive.read(fs.snap("b", "xml"))
    assert snap_has(fs, "new name", 0x10)
    before = fs.fingerprint()
    assert_refused(fs, drive.rename(fs.snap("b"), fs.snap("c")), errno.EEXIST, before, "already has a snapshot")
    for target in (fs.p("vm1/b"), fs.p("vm2/snapshots/b"), fs.p("vm1/snapshots/c/b"), fs.p("b")):
        assert_refused(fs, drive.rename(fs.snap("b"), target), errno.EPERM, before)
    assert_refused(fs, drive.rename(fs.p("vm1/xml"), fs.p("vm1/xml2")), errno.EPERM, before, "renamed")
    assert drive.rename(fs.snap("missing"), fs.snap("x")) == errno.ENOENT
    if drive.name == "py":  # mv refuses this itself ("are the same file")
        assert drive.rename(fs.snap("b"), fs.snap("b")) == 0
    assert fs.fingerprint() == before


def renameat2(src: str, dst: str, flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    result = libc.renameat2(at_fdcwd, src.encode(), at_fdcwd, dst.encode(), flags)
    return 0 if result == 0 else ctypes.get_errno()


def test_rename_noreplace_and_exchange(fs: FsEnv) -> None:
    make_chain(fs, DRIVER_PY, ["a", "b"])
    noreplace, exchange = 1, 2
    before = fs.fingerprint()
    assert renameat2(fs.snap("a"), fs.snap("b"), noreplace) == errno.EEXIST
    assert renameat2(fs.snap("a"), fs.snap("b"), exchange) in (errno.EINVAL, errno.EPERM)
    assert fs.fingerprint() == before
    assert renameat2(fs.snap("a"), fs.snap("c"), noreplace) == 0
    assert snapshot_names(fs) == ["b", "c"]


# ---- control -------------------------------------------------------------------------------
def test_control_merge(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b", "c"])
    write_live(fs, 0x33, 3 * CLUSTER)
    assert drive.write(fs.snap("b", "control"), b"merge\n") == 0
    assert snapshot_names(fs) == ["a", "c"]
    assert drive.readlink(fs.snap("c", "parent")) == "../a"
    # every other snapshot and the live disk keep their content
    assert snap_has(fs, "a", 0x10) and not has_pattern(fs.layer("a", "vda"), 0x11, CLUSTER)
    for offset, pattern in ((0, 0x10), (CLUSTER, 0x11), (2 * CLUSTER, 0x12)):
        assert snap_has(fs, "c", pattern, offset) and live_has(fs, pattern, offset)
    assert live_has(fs, 0x33, 3 * CLUSTER)
    # merging current: the live disk moves onto the parent, content unchanged
    assert drive.write(fs.snap("c", "control"), b"merge-force\n") == 0
    assert snapshot_names(fs) == ["a"]
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/a"
    for offset, pattern in ((0, 0x10), (CLUSTER, 0x11), (2 * CLUSTER, 0x12), (3 * CLUSTER, 0x33)):
        assert live_has(fs, pattern, offset)


def test_control_revert(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b"])
    write_live(fs, 0x44, 0)
    assert drive.write(fs.snap("a", "control"), b"revert\n") == 0
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/a"
    assert live_has(fs, 0x10, 0) and not has_pattern(fs.live("vda"), 0x11, CLUSTER)
    assert drive.write(fs.snap("b", "control"), b"revert\n") == 0
    assert live_has(fs, 0x10, 0) and live_has(fs, 0x11, CLUSTER)


def test_control_discard(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b", "c"])
    before = fs.fingerprint()
    assert_refused(fs, drive.write(fs.snap("b", "control"), b"discard\n"), errno.EBUSY, before, "'c' depends")
    assert drive.write(fs.snap("b", "control"), b"discard-force\n") == 0
    assert snapshot_names(fs) == ["a"]
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/a"
    assert live_has(fs, 0x10, 0) and not has_pattern(fs.live("vda"), 0x11, CLUSTER)
    assert has_pattern(fs.live("vdb"), 0, CLUSTER)


def test_control_deactivate(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b"])
    write_live(fs, 0x55, 4 * CLUSTER)
    assert drive.write(fs.snap("b", "control"), b"deactivate\n") == 0
    assert snapshot_names(fs) == ["a", "b"]
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/a"
    assert live_has(fs, 0x11, CLUSTER) and live_has(fs, 0x55, 4 * CLUSTER)
    assert snap_has(fs, "b", 0x11, CLUSTER)


def test_control_ignores_offset_and_append(fs: FsEnv) -> None:
    make_chain(fs, DRIVER_PY, ["a", "b"])
    fd = os.open(fs.snap("a", "control"), os.O_WRONLY)
    try:
        os.lseek(fd, 4096, os.SEEK_SET)
        os.write(fd, b"revert")  # acted on in write(), before close
        assert os.readlink(fs.p("vm1/current")) == "snapshots/a"
    finally:
        os.close(fd)
    run = subprocess.run(["bash", "-c", 'echo revert >> "$1"', "bash", fs.snap("b", "control")])
    assert run.returncode == 0
    assert os.readlink(fs.p("vm1/current")) == "snapshots/b"


# ---- description and compression ------------------------------------------------------------
def test_description(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a"])
    path = fs.snap("a", "description")
    assert drive.write(path, b"kernel 6.1 to 6.6\n") == 0
    assert drive.read(path) == "kernel 6.1 to 6.6\n"  # newline dropped on write, added on read
    assert "<description>kernel 6.1 to 6.6</description>" in drive.read(fs.snap("a", "xml"))
    assert drive.write(path, "unicode: žluťoučký kůň".encode()) == 0
    assert drive.read(path) == "unicode: žluťoučký kůň\n"
    assert drive.write(path, b"two\nlines\n\n") == 0  # only one trailing newline goes
    assert drive.read(path) == "two\nlines\n\n"
    run = subprocess.run(["bash", "-c", ': > "$1"', "bash", path])
    assert run.returncode == 0 and drive.read(path) == ""
    assert os.stat(path).st_size == 0


def test_description_accumulates_since_open(fs: FsEnv) -> None:
    make_chain(fs, DRIVER_PY, ["a"])
    path = fs.snap("a", "description")
    with open(path, "w", buffering=1) as f:
        f.write("first\n")
        f.write("second\n")
        f.flush()
        assert open(path).read() == ""  # stored when closed, not on flush
    assert open(path).read() == "first\nsecond\n"
    fd = os.open(path, os.O_WRONLY)  # no O_TRUNC: what is written since open replaces
    os.write(fd, b"third")
    os.close(fd)
    assert open(path).read() == "third\n"
    fd = os.open(path, os.O_RDWR)  # opened for writing, nothing written: unchanged
    os.close(fd)
    assert open(path).read() == "third\n"
    os.truncate(path, 0)
    assert open(path).read() == ""


def test_compression(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b"])
    for kind in ("zstd", "gzip", "none"):
        assert drive.write(fs.snap("a", "compression"), f"{kind}\n".encode()) == 0
        assert drive.read(fs.snap("a", "compression")) == f"{kind}\n"
        assert f"<compression>{kind}</compression>" in drive.read(fs.snap("a", "xml"))
        assert snap_has(fs, "a", 0x10) and live_has(fs, 0x11, CLUSTER)
    before = fs.fingerprint()
    assert_refused(fs, drive.write(fs.snap("a", "compression"), b"lz4\n"), errno.EINVAL, before, "lz4")


# ---- bad input ----------------------------------------------------------------------------
def test_bad_control_input(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a", "b"])
    control = fs.snap("a", "control")
    before = fs.fingerprint()
    assert_refused(fs, drive.write(control, b"bogus\n"), errno.EINVAL, before, "unknown control word 'bogus'")
    assert_refused(fs, drive.write(control, b"\n"), errno.EINVAL, before, "unknown control word ''")
    assert_refused(fs, drive.write(control, b"merge now\n"), errno.EINVAL, before)
    assert_refused(fs, drive.write(control, b"x" * (1 << 20)), errno.EINVAL, before)
    assert_refused(fs, drive.write(control, b"\xff\xfemerge"), errno.EINVAL, before, "not UTF-8")
    assert drive.write(control, b"") == 0  # no write at all: nothing happens
    assert fs.fingerprint() == before


def test_bad_description_input(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a"])
    path = fs.snap("a", "description")
    assert drive.write(path, b"keep me\n") == 0
    assert drive.read(path) == "keep me\n"  # waits for the store at release
    before = fs.fingerprint()
    assert_refused(fs, drive.write(path, b"x" * (1 << 20)), errno.EFBIG, before, "at most 65536 bytes")
    assert_refused(fs, drive.write(path, b"\xff\xfe bad"), errno.EINVAL, before, "UTF-8")
    assert drive.read(path) == "keep me\n"
    assert drive.write(path, b"y" * 65536 + b"\n") == 0  # exactly the limit, plus the newline dropped
    assert os.stat(path).st_size == 65537


def test_read_only_files(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a"])
    before = fs.fingerprint()
    for rel in ("vm1/xml", "vm1/last-error", "vm1/snapshots/a/xml", "vm1/snapshots/a/state"):
        assert_refused(fs, drive.write(fs.p(rel), b"x\n"), errno.EACCES, before, "read-only")
    assert_refused(fs, call(os.truncate, fs.p("vm1/xml"), 0), errno.EACCES, before)
    assert_refused(fs, call(os.chmod, fs.snap("a", "description"), 0o600), errno.EPERM, before)
    assert_refused(fs, call(os.unlink, fs.snap("a", "xml")), errno.EPERM, before, "rmdir")
    assert_refused(fs, call(os.unlink, fs.p("vm1/current")), errno.EPERM, before)
    assert_refused(fs, call(os.symlink, "x", fs.p("vm1/link")), errno.EACCES, before)


def test_mkdir_outside_snapshots(fs: FsEnv, drive) -> None:
    before = fs.fingerprint()
    assert_refused(fs, drive.mkdir(fs.p("vm1/extra")), (errno.EACCES, errno.EPERM), before, "only in snapshots/")
    assert_refused(fs, drive.mkdir(fs.p("vm3")), (errno.EACCES, errno.EPERM), before)
    make_chain(fs, drive, ["a"])
    before = fs.fingerprint()
    assert_refused(fs, drive.mkdir(fs.snap("a", "sub")), (errno.EACCES, errno.EPERM), before)
    assert_refused(fs, drive.write(fs.p("vm1/snapshots/newfile"), b"x\n"), (errno.EACCES, errno.EPERM), before)
    assert_refused(fs, drive.write(fs.p("vm1/newfile"), b"x\n"), (errno.EACCES, errno.EPERM), before)
    assert_refused(fs, drive.mkdir(fs.snap("a")), errno.EEXIST, before)
    assert_refused(fs, drive.rmdir(fs.p("vm1/snapshots")), (errno.EACCES, errno.EPERM), before)


@pytest.mark.parametrize(
    "name",
    ["with space", "ünïcödé ☃", "tab\there", "n" * 255, "é" * 127 + "n"],
    ids=["space", "unicode", "tab", "255-bytes", "255-bytes-2byte-chars"],
)
def test_odd_names_accepted(fs: FsEnv, drive, name: str) -> None:
    assert len(name.encode()) <= 255
    write_live(fs, 0x66)
    assert drive.mkdir(fs.snap(name)) == 0
    assert snapshot_names(fs) == [name]
    assert drive.readlink(fs.p("vm1/current")) == f"snapshots/{name}"
    assert snap_has(fs, name, 0x66)
    assert drive.rename(fs.snap(name), fs.snap(name + "2" if len(name.encode()) < 255 else "short")) == 0
    assert drive.mkdir(fs.snap(name)) == 0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("n" * 256, (errno.ENAMETOOLONG, errno.EINVAL)),
        ("é" * 128, (errno.ENAMETOOLONG, errno.EINVAL)),
        (".hidden", errno.EINVAL),
    ],
    ids=["256-bytes", "256-bytes-2byte-chars", "dot"],
)
def test_bad_names_refused(fs: FsEnv, drive, name: str, expected) -> None:
    make_chain(fs, drive, ["a"])
    before = fs.fingerprint()
    assert_refused(fs, drive.mkdir(fs.snap(name)), expected, before)
    assert_refused(fs, drive.rename(fs.snap("a"), fs.snap(name)), expected, before)


def test_non_utf8_name_refused(fs: FsEnv) -> None:
    before = fs.fingerprint()
    path = os.path.join(fs.p("vm1/snapshots").encode(), b"bad\xffname")
    with pytest.raises(OSError) as info:
        os.mkdir(path)
    assert info.value.errno == errno.EINVAL
    assert fs.fingerprint() == before
    assert "UTF-8" in fs.last_error()


# ---- freshness, concurrency, robustness -------------------------------------------------------
def test_changes_from_another_process_are_visible(fs: FsEnv, drive) -> None:
    make_chain(fs, drive, ["a"])
    assert drive.read(fs.snap("a", "description")) == ""
    xml_size = os.stat(fs.snap("a", "xml")).st_size
    run = core_call(
        fs.store,
        """
dom = store.domain("vm1")
snap = dom.view().by_name("a")
await dom.set_description(snap.id, "from the API")
await dom.create("b")
""",
    )
    assert run.returncode == 0, run.stderr
    assert drive.read(fs.snap("a", "description")) == "from the API\n"
    assert os.stat(fs.snap("a", "xml")).st_size > xml_size
    assert drive.readlink(fs.p("vm1/current")) == "snapshots/b"
    assert snapshot_names(fs) == ["a", "b"]
    cli = subprocess.run(
        [PYTHON, "-m", "snapfs.cli", "--store", fs.store, "snapshot-create-as", "vm1", "from-cli"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if cli.returncode == 0:
        assert "from-cli" in os.listdir(fs.p("vm1/snapshots"))
        assert drive.readlink(fs.p("vm1/current")) == "snapshots/from-cli"
    run = core_call(fs.store, 'dom = store.domain("vm1")\nawait dom.rename(dom.view().by_name("a").id, "renamed")')
    assert run.returncode == 0, run.stderr
    assert drive.readlink(fs.snap("b", "parent")) == "../renamed"
    assert not os.path.exists(fs.snap("a"))


def test_write_then_read_is_never_stale(fs: FsEnv, drive) -> None:
    """release is asynchronous in FUSE: the next read must still see the stored value."""
    make_chain(fs, drive, ["a"])
    path = fs.snap("a", "description")
    for i in range(15):
        assert drive.write(path, f"value {i}\n".encode()) == 0
        assert drive.read(path) == f"value {i}\n"
        assert f"<description>value {i}</description>" in drive.read(fs.snap("a", "xml"))


def test_close_reports_a_refused_description(fs: FsEnv) -> None:
    make_chain(fs, DRIVER_PY, ["a", "b"])
    fd = os.open(fs.snap("b", "description"), os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"too late")
    assert DRIVER_PY.write(fs.snap("a", "control"), b"revert\n") == 0
    assert DRIVER_PY.rmdir(fs.snap("b")) == 0
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.ENOENT
    assert "no such snapshot" in fs.last_error()


def test_a_second_mount_sees_the_first(fs: FsEnv, tmp_path) -> None:
    second = Mount(fs.store, str(tmp_path / "mnt2")).start()
    try:
        write_live(fs, 0x31)
        assert os.mkdir(os.path.join(second.path, "vm1/snapshots/from-second")) is None
        assert snapshot_names(fs) == ["from-second"]
        assert os.readlink(fs.p("vm1/current")) == "snapshots/from-second"
        assert snap_has(fs, "from-second", 0x31)
        with open(fs.snap("from-second", "description"), "w") as f:
            f.write("hello")
        with open(os.path.join(second.path, "vm1/snapshots/from-second/description")) as f:
            assert f.read() == "hello\n"
    finally:
        second.stop()


def test_description_with_control_characters(fs: FsEnv) -> None:
    make_chain(fs, DRIVER_PY, ["a"])
    code = DRIVER_PY.write(fs.snap("a", "description"), b"bell\x07 and nul\x00")
    assert code == errno.EINVAL
    assert "control characters" in fs.read("vm1/last-error")
    assert "<name>a</name>" in fs.read("vm1/snapshots/a/xml")


def test_last_error_from_other_front_ends(fs: FsEnv) -> None:
    run = core_call(
        fs.store,
        """
try:
    await store.domain("vm1").create(".bad")
except Exception:
    pass
""",
    )
    assert run.returncode == 0, run.stderr
    assert "cannot start with '.'" in fs.last_error()


def test_unexpected_error_is_eio_and_mount_survives(fs: FsEnv) -> None:
    os.rename(os.path.join(fs.store, "domains/vm1/domain.xml"), os.path.join(fs.store, "domains/vm1/moved"))
    with pytest.raises(OSError) as info:
        open(fs.p("vm1/xml")).read()
    assert info.value.errno == errno.EIO
    assert "unexpectedly" in fs.last_error()
    assert sorted(os.listdir(fs.mnt)) == ["vm1", "vm2"]
    assert os.path.ismount(fs.mnt)


@pytest.fixture
def slow_fs(tmp_path):
    """A mount whose qemu-img takes 3 s longer for commit/rebase: a long merge, for sure."""
    wrapper = tmp_path / "slow-qemu-img"
    wrapper.write_text('#!/bin/sh\ncase "$1" in commit|rebase) sleep 3;; esac\nexec qemu-img "$@"\n')
    wrapper.chmod(0o755)
    yield from start_env(tmp_path, {"SNAPFS_QEMU_IMG": str(wrapper)})


@pytest.mark.timeout(300)
def test_ls_of_another_domain_during_a_long_merge(slow_fs: FsEnv, tmp_path) -> None:
    fs = slow_fs
    big = make_image(str(tmp_path / "images/big.qcow2"), "qcow2", size=512 << 20)
    run = core_call(fs.store, f'await store.define("big", [("vda", {big!r}, "qcow2")])')
    assert run.returncode == 0, run.stderr
    live = fs.live("vda", "big")
    write_pattern(live, 0x77, 0, 256 << 20)
    assert os.mkdir(fs.snap("s", dom="big")) is None
    write_pattern(live, 0x78, 0, 256 << 20)
    result: dict[str, object] = {}

    def merge() -> None:
        start = time.monotonic()
        cmd = ["bash", "-c", 'echo merge > "$1"', "bash", fs.snap("s", "control", dom="big")]
        result["rc"] = subprocess.run(cmd, capture_output=True, text=True).returncode
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=merge)
    thread.start()
    time.sleep(0.5)
    try:
        start = time.monotonic()
        assert sorted(os.listdir(fs.p("vm2"))) == ["control", "disks", "job", "last-error", "snapshots", "state", "xml"]
        assert "<domain" in open(fs.p("vm2/xml")).read()
        assert os.listdir(fs.p("big/snapshots")) == ["s"]  # the merging domain is readable too
        assert "<name>s</name>" in open(fs.snap("s", "xml", dom="big")).read()
        write_live(fs, 0x12)  # operations on other domains go on
        assert os.mkdir(fs.snap("during-merge")) is None
        elapsed = time.monotonic() - start
        assert thread.is_alive(), "the merge ended before the reads: the test proves nothing"
        assert elapsed < 2.5
    finally:
        thread.join(timeout=240)
    assert result["rc"] == 0
    assert result["seconds"] >= 3
    assert os.listdir(fs.p("big/snapshots")) == []
    assert has_pattern(live, 0x78, 0, 256 << 20)


@pytest.mark.timeout(120)
def test_sigterm_during_a_long_operation_lets_it_finish(slow_fs: FsEnv) -> None:
    fs = slow_fs
    make_chain(fs, DRIVER_PY, ["a", "b"])
    cmd = ["bash", "-c", 'echo merge > "$1"', "bash", fs.snap("a", "control")]
    merge = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    time.sleep(1)
    assert merge.poll() is None
    assert fs.mount.signal(signal.SIGTERM) == 0
    assert merge.wait(timeout=30) == 0
    assert not os.path.ismount(fs.mnt)
    assert not os.path.exists(os.path.join(fs.store, "domains/vm1/journal.json"))
    fs.mount.start()
    assert snapshot_names(fs) == ["b"]
    assert live_has(fs, 0x10, 0) and live_has(fs, 0x11, CLUSTER)


# ---- the mount's lifecycle -------------------------------------------------------------------
def run_mount_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "snapfs.mount", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_refuses_missing_or_non_empty_mountpoint(tmp_path) -> None:
    setup = define_store(str(tmp_path))
    run = run_mount_cli(setup.root, str(tmp_path / "absent"), "--foreground")
    assert run.returncode != 0 and "does not exist" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    run = run_mount_cli(setup.root, str(busy), "--foreground")
    assert run.returncode != 0 and "not empty" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    run = run_mount_cli(setup.root, str(busy / "file"))  # daemon mode reports the same way
    assert run.returncode != 0 and "not a directory" in run.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path, signum: int) -> None:
    setup = define_store(str(tmp_path))
    mount = Mount(setup.root, str(tmp_path / "mnt")).start()
    try:
        assert os.listdir(mount.path) == ["vm1", "vm2"] or sorted(os.listdir(mount.path)) == ["vm1", "vm2"]
        assert mount.signal(signum) == 0
        assert not os.path.ismount(mount.path)
        assert "Traceback" not in mount.log()
    finally:
        mount.stop()


def test_fusermount_unmount_ends_the_process(tmp_path) -> None:
    setup = define_store(str(tmp_path))
    mount = Mount(setup.root, str(tmp_path / "mnt")).start()
    try:
        subprocess.run(["fusermount3", "-u", mount.path], check=True)
        assert mount.proc.wait(timeout=15) == 0
        assert "Traceback" not in mount.log()
    finally:
        mount.stop()


def test_daemon_mode(tmp_path) -> None:
    setup = define_store(str(tmp_path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        run = run_mount_cli(setup.root, str(mnt))
        assert run.returncode == 0, run.stderr
        assert os.path.ismount(mnt)  # mounted when the command returns
        assert sorted(os.listdir(mnt)) == ["vm1", "vm2"]
        run = run_mount_cli(setup.root, str(mnt))
        assert run.returncode != 0 and "already a mount point" in run.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.ismount(mnt)


# ---- a refusal is the exit status of the echo that caused it (issue 15, item 3) ---------------
BAD_DESCRIPTIONS = [
    ("builtin-echo-control", "echo -e 'a\\x01b' > \"$1\"", errno.EINVAL, "control characters"),
    ("bin-echo-control", "/bin/echo -e 'a\\x01b' > \"$1\"", errno.EINVAL, "control characters"),
    ("builtin-printf-not-utf8", "printf 'ok \\xff\\xfe' > \"$1\"", errno.EINVAL, "UTF-8"),
    ("builtin-printf-too-big", "printf '%*s' 70000 '' > \"$1\"", errno.EFBIG, "at most 65536 bytes"),
]


@pytest.mark.parametrize(
    ("script", "expected", "words"), [case[1:] for case in BAD_DESCRIPTIONS], ids=[case[0] for case in BAD_DESCRIPTIONS]
)
def test_a_refused_description_fails_the_shell_builtin(fs: FsEnv, script: str, expected: int, words: str) -> None:
    """bash's builtin echo/printf write once and report only what write() returned: every
    check on the bytes is made in write(), so the shell exits non-zero with the errno."""
    make_chain(fs, DRIVER_PY, ["a"])
    path = fs.snap("a", "description")
    assert DRIVER_PY.write(path, b"unchanged\n") == 0
    before = fs.fingerprint()
    run = subprocess.run(["bash", "-c", script, "bash", path], capture_output=True, text=True, env=BASH_ENV)
    assert run.returncode != 0, f"{script!r} exited 0: {run.stderr}"
    assert errno_of(run.stderr) == expected, run.stderr
    assert fs.fingerprint() == before
    assert fs.read("vm1/snapshots/a/description") == "unchanged\n"
    assert words in fs.last_error(), fs.last_error()


# ---- what the README says of tools that move or rewrite files (issue 15, item 11) -------------
def test_a_move_to_another_filesystem_keeps_the_snapshot(fs: FsEnv, tmp_path) -> None:
    """The kernel answers EXDEV before the mount sees the rename; `mv` then copies the
    snapshot's files (its .raw disks too) and fails to remove them, so the snapshot stays."""
    make_chain(fs, DRIVER_PY, ["a", "b"])
    before = fs.fingerprint()
    assert call(os.rename, fs.snap("b"), str(tmp_path / "renamed")) == errno.EXDEV
    target = tmp_path / "moved"
    run = subprocess.run(["mv", fs.snap("b"), str(target)], capture_output=True, text=True, env=BASH_ENV)
    assert run.returncode == 1
    assert {errno_of(line) for line in run.stderr.splitlines()} == {errno.EPERM}, run.stderr
    assert snapshot_names(fs) == ["a", "b"] and fs.fingerprint() == before
    assert (target / "xml").read_text() == fs.read("vm1/snapshots/b/xml")
    assert (target / "disks" / "vda.raw").stat().st_size == 4 << 20  # the whole disk was copied
    assert "rmdir /vm1/snapshots/b discards" in fs.last_error()


def test_sed_in_place_cannot_edit_a_description(fs: FsEnv) -> None:
    """`sed -i` writes a temporary file beside it and renames it over: both are refused,
    and the description stays. Rewriting it through the file itself works."""
    make_chain(fs, DRIVER_PY, ["a"])
    path = fs.snap("a", "description")
    assert DRIVER_PY.write(path, b"kernel 6.1\n") == 0
    run = subprocess.run(["sed", "-i", "s/6.1/6.6/", path], capture_output=True, text=True, env=BASH_ENV)
    assert run.returncode != 0 and "couldn't open temporary file" in run.stderr, run.stderr
    assert fs.read("vm1/snapshots/a/description") == "kernel 6.1\n"
    run = subprocess.run(
        ["bash", "-c", 'printf \'%s\' "$(sed s/6.1/6.6/ "$1")" > "$1"', "bash", path], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert fs.read("vm1/snapshots/a/description") == "kernel 6.6\n"


# ---- never stale: the kinds of file test_cache.py does not check (DESIGN section 2) -----------
def cli_run(fs: FsEnv, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "snapfs.cli", "--store", fs.store, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def stat_and_read(path: str) -> bytes:
    """A stat the kernel may answer from its cache, then a read: the size must match. The
    path is stat'ed again at the end: a read makes the kernel ask for the attributes at the
    next stat (atime), so only this last stat leaves them in its cache for the next check."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        data = f.read()
    assert size == len(data), f"stale size of {path}: {size} != {len(data)}"
    os.stat(path)
    return data


def test_last_error_and_domain_xml_are_never_stale(fs: FsEnv, tmp_path) -> None:
    """last-error changes with no change of the metadata; the domain XML changes when the
    domain is defined again with other disks. Both stat'ed (cached) first."""
    assert stat_and_read(fs.p("vm1/last-error")) == b""
    run = core_call(fs.store, 'store.domain("vm1").record_error("test", "nobody announces a refusal")')
    assert run.returncode == 0, run.stderr
    assert b"nobody announces a refusal" in stat_and_read(fs.p("vm1/last-error"))
    old_xml = stat_and_read(fs.p("vm2/xml"))
    disks = [f"{t}={make_image(str(tmp_path / 'images' / f'{t}.qcow2'), 'qcow2')}" for t in ("vda", "vdb")]
    assert cli_run(fs, "undefine", "vm2").returncode == 0
    assert cli_run(fs, "define", "--name", "vm2", "--disk", disks[0], "--disk", disks[1]).returncode == 0
    new_xml = stat_and_read(fs.p("vm2/xml"))
    assert b'<target dev="vdb"' in new_xml and b'<target dev="vdb"' not in old_xml


def test_changes_file_is_never_stale(fs: FsEnv) -> None:
    """A .changes (its size known to the kernel) after its parent is merged by another process."""
    write_live(fs, 0x21, 0)
    os.mkdir(fs.snap("a"))
    write_live(fs, 0x22, CLUSTER)
    os.mkdir(fs.snap("b"))
    write_live(fs, 0x23, 3 * CLUSTER)  # not next to b's cluster: c gets one more extent
    os.mkdir(fs.snap("c"))
    path = fs.snap("c", "disks/vda.changes")
    before = stat_and_read(path)
    assert cli_run(fs, "snapshot-deactivate", "vm1", "b", "--merge").returncode == 0
    after = stat_and_read(path)
    assert len(after) != len(before), (before, after)


def stat_and_read_while_changing(path: str, truth: str) -> bytes:
    """stat_and_read for a file that another process changes meanwhile: `truth` is the
    store's file it shows. A stat or a read made while that file held still must show
    exactly it (size, bytes), whether the kernel answered from its cache or asked the
    mount; one that overlapped a change proves nothing either way, so the check is made
    again (a stat then a read of a file that changes in between differ by right)."""

    def now() -> bytes:
        try:
            with open(truth, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            return b""
        return text if not text or text.endswith(b"\n") else text + b"\n"

    for _ in range(100):
        before = now()
        size = os.stat(path).st_size
        during = now()
        with open(path, "rb") as f:
            data = f.read()
        after = now()
        if before == during:
            assert size == len(before), f"stale size of {path}: {size} while the store held {before!r}"
        if during == after:
            assert data == during, f"stale content of {path}: {data!r} while the store held {during!r}"
        if before == during == after:
            os.stat(path)  # leaves the attributes in the kernel's cache, as stat_and_read does
            return data
    pytest.fail(f"{truth} changed during each of 100 checks")


def test_job_is_never_stale(tmp_path) -> None:
    """job changes during a long operation of another process (a slow qemu-img commit)."""
    wrapper = tmp_path / "slow-qemu-img"
    wrapper.write_text('#!/bin/sh\ncase "$1" in commit|rebase) sleep 2;; esac\nexec qemu-img "$@"\n')
    wrapper.chmod(0o755)
    env = start_env(tmp_path)
    fs = next(env)
    try:
        make_chain(fs, DRIVER_PY, ["a", "b"])
        path = fs.p("vm1/job")
        assert stat_and_read(path) == b""
        merge = subprocess.Popen(
            [PYTHON, "-m", "snapfs.cli", "--store", fs.store, "snapshot-deactivate", "vm1", "a", "--merge"],
            cwd=REPO,
            env={**os.environ, "SNAPFS_QEMU_IMG": str(wrapper)},
        )
        seen = b""
        deadline = time.monotonic() + 20
        while not seen and merge.poll() is None and time.monotonic() < deadline:
            seen = stat_and_read_while_changing(path, os.path.join(fs.store, "domains", "vm1", "job"))
            time.sleep(0.05)
        assert merge.wait(timeout=60) == 0
        assert seen, "job showed nothing during the merge"
        assert stat_and_read(path) == b""
    finally:
        env.close()
