"""The kernel's caches (kcache.py CACHE_SECONDS, notify.py): the mount lets the kernel keep
entries and attributes, and every change made by another process reaches it before that
process's call returns. Each check first walks the whole tree, so that everything is in
the kernel's caches, then changes the store from a command line process, then reads
through the mount at once: names against the core's metadata, and every file's st_size
against the length of its content (content is never cached, so a size kept from before
the change shows up as a mismatch).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import signal
import socket
import subprocess
import threading
import time

import pytest
from fsfixtures import (  # noqa: F401  (fixtures are used by name)
    PYTHON,
    REPO,
    FsEnv,
    Mount,
    core_call,
    fs_fixture,
)

import snapfs

pytestmark = pytest.mark.timeout(240)
SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}[platform.machine()]


def cli(fs: FsEnv, *args: str) -> None:
    run = subprocess.run(
        [PYTHON, "-m", "snapfs.cli", "--store", fs.store, *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert run.returncode == 0, run.stderr


def prime(root: str) -> int:
    """lstat (and readlink) everything under root: the kernel now holds it all."""
    count = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            os.lstat(path)
            if os.path.islink(path):
                os.readlink(path)
            count += 1
    return count


def assert_mount_agrees(fs: FsEnv, dom: str = "vm1") -> None:
    """What the mount shows of `dom`, read right now, against the store's metadata."""
    domain = snapfs.Store(snapfs.api.open_store_core(fs.store)).lookup_domain(dom)
    snapshots = fs.p(f"{dom}/snapshots")
    names = sorted(domain.list_snapshot_names())
    assert sorted(os.listdir(snapshots)) == names
    assert os.stat(snapshots).st_nlink == 2 + len(names)
    for name in names:
        directory = os.path.join(snapshots, name)
        for entry in ("xml", "description", "state", "compression", "control"):
            path = os.path.join(directory, entry)
            with open(path, "rb") as f:
                assert os.stat(path).st_size == len(f.read()), f"stale size of {path}"
        parent = domain.snapshot_lookup_by_name(name).get_parent()
        link = os.path.join(directory, "parent")
        if parent is None:
            assert not os.path.lexists(link)
        else:
            assert os.readlink(link) == f"../{parent.name}"
            assert os.lstat(link).st_size == len(f"../{parent.name}")
    current = fs.p(f"{dom}/current")
    snap = domain.current_snapshot()
    if snap:
        target = f"snapshots/{snap.name}"
        assert os.readlink(current) == target
        assert os.lstat(current).st_size == len(target)
    else:
        assert not os.path.lexists(current)


def test_every_change_from_the_command_line_is_seen_at_once(fs: FsEnv) -> None:
    steps = [
        ("snapshot-create-as", "vm1", "a"),
        ("snapshot-create-as", "vm1", "b"),
        ("snapshot-create-as", "vm1", "c"),
        ("snapshot-desc", "vm1", "b", "a description long enough to change the size of xml"),
        ("snapshot-rename", "vm1", "a", "first-one"),  # b's parent link and xml change
        ("snapshot-revert", "vm1", "first-one"),
        ("snapshot-create-as", "vm1", "branch"),
        ("snapshot-compress", "vm1", "c", "gzip"),
        ("snapshot-deactivate", "vm1", "b", "--merge"),  # c is re-parented to first-one
        ("snapshot-delete", "vm1", "branch"),
        ("snapshot-deactivate", "vm1", "first-one", "--deleteforce"),  # every snapshot goes
    ]
    for step in steps:
        assert prime(fs.mnt) > 10
        cli(fs, *step)
        assert_mount_agrees(fs)


def test_define_and_undefine_are_seen_at_once(fs: FsEnv, tmp_path) -> None:
    prime(fs.mnt)
    cli(fs, "snapshot-create-as", "vm2", "s")
    prime(fs.mnt)
    cli(fs, "undefine", "vm2", "--remove-snapshots")
    assert sorted(os.listdir(fs.mnt)) == ["vm1"]
    assert not os.path.exists(fs.p("vm2"))
    assert not os.path.exists(fs.p("vm2/snapshots/s/xml"))
    image = tmp_path / "images" / "vm2.qcow2"
    cli(fs, "define", "--name", "vm2", "--disk", f"vda={image}")
    assert sorted(os.listdir(fs.p("vm2/snapshots"))) == []
    assert_mount_agrees(fs, "vm2")


