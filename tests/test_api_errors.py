"""Bad input through the Python API: each is refused with a SnapfsError carrying the errno
of DESIGN section 2 and a sentence naming the cause, and leaves the store unchanged
(every file under the store and its checksum, before and after)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest
import trio
from conftest import DOMAIN_NAME, domain_xml
from helpers import CLUSTER, MiB, make_image, read_raw, tree_fingerprint, write_pattern
from refusal import api_refused

import snapfs
from snapfs import DeactivateFlags, DependentsError, SnapfsError
from snapfs.catalog import StoreCore


def snap_xml(name: str) -> str:
    from xml.sax.saxutils import escape

    return f"<domainsnapshot><name>{escape(name)}</name></domainsnapshot>"


@pytest.fixture
def tree(domain):
    """s1 <- s2 <- live, and s1 <- s3: s1 has two children, s2 has the live disk."""
    live = domain.live_paths().get
    write_pattern(live("vda"), 0x31, 0)
    write_pattern(live("vdb"), 0x32, CLUSTER)
    s1 = domain.snapshot_create_xml(snap_xml("s1"))
    write_pattern(live("vda"), 0x33, MiB)
    s3 = domain.snapshot_create_xml(snap_xml("s3"))
    domain.create_with_snapshot(s1)
    write_pattern(live("vdb"), 0x34, 2 * MiB)
    s2 = domain.snapshot_create_xml(snap_xml("s2"))
    write_pattern(live("vda"), 0x35, 3 * MiB)
    return {"s1": s1, "s2": s2, "s3": s3}


# ---- names ------------------------------------------------------------------------------

BAD_NAMES = [
    ("", errno.EINVAL, "empty"),
    (".", errno.EINVAL, "'.'"),
    ("..", errno.EINVAL, "'.'"),
    (".hidden", errno.EINVAL, "'.'"),
    ("a/b", errno.EINVAL, "/"),
    ("a\0b", errno.EINVAL, ""),
    ("bad\udcffutf8", errno.EINVAL, "UTF-8"),
    ("x" * 256, (errno.ENAMETOOLONG, errno.EINVAL), "255"),
    ("é" * 128, (errno.ENAMETOOLONG, errno.EINVAL), "255"),
]


@pytest.mark.parametrize("name, err, word", BAD_NAMES, ids=lambda v: repr(v)[:20] if isinstance(v, str) else None)
def test_invalid_names_refused(store_path, tree, domain, name, err, word):
    if "\0" not in name and "\udcff" not in name:
        api_refused(store_path, lambda: domain.snapshot_create_xml(snap_xml(name)), err, word)
    api_refused(store_path, lambda: tree["s2"].rename(name), err, word)
    api_refused(store_path, lambda: _create(domain, name), err, word)
    assert tree["s2"].name == "s2"


def _create(domain, name):
    import trio

    return trio.run(domain.core.create, name)


@pytest.mark.parametrize("name", ["x" * 255, "é" * 127 + "a", "with spaces", "ünïcode ☃", "trailing-dot.", "a..b"])
def test_valid_names_accepted(domain, name):
    assert len(name.encode()) <= 255
    snap = domain.snapshot_create_xml(snap_xml(name))
    assert snap.name == name
    assert domain.snapshot_lookup_by_name(name) == snap
    snap.rename(name + "2" if len(name.encode()) < 255 else "renamed")
    snap.rename(name)
    assert domain.list_snapshot_names() == [name]


def test_existing_name(store_path, tree, domain):
    api_refused(store_path, lambda: domain.snapshot_create_xml(snap_xml("s1")), errno.EEXIST, "s1", "already")
    api_refused(store_path, lambda: tree["s2"].rename("s3"), errno.EEXIST, "s3", "already")


# ---- XML --------------------------------------------------------------------------------

XXE = """<?xml version="1.0"?>
<!DOCTYPE domainsnapshot [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domainsnapshot><name>x</name><description>&xxe;</description></domainsnapshot>"""

LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n' for i in range(1, 10)
    )
    + "]>\n<domainsnapshot><name>bomb</name><description>&lol9;</description></domainsnapshot>"
)

BAD_XML = {
    "malformed": ("<domainsnapshot><name>x</domainsnapshot>", "well-formed"),
    "not xml": ("this is not xml", "well-formed"),
    "empty": ("", ""),
    "binary": (b"\xff\xfe\x00<", ""),
    "wrong root": ("<domain><name>x</name></domain>", "root"),
    "xxe": (XXE, "DOCTYPE"),
    "billion laughs": (LAUGHS, "DOCTYPE"),
    "plain doctype": ("<!DOCTYPE domainsnapshot><domainsnapshot><name>d</name></domainsnapshot>", "DOCTYPE"),
    "undeclared entity": ("<domainsnapshot><name>&foo;</name></domainsnapshot>", ""),
    "huge": ("<domainsnapshot><name>h</name><!-- " + "x" * (MiB + 10) + " --></domainsnapshot>", "larger"),
    "huge description": (
        "<domainsnapshot><name>h</name><description>" + "y" * (MiB + 1) + "</description></domainsnapshot>",
        "larger",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_bad_snapshot_xml(store_path, tree, domain, case):
    text, word = BAD_XML[case]
    exc = api_refused(store_path, lambda: domain.snapshot_create_xml(text), errno.EINVAL, word)
    assert sorted(domain.list_snapshot_names()) == ["s1", "s2", "s3"]
    assert "root:" not in str(exc)  # nothing of /etc/passwd leaks into the message
    assert domain.last_error().strip(), "a refusal is recorded in last-error"


def test_unknown_compression(store_path, tree, domain):
    text = "<domainsnapshot><name>c</name><compression>lz4</compression></domainsnapshot>"
    api_refused(store_path, lambda: domain.snapshot_create_xml(text), errno.EINVAL, "lz4")
    for kind in ("bzip2", "", "GZIP ", "zlib"):
        api_refused(store_path, lambda kind=kind: tree["s1"].set_compression(kind), errno.EINVAL, "compression")
    assert "c" not in domain.list_snapshot_names()


def test_description_too_large(store_path, tree, domain):
    big = "d" * (64 * 1024 + 1)
    api_refused(store_path, lambda: tree["s1"].set_description(big), errno.EFBIG, "description")
    text = f"<domainsnapshot><name>big</name><description>{big}</description></domainsnapshot>"
    api_refused(store_path, lambda: domain.snapshot_create_xml(text), errno.EFBIG, "description")
    tree["s1"].set_description("d" * (64 * 1024))  # exactly 64 KiB is fine
    assert len(tree["s1"].get_description()) == 64 * 1024


# ---- unknown things -------------------------------------------------------------------------


def test_unknown_domain_and_snapshot(store, store_path, tree, domain):
    for name in ("nope", "", "../domains", "vm1/../vm1"):
        api_refused(store_path, lambda name=name: store.lookup_domain(name), errno.ENOENT, "domain")
    api_refused(store_path, lambda: domain.snapshot_lookup_by_name("nope"), errno.ENOENT, "nope")
    stale = tree["s3"]
    stale.deactivate(DeactivateFlags.DISCARD)
    for call in (
        stale.get_xml_desc,
        lambda: stale.deactivate(DeactivateFlags.MERGE),
        lambda: stale.deactivate(DeactivateFlags.DISCARD_FORCE),
        lambda: stale.rename("zz"),
        lambda: stale.set_description("x"),
        lambda: stale.set_compression("gzip"),
        lambda: domain.create_with_snapshot(stale),
    ):
        api_refused(store_path, call, errno.ENOENT, "snapshot")


def test_discard_with_dependents(store_path, tree, domain):
    exc = api_refused(store_path, lambda: tree["s1"].deactivate(DeactivateFlags.DISCARD), errno.EBUSY, "'s2'", "'s3'")
    assert isinstance(exc, DependentsError)
    exc = api_refused(store_path, lambda: tree["s2"].deactivate(DeactivateFlags.DISCARD), errno.EBUSY, "live disk")
    assert isinstance(exc, DependentsError)


@pytest.mark.parametrize("flags", [DeactivateFlags.MERGE | DeactivateFlags.DISCARD, 16, -1, 3, "merge", None])
def test_invalid_deactivate_flags(store_path, tree, flags):
    api_refused(store_path, lambda: tree["s2"].deactivate(flags), errno.EINVAL, "flags")


# ---- images in use -----------------------------------------------------------------------------


class NbdHolder:
    """qemu-nbd --fork holding an image (and its backing chain) with qemu's lock."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.pids: list[int] = []

    def hold(self, path: str, read_only: bool = False) -> None:
        n = len(self.pids)
        pidfile = self.tmp_path / f"nbd{n}.pid"
        args = ["qemu-nbd", "--fork", f"--socket={self.tmp_path}/nbd{n}.sock", f"--pid-file={pidfile}", "-f", "qcow2"]
        subprocess.run([*args, *(["-r"] if read_only else []), path], check=True, timeout=30)
        self.pids.append(int(pidfile.read_text().strip()))

    def release(self) -> None:
        while self.pids:
            pid = self.pids.pop()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)


