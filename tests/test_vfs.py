"""The mounted tree as plain data (snapfs/vfs.py) and the write protocol (snapfs/writes.py),
checked without a mount: a real store, a domain and snapshots made through the API."""

from __future__ import annotations

import errno
import json
import stat
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import trio
from helpers import CLUSTER, DISK_SIZE, REPO, write_pattern

import snapfs
from snapfs import disk
from snapfs.catalog import StoreCore
from snapfs.rules import CONTROL_WORDS
from snapfs.vfs import ROOT, Node, Tree
from snapfs.writes import Writes


@pytest.fixture
def snaps(domain: snapfs.Domain) -> dict[str, snapfs.Snapshot]:
    """a (described) <- b (gzip); a <- c (after a revert to a): current is c."""
    live = domain.live_paths()["vda"]
    write_pattern(live, 0x11, 0)
    a = domain.snapshot_create_xml(
        "<domainsnapshot><name>a</name><description>first one</description></domainsnapshot>"
    )
    write_pattern(live, 0x22, 2 * CLUSTER, 2 * CLUSTER)
    b = domain.snapshot_create_xml("<domainsnapshot><name>b</name><compression>gzip</compression></domainsnapshot>")
    domain.create_with_snapshot(a)
    c = domain.snapshot_create_xml("<domainsnapshot><name>c</name></domainsnapshot>")
    return {"a": a, "b": b, "c": c}


@pytest.fixture
def tree(store_path: str, snaps) -> Tree:
    return Tree(StoreCore(store_path), disk.changes)


def at(tree: Tree, *names: str) -> Node:
    """The node at a path of names, found as a lookup would."""
    node = ROOT
    for name in names:
        found = tree.find(node, name, tree.reading())
        assert found is not None, f"{names}: no {name!r}"
        node = found
    return node


def names(tree: Tree, *path: str) -> list[str]:
    return [name for name, _ in tree.entries(at(tree, *path), tree.reading())]


def content(tree: Tree, *path: str) -> bytes:
    return tree.content(at(tree, *path), tree.reading())


def test_listings(tree: Tree) -> None:
    assert names(tree) == ["vm1"]
    assert names(tree, "vm1") == ["xml", "current", "last-error", "job", "snapshots", "disks", "state", "control"]
    assert sorted(names(tree, "vm1", "snapshots")) == ["a", "b", "c"]
    assert names(tree, "vm1", "snapshots", "a") == ["xml", "description", "state", "compression", "control", "disks"]
    assert "parent" in names(tree, "vm1", "snapshots", "b")
    assert names(tree, "vm1", "snapshots", "b", "disks") == [
        "vda.raw",
        "vda.changes",
        "vda.map",
        "vdb.raw",
        "vdb.changes",
        "vdb.map",
    ]
    disks = names(tree, "vm1", "disks")  # the stable names, then every real layer file (3 snapshots + live, 2 disks)
    assert disks[:2] == ["vda", "vdb"] and len(disks) == 2 + 8 and all(n.endswith(".qcow2") for n in disks[2:])
    assert tree.find(at(tree, "vm1", "snapshots"), "nope", tree.reading()) is None
    assert tree.find(at(tree, "vm1", "snapshots", "a"), "parent", tree.reading()) is None  # a root
    assert tree.find(at(tree, "vm1", "snapshots", "a", "disks"), "vdz.raw", tree.reading()) is None
    assert tree.path(at(tree, "vm1", "snapshots", "b", "disks", "vdb.changes")) == "/vm1/snapshots/b/disks/vdb.changes"


def test_symlinks(tree: Tree, domain: snapfs.Domain) -> None:
    now = tree.reading()
    assert tree.readlink(at(tree, "vm1", "current"), now) == "snapshots/c"
    assert tree.readlink(at(tree, "vm1", "snapshots", "b", "parent"), now) == "../a"
    assert tree.readlink(at(tree, "vm1", "disks", "vdb"), now) == domain.live_paths()["vdb"]
    attrs = tree.attributes(at(tree, "vm1", "current"), now)
    assert stat.S_ISLNK(attrs.mode) and attrs.size == len("snapshots/c")