def test_the_kernel_keeps_what_nobody_announced(fs: FsEnv) -> None:
    """Proof that the caches are live, and that the announcement is what refreshes them:
    a change made with the announcement switched off is not seen by a stat (the size
    kept by the kernel), and is seen once it is announced."""
    cli(fs, "snapshot-create-as", "vm1", "a")
    path = fs.snap("a", "description")
    prime(fs.mnt)
    assert os.stat(path).st_size == 0
    silent = """
from snapfs import notify
async def say_nothing(*args, **kwargs):
    pass
notify.tell_mounts = say_nothing
dom = store.domain("vm1")
await dom.set_description(dom.view().by_name("a").id, "twelve chars")
"""
    run = core_call(fs.store, silent)
    assert run.returncode == 0, run.stderr
    assert os.stat(path).st_size == 0, "the kernel did not keep the attributes"
    run = core_call(fs.store, 'from snapfs import notify\nawait notify.tell_mounts(store.root, "vm1")')
    assert run.returncode == 0, run.stderr
    assert os.stat(path).st_size == len("twelve chars\n")


def test_a_dead_mount_does_not_hold_up_changes(fs: FsEnv, tmp_path) -> None:
    second = Mount(fs.store, str(tmp_path / "mnt2")).start()
    run_dir = os.path.join(fs.store, "run")
    try:
        assert len(os.listdir(run_dir)) == 2
        assert second.proc is not None
        second.proc.send_signal(signal.SIGKILL)
        second.proc.wait(timeout=10)
    finally:
        second.stop()
    assert len(os.listdir(run_dir)) == 2  # killed: it could not remove its registration
    prime(fs.mnt)
    cli(fs, "snapshot-create-as", "vm1", "after")
    assert len(os.listdir(run_dir)) == 1, "the dead mount's registration was not removed"
    assert_mount_agrees(fs)


def test_a_change_made_through_one_mount_reaches_another(fs: FsEnv, tmp_path) -> None:
    second = Mount(fs.store, str(tmp_path / "mnt2")).start()
    try:
        os.mkdir(fs.snap("a"))
        os.mkdir(fs.snap("b"))
        prime(second.path)
        with open(fs.snap("a", "description"), "w") as f:
            f.write("written through the first mount")  # stored at close, which waits for the second
        path = os.path.join(second.path, "vm1/snapshots/a/description")
        with open(path, "rb") as f:
            assert os.stat(path).st_size == len(f.read()) > 0
        with open(fs.snap("b", "control"), "w") as f:
            f.write("merge")
        assert not os.path.exists(os.path.join(second.path, "vm1/snapshots/b"))
    finally:
        second.stop()


def test_a_clean_unmount_removes_its_registration(fs: FsEnv, tmp_path) -> None:
    run_dir = os.path.join(fs.store, "run")
    second = Mount(fs.store, str(tmp_path / "mnt2")).start()
    assert len(os.listdir(run_dir)) == 2
    assert second.stop() == 0
    assert len(os.listdir(run_dir)) == 1