@pytest.fixture
def nbd(tmp_path):
    holder = NbdHolder(tmp_path)
    yield holder
    holder.release()


def test_live_layer_in_use(store_path, tree, domain, nbd):
    nbd.hold(domain.live_paths()["vdb"])
    s1, s2 = tree["s1"], tree["s2"]
    calls = {
        "create": lambda: domain.snapshot_create_xml(snap_xml("new")),
        "merge (live depends)": lambda: s2.deactivate(DeactivateFlags.MERGE),
        "merge (chain below live)": lambda: s1.deactivate(DeactivateFlags.MERGE),
        "revert": lambda: domain.create_with_snapshot(s1),
        "deactivate": lambda: s2.deactivate(),
        "discard-force (live inside)": lambda: s2.deactivate(DeactivateFlags.DISCARD_FORCE),
    }
    for what, call in calls.items():
        exc = api_refused(store_path, call, errno.EBUSY, "in use")
        named = ("The live disk vdb of domain 'vm1'", "Disk vdb of snapshot 's2'")  # s2: under the live disk
        assert str(exc).startswith(named), (what, str(exc))
        assert "live.qcow2" not in str(exc) and "/" not in str(exc), (what, str(exc))  # no internal file named
        assert "in use" in domain.last_error()
    nbd.release()
    before = read_raw(domain.live_paths()["vdb"])
    domain.snapshot_create_xml(snap_xml("new"))  # works once the holder is gone
    assert read_raw(domain.snapshot_lookup_by_name("new").layer_paths()["vdb"]) == before