def test_attributes(tree: Tree, snaps, domain: snapfs.Domain) -> None:
    now = tree.reading()
    snapshots = tree.attributes(at(tree, "vm1", "snapshots"), now)
    assert stat.S_ISDIR(snapshots.mode) and snapshots.mode & 0o777 == 0o755 and snapshots.nlink == 2 + 3
    a = tree.attributes(at(tree, "vm1", "snapshots", "a"), now)
    assert stat.S_ISDIR(a.mode) and a.mode & 0o777 == 0o555 and a.nlink == 3
    created = ElementTree.fromstring(snaps["a"].get_xml_desc()).findtext("creationTime")
    assert a.time_ns == int(created) * 1_000_000_000
    for rel in ("xml", "description", "state", "compression", "control"):
        node = at(tree, "vm1", "snapshots", "a", rel)
        attrs = tree.attributes(node, now)
        assert stat.S_ISREG(attrs.mode) and attrs.size == len(tree.content(node, now)), rel
        assert attrs.blocks == (attrs.size + 511) // 512
    assert tree.attributes(at(tree, "vm1", "snapshots", "a", "description"), now).mode & 0o777 == 0o644
    assert tree.attributes(at(tree, "vm1", "snapshots", "a", "xml"), now).mode & 0o777 == 0o444
    assert tree.attributes(at(tree, "vm1", "snapshots", "a", "disks", "vda.raw"), now).size == DISK_SIZE


def test_contents(tree: Tree, snaps, domain: snapfs.Domain) -> None:
    assert content(tree, "vm1", "snapshots", "a", "description") == b"first one\n"
    assert content(tree, "vm1", "snapshots", "b", "description") == b""  # empty: no newline either
    assert content(tree, "vm1", "snapshots", "a", "state") == b"shutoff\n"
    assert content(tree, "vm1", "snapshots", "b", "compression") == b"gzip\n"
    assert content(tree, "vm1", "snapshots", "a", "control") == (" ".join(CONTROL_WORDS) + "\n").encode()
    xml = content(tree, "vm1", "snapshots", "b", "xml").decode()
    assert xml.endswith("\n") and xml.rstrip("\n") == snaps["b"].get_xml_desc().rstrip("\n")
    assert "<name>b</name>" in xml and "<parent>" in xml and "<name>a</name>" in xml
    assert domain.live_paths()["vda"] in content(tree, "vm1", "xml").decode()
    assert content(tree, "vm1", "job") == b""


def test_changes_are_loaded_then_read(tree: Tree) -> None:
    node = at(tree, "vm1", "snapshots", "b", "disks", "vda.changes")
    now = tree.reading()
    with pytest.raises(snapfs.SnapfsError) as unloaded:
        tree.content(node, now)
    assert unloaded.value.errno == errno.EIO
    trio.run(tree.load, node, now)
    extents = [json.loads(line) for line in tree.content(node, now).decode().splitlines()]
    assert extents == [{"start": 2 * CLUSTER, "length": 2 * CLUSTER, "zero": False}]
    assert tree.attributes(node, now).size == len(tree.content(node, now))


def test_gone_nodes_are_refused_with_enoent(tree: Tree, snaps) -> None:
    node = at(tree, "vm1", "snapshots", "b", "description")
    snaps["b"].deactivate(snapfs.DeactivateFlags.DISCARD)
    for call in (tree.check, tree.attributes, tree.content):
        with pytest.raises(snapfs.SnapfsError) as gone:
            call(node, tree.reading())
        assert gone.value.errno == errno.ENOENT, call
    with pytest.raises(snapfs.SnapfsError) as not_dir:
        list(tree.entries(at(tree, "vm1", "xml"), tree.reading()))
    assert not_dir.value.errno == errno.ENOTDIR
    assert tree.find(ROOT, "vm9", tree.reading()) is None


def test_write_protocol_refusals_without_a_mount(tree: Tree, domain: snapfs.Domain) -> None:
    writes = Writes(tree)
    control = at(tree, "vm1", "snapshots", "a", "control")
    description = at(tree, "vm1", "snapshots", "a", "description")

    async def scenario() -> None:
        written = writes.opened(control, truncate=True)
        with pytest.raises(snapfs.SnapfsError) as bogus:
            await writes.write(control, written, b"bogus\n")
        assert bogus.value.errno == errno.EINVAL
        assert b"Unknown control word 'bogus'" in content(tree, "vm1", "last-error")
        with pytest.raises(snapfs.SnapfsError) as again:  # one refusal per open (sysfs)
            await writes.write(control, written, b"merge\n")
        assert again.value.errno == errno.EINVAL
        text = writes.opened(description, truncate=True)
        with pytest.raises(snapfs.SnapfsError) as big:
            await writes.write(description, text, b"x" * (64 * 1024 + 2))
        assert big.value.errno == errno.EFBIG
        assert b"description: A description is at most 65536 bytes" in content(tree, "vm1", "last-error")
        await writes.release(description, text)  # refused: nothing is stored
        fine = writes.opened(description, truncate=True)
        assert await writes.write(description, fine, b"new text\n") == len(b"new text\n")
        await writes.flush(description, fine)

    trio.run(scenario)
    assert content(tree, "vm1", "snapshots", "a", "description") == b"new text\n"
    assert domain.list_snapshot_names().count("a") == 1  # no merge was done


def test_vfs_and_writes_import_no_fuse() -> None:
    code = "import sys, snapfs.vfs, snapfs.writes; print('pyfuse3' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert run.stdout.strip() == "False"