def test_a_lookup_during_a_pending_description_store_does_not_deadlock(fs: FsEnv) -> None:
    """`: > description` is stored at release, after close() returned; a lookup that
    arrives meanwhile must not wait for the store while the kernel holds the directory
    (the store ends by making the kernel drop entries of that directory)."""
    cli(fs, "snapshot-create-as", "vm1", "a")
    cli(fs, "snapshot-desc", "vm1", "a", "some words")
    snap = fs.snap("a")
    prime(snap)
    lock = os.open(os.path.join(fs.store, "domains", "vm1", "lock"), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the store at release now waits for the domain lock
    try:
        os.close(os.open(os.path.join(snap, "description"), os.O_WRONLY | os.O_TRUNC))
        time.sleep(0.3)
        found: dict[str, object] = {}

        def stat_xml() -> None:
            try:
                found["size"] = os.stat(os.path.join(snap, "xml")).st_size
            except OSError as exc:
                found["error"] = exc

        reader = threading.Thread(target=stat_xml, daemon=True)
        reader.start()
        time.sleep(0.5)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    reader.join(20)
    assert not reader.is_alive(), "stat hung: the lookup and the store wait for each other"
    assert "error" not in found, found
    with open(os.path.join(snap, "xml"), "rb") as f:
        text = f.read()
    assert b"some words" not in text
    assert os.stat(os.path.join(snap, "xml")).st_size == len(text)
    assert os.stat(os.path.join(snap, "description")).st_size == 0


def test_a_listing_that_spans_a_change_keeps_no_old_name(fs: FsEnv) -> None:
    """A listing read in several getdents calls, with a rename from another process in
    between: the rest of the listing may show the old name, but the kernel must not
    keep it once the rename has returned."""
    run = core_call(fs.store, 'd = store.domain("vm2")\nfor i in range(80):\n    await d.create(name=f"s{i:03d}")')
    assert run.returncode == 0, run.stderr
    directory = fs.p("vm2/snapshots")
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(1024)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert libc.syscall(SYS_GETDENTS64, fd, buffer, len(buffer)) > 0  # the first batch only
        cli(fs, "snapshot-rename", "vm2", "s079", "renamed")
        while libc.syscall(SYS_GETDENTS64, fd, buffer, len(buffer)) > 0:
            pass
    finally:
        os.close(fd)
    assert not os.path.exists(os.path.join(directory, "s079"))
    assert os.path.isdir(os.path.join(directory, "renamed"))


def test_a_mount_out_of_reach_stays_registered(fs: FsEnv) -> None:
    """A command in another network namespace cannot reach the mount's socket: it must
    not take the live mount for a dead one and remove its registration."""
    run_dir = os.path.join(fs.store, "run")
    assert len(os.listdir(run_dir)) == 1
    run = subprocess.run(
        ["unshare", "-n", PYTHON, "-m", "snapfs.cli", "--store", fs.store, "snapshot-create-as", "vm1", "elsewhere"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert len(os.listdir(run_dir)) == 1, "the live mount's registration was removed"
    prime(fs.mnt)
    cli(fs, "snapshot-rename", "vm1", "elsewhere", "back-home")
    assert_mount_agrees(fs)


@pytest.mark.parametrize(
    "message",
    [b"", b"\xff\xfe not utf-8\n", b"no-such-domain\n", b"x" * 10_000, b"vm1"],
    ids=["nothing", "not-utf8", "unknown-domain", "too-long", "no-newline"],
)
def test_garbage_on_the_mount_socket_changes_nothing(fs: FsEnv, message: bytes) -> None:
    """Anyone on the host can reach a mount's socket: whatever arrives, the mount stays up,
    answers nothing it should not, and keeps serving and hearing of real changes."""
    (token,) = os.listdir(os.path.join(fs.store, "run"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(b"\0snapfs-mount-" + token.encode())
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(100)
    assert answer == (b"ok\n" if message == b"no-such-domain\n" else b"")
    assert fs.mount.proc is not None and fs.mount.proc.poll() is None
    prime(fs.mnt)
    cli(fs, "snapshot-create-as", "vm1", "still-heard")
    assert_mount_agrees(fs)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def silently(fs: FsEnv, code: str) -> None:
    """Run core calls in another process with the announcements switched off."""
    run = core_call(
        fs.store,
        "from snapfs import notify\nasync def say_nothing(*args, **kwargs):\n    pass\n"
        "notify.tell_mounts = say_nothing\n" + code,
    )
    assert run.returncode == 0, run.stderr


def test_metadata_files_are_kept_in_the_page_cache_until_a_change_is_announced(fs: FsEnv) -> None:
    """Proof that xml and description are read from the page cache (a change of the same
    size, not announced, is not seen: no size tells it), and that the announcement drops
    the pages with the attributes."""
    cli(fs, "snapshot-create-as", "vm1", "a")
    cli(fs, "snapshot-desc", "vm1", "a", "aaaa")
    description, xml = fs.snap("a", "description"), fs.snap("a", "xml")
    assert read(description) == b"aaaa\n" and b"aaaa" in read(xml)
    silently(fs, 'dom = store.domain("vm1")\nawait dom.set_description(dom.view().by_name("a").id, "bbbb")')
    assert read(description) == b"aaaa\n", "the content was not kept in the page cache"
    assert b"aaaa" in read(xml)
    run = core_call(fs.store, 'from snapfs import notify\nawait notify.tell_mounts(store.root, "vm1")')
    assert run.returncode == 0, run.stderr
    assert read(description) == b"bbbb\n"
    assert b"bbbb" in read(xml) and b"aaaa" not in read(xml)


def test_no_cached_page_outlives_a_change_of_the_same_size(fs: FsEnv) -> None:
    """Changes that keep every size (so only the content can be stale), made by another
    process and through the mount itself, each read back at once after priming the cache."""
    os.mkdir(fs.snap("a"))
    os.mkdir(fs.snap("b"))
    files = [fs.snap(name, entry) for name in ("a", "b") for entry in ("xml", "description", "state")]
    files.append(fs.p("vm1/xml"))

    def fill() -> None:
        for path in files:
            read(path)

    for i, text in enumerate(["1111", "2222", "3333", "4444"]):
        fill()
        if i % 2:
            cli(fs, "snapshot-desc", "vm1", "a", text)
        else:
            with open(fs.snap("a", "description"), "w") as f:
                f.write(text)
        assert read(fs.snap("a", "description")) == f"{text}\n".encode()
        assert f"<description>{text}</description>".encode() in read(fs.snap("a", "xml"))
    fill()
    cli(fs, "snapshot-rename", "vm1", "a", "c")  # b's parent, same length
    assert b"<name>c</name>" in read(fs.snap("b", "xml"))
    assert b"<name>c</name>" in read(fs.snap("c", "xml"))
    fill_b = [fs.snap("b", "xml"), fs.snap("c", "xml")]
    for path in fill_b:
        read(path)
    with open(fs.snap("c", "compression"), "w") as f:
        f.write("gzip")
    assert read(fs.snap("c", "compression")) == b"gzip\n"