def test_frozen_layer_in_use_as_a_backing(store_path, tree, domain, nbd, tmp_path):
    """A backup job reads s3 through its own overlay on L(s3); and another exports L(s1)."""
    s1, s3 = tree["s1"], tree["s3"]
    overlay = str(tmp_path / "backup-overlay.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", s3.layer_paths()["vda"], "-F", "qcow2", overlay], check=True
    )
    nbd.hold(overlay)
    for call in (
        lambda: s3.deactivate(DeactivateFlags.DISCARD),
        lambda: s3.deactivate(DeactivateFlags.DISCARD_FORCE),
        lambda: s3.set_compression("zstd"),
    ):
        api_refused(store_path, call, errno.EBUSY, "in use")
    nbd.release()
    nbd.hold(s1.layer_paths()["vdb"], read_only=True)
    for call in (
        lambda: s1.deactivate(DeactivateFlags.MERGE),
        lambda: s1.deactivate(DeactivateFlags.DISCARD_FORCE),
        lambda: s1.set_compression("gzip"),
    ):
        exc = api_refused(store_path, call, errno.EBUSY, "in use")
        assert "Disk vdb of snapshot 's1'" in str(exc) and ".qcow2" not in str(exc), str(exc)
    # Revert onto s1 and create only read L(s1): allowed while it is exported read-only.
    domain.create_with_snapshot(s1)
    domain.snapshot_create_xml(snap_xml("on-s1"))
    assert domain.snapshot_lookup_by_name("on-s1").get_parent() == s1


def test_merge_that_pulls_refused_while_its_layers_are_in_use(store_path, domain, nbd):
    """A merge whose one dependent pulls S's data in place (the live disk, far larger than
    S) is refused with EBUSY and changes nothing while the live layer is exported, or while
    L(S), which it reads and then deletes, is exported read-only; it runs once they are free."""
    live = domain.live_paths()
    write_pattern(live["vda"], 0x31, 0)
    s = domain.snapshot_create_xml(snap_xml("s"))
    for target in ("vda", "vdb"):
        write_pattern(live[target], 0x32, CLUSTER, 40 * CLUSTER)
    live_file = domain.core.live_file("vda")
    nbd.hold(live_file)
    api_refused(store_path, lambda: s.deactivate(DeactivateFlags.MERGE), errno.EBUSY, "in use", "live disk vda")
    nbd.release()
    nbd.hold(s.layer_paths()["vdb"], read_only=True)
    api_refused(store_path, lambda: s.deactivate(DeactivateFlags.MERGE), errno.EBUSY, "in use", "snapshot 's'")
    nbd.release()
    inode = os.stat(live_file).st_ino
    s.deactivate(DeactivateFlags.MERGE)
    assert domain.core.live_file("vda") == live_file and os.stat(live_file).st_ino == inode  # pulled in place
    assert read_raw(live["vda"])[:CLUSTER] == bytes([0x31]) * CLUSTER
    assert read_raw(live["vdb"])[CLUSTER : 41 * CLUSTER] == bytes([0x32]) * 40 * CLUSTER


def test_domain_held_by_another_operation(store_path, tree, domain):
    """While another process holds the domain's lock, an operation gives up with EBUSY
    (SNAPFS_LOCK_WAIT shortens the wait) and changes nothing."""
    script = (
        "import errno, snapfs\n"
        f"dom = snapfs.open_store({store_path!r}).lookup_domain({DOMAIN_NAME!r})\n"
        "try:\n"
        "    dom.snapshot_lookup_by_name('s2').deactivate(snapfs.DeactivateFlags.MERGE)\n"
        "except snapfs.SnapfsError as exc:\n"
        "    print(errno.errorcode[exc.errno], exc)\n"
    )
    before = tree_fingerprint(store_path)
    fd = os.open(os.path.join(store_path, "domains", domain.name, "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "SNAPFS_LOCK_WAIT": "0.3"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(fd)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("EBUSY") and "Another operation" in run.stdout, run.stdout
    assert tree_fingerprint(store_path) == before
    tree["s2"].deactivate(DeactivateFlags.MERGE)  # and works once the lock is free
    assert sorted(domain.list_snapshot_names()) == ["s1", "s3"]


# ---- define ---------------------------------------------------------------------------------


def test_define_errors(store, store_path, domain, base_images, tmp_path):
    vda = base_images["vda"]
    api_refused(
        store_path,
        lambda: store.define("d2", [("vda", str(tmp_path / "missing.img"), "raw")]),
        errno.ENOENT,
        "missing.img",
    )
    api_refused(
        store_path,
        lambda: store.define("d2", [("vda", str(tmp_path), "raw")]),
        errno.EINVAL,
        f"{tmp_path} is not a regular file",
    )
    api_refused(store_path, lambda: store.define(DOMAIN_NAME, [("vda", vda.path, "qcow2")]), errno.EEXIST, DOMAIN_NAME)
    api_refused(
        store_path, lambda: store.define_xml(domain_xml(DOMAIN_NAME, "x", base_images)), errno.EEXIST, DOMAIN_NAME
    )
    api_refused(store_path, lambda: store.define("d2", [("vda", vda.path, "vmdk")]), errno.EINVAL, "vmdk")
    vmdk = make_image(str(tmp_path / "disk.vmdk"), "vmdk")
    api_refused(store_path, lambda: store.define("d2", [("vda", vmdk, None)]), errno.EINVAL, "vmdk")
    api_refused(store_path, lambda: store.define("d2", []), errno.EINVAL, "disk")
    api_refused(
        store_path,
        lambda: store.define("d2", [("vda", vda.path, "qcow2"), ("vda", vda.path, "qcow2")]),
        errno.EINVAL,
        "twice",
    )
    for bad in ("", ".x", "a/b", "..", "x" * 256):
        api_refused(
            store_path,
            lambda bad=bad: store.define(bad, [("vda", vda.path, "qcow2")]),
            (errno.EINVAL, errno.ENAMETOOLONG),
            "",
        )
    no_disks = f"""<domain type='kvm'><name>d3</name><devices>
      <disk type='file' device='cdrom'><source file='{vda.path}'/><target dev='sda'/></disk>
      <disk type='file' device='disk' snapshot='no'><driver type='qcow2'/>
        <source file='{vda.path}'/><target dev='vdb'/></disk>
      <disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdc'/></disk>
    </devices></domain>"""
    api_refused(store_path, lambda: store.define_xml(no_disks), errno.EINVAL, "disk")
    api_refused(store_path, lambda: store.define_xml(XXE.replace("domainsnapshot", "domain")), errno.EINVAL, "DOCTYPE")
    api_refused(store_path, lambda: store.define_xml("<domainsnapshot/>"), errno.EINVAL, "root")
    api_refused(store_path, lambda: store.define_xml("<domain><devices/></domain>"), errno.EINVAL, "name")
    assert store.list_domains() == [DOMAIN_NAME]


def test_undefine_refused_with_snapshots(store, store_path, tree):
    api_refused(store_path, lambda: store.undefine(DOMAIN_NAME), errno.EBUSY, "snapshot")
    api_refused(store_path, lambda: store.undefine("nope"), errno.ENOENT, "nope")


# ---- last-error -----------------------------------------------------------------------------


def test_last_error_holds_the_latest_refusal(store_path, tree, domain):
    assert domain.last_error() == ""
    api_refused(store_path, lambda: tree["s1"].deactivate(DeactivateFlags.DISCARD), errno.EBUSY)
    first = domain.last_error()
    assert "s1" in first and "depend" in first and first.endswith("\n") and first.count("\n") == 1
    tree["s3"].rename("renamed")  # a success does not clear it
    domain.snapshot_create_xml(snap_xml("ok"))
    assert domain.last_error() == first
    api_refused(store_path, lambda: domain.snapshot_create_xml(snap_xml("ok")), errno.EEXIST)
    second = domain.last_error()
    assert second != first and "'ok'" in second and "already" in second
    api_refused(store_path, lambda: domain.snapshot_create_xml("<domainsnapshot>"), errno.EINVAL)
    assert "well-formed" in domain.last_error()
    # The refusal line is visible to a second opener of the store.
    again = snapfs.open_store(store_path).lookup_domain(DOMAIN_NAME)
    assert again.last_error() == domain.last_error()


def test_a_domain_redefined_under_the_same_name_is_seen_anew(tmp_path):
    """A long-lived core (as in a mount) notices an undefine + define by another process."""
    first = make_image(str(tmp_path / "first.qcow2"), "qcow2")
    second = make_image(str(tmp_path / "second.qcow2"), "qcow2")

    async def scenario() -> None:
        mounted = StoreCore(str(tmp_path / "store"))
        await mounted.define("vm", [("vda", first, "qcow2")])
        assert mounted.domain("vm").record().disks[0].base == first
        other = StoreCore(str(tmp_path / "store"))
        await other.undefine("vm")
        await other.define("vm", [("vdb", second, "qcow2")])
        disk = mounted.domain("vm").record().disks[0]
        assert (disk.target, disk.base) == ("vdb", second)

    trio.run(scenario)


# ---- issue 15, item 6 -----------------------------------------------------------------------
def test_create_with_snapshot_takes_a_name(store_path, tree, domain):
    domain.create_with_snapshot("s3")
    assert domain.current_snapshot() == tree["s3"]
    assert read_raw(domain.live_paths()["vda"]) == read_raw(tree["s3"].layer_paths()["vda"])
    api_refused(store_path, lambda: domain.create_with_snapshot("nosuch"), errno.ENOENT, "nosuch")
    api_refused(store_path, lambda: domain.create_with_snapshot(42), errno.EINVAL, "snapshot name")


@pytest.mark.parametrize(
    "call",
    [
        lambda d, s: d.snapshot_create_xml(snap_xml("new"), 1),
        lambda d, s: d.snapshot_num(1 << 30),
        lambda d, s: d.list_snapshot_names(2),
        lambda d, s: d.snapshot_lookup_by_name("s1", 4),
        lambda d, s: d.create_with_snapshot(s, 4),
        lambda d, s: d.current_snapshot(8),
        lambda d, s: s.get_xml_desc(1),
        lambda d, s: s.get_parent(1),
        lambda d, s: s.deactivate(DeactivateFlags.MERGE | 16),
        lambda d, s: d.snapshot_num(-1),
    ],
)
def test_unknown_flag_bits_are_refused(store_path, tree, domain, call):
    api_refused(store_path, lambda: call(domain, tree["s1"]), errno.EINVAL, "flags")


def test_names_in_repr_and_parent(tree, domain):
    assert repr(tree["s2"]) == "<Snapshot vm1/s2>"
    assert repr(domain) == "<Domain vm1>"
    parent = tree["s2"].get_parent()
    assert parent == tree["s1"] and repr(parent) == "<Snapshot vm1/s1>" and parent.name == "s1"
    tree["s1"].rename("first")
    assert repr(tree["s2"].get_parent()) == "<Snapshot vm1/first>"


def test_snapfs_error_is_an_oserror(store_path, tree, domain):
    exc = api_refused(store_path, lambda: domain.snapshot_lookup_by_name("nosuch"), errno.ENOENT)
    assert isinstance(exc, OSError) and exc.errno == errno.ENOENT
    assert str(exc) == exc.message == exc.strerror and not str(exc).startswith("[Errno")
    with pytest.raises(OSError):
        tree["s1"].deactivate(DeactivateFlags.DISCARD)
    assert isinstance(DependentsError("x"), OSError)


def test_description_loses_one_trailing_newline(tree):
    tree["s1"].set_description("two lines\nhere\n")
    assert tree["s1"].get_description() == "two lines\nhere"
    tree["s1"].set_description("kept\n\n")
    assert tree["s1"].get_description() == "kept\n"


def test_open_store_never_makes_a_store(tmp_path):
    typo = str(tmp_path / "typo")
    with pytest.raises(SnapfsError) as info:
        snapfs.open_store(typo)
    assert info.value.errno == errno.ENOENT and "no snapfs store" in str(info.value)
    assert not os.path.exists(typo)
    made = snapfs.open_store(typo, create=True)
    assert made.list_domains() == [] and snapfs.open_store(typo).path == made.path
