"""One scenario per operation of DESIGN section 1, through the Python API, on real images.

The domain (conftest) has two disks: vda on a qcow2 base and vdb on a raw base. Each
stage writes distinct byte patterns with qemu-io into the live layers; after every
operation `World.check` verifies every remaining snapshot's content (qemu-img convert of
its layer), the live disk, the layer files against the metadata (no orphan, none
missing, every backing link right) and that the base images never changed.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import subprocess
import time

import pytest
from conftest import DOMAIN_NAME, DOMAIN_UUID
from helpers import (
    CLUSTER,
    MiB,
    apply_writes,
    backing_filename,
    file_digest,
    image_info,
    layout_problems,
    read_raw,
    tree_fingerprint,
    write_pattern,
    write_zeros,
)
from lxml import etree

import snapfs
from snapfs import DeactivateFlags, DependentsError, SnapfsError

TARGETS = ("vda", "vdb")


class World:
    """What every snapshot and the live disk must contain, and the checks against it."""

    def __init__(self, domain: snapfs.Domain, bases, base_digests) -> None:
        self.domain = domain
        self.bases = bases
        self.base_digests = base_digests
        self.live = {t: bases[t].content for t in TARGETS}
        self.snaps: dict[str, dict[str, bytes]] = {}
        self.next_pattern = 0x10

    def live_path(self, target: str) -> str:
        return self.domain.live_paths()[target]

    def write(self, target: str, offset: int, pattern: int | None = None) -> int:
        """One cluster into the live layer; pattern 0 writes zeros (a zero cluster)."""
        if pattern is None:
            pattern = self.next_pattern
            self.next_pattern += 1
        if pattern == 0:
            write_zeros(self.live_path(target), offset)
        else:
            write_pattern(self.live_path(target), pattern, offset)
        self.live[target] = apply_writes(self.live[target], {offset: pattern})
        return pattern

    def stage(self, *offsets: int) -> None:
        """A distinct fresh pattern at each offset, on both disks."""
        for target in TARGETS:
            for offset in offsets:
                self.write(target, offset)

    def create(self, name: str | None = None, xml: str | None = None) -> snapfs.Snapshot:
        if xml is None:
            xml = f"<domainsnapshot><name>{name}</name></domainsnapshot>"
        snap = self.domain.snapshot_create_xml(xml)
        self.snaps[snap.name] = dict(self.live)
        self.check()
        return snap

    def revert(self, name: str) -> None:
        self.domain.create_with_snapshot(self.domain.snapshot_lookup_by_name(name))
        self.live = dict(self.snaps[name])
        self.check()

    def snap(self, name: str) -> snapfs.Snapshot:
        return self.domain.snapshot_lookup_by_name(name)

    def check(self) -> None:
        assert sorted(self.domain.list_snapshot_names()) == sorted(self.snaps)
        assert self.domain.snapshot_num() == len(self.snaps)
        for name, want in self.snaps.items():
            layers = self.snap(name).layer_paths()
            assert sorted(layers) == sorted(TARGETS)
            for target in TARGETS:
                assert read_raw(layers[target]) == want[target], f"snapshot {name!r} disk {target} changed"
        for target in TARGETS:
            assert read_raw(self.live_path(target)) == self.live[target], f"live disk {target} is wrong"
        assert layout_problems(self.domain) == []
        for path, digest in self.base_digests.items():
            assert file_digest(path) == digest, f"base image {path} was written"

    def current_name(self) -> str | None:
        cur = self.domain.current_snapshot()
        return cur.name if cur else None

    def parent_name(self, name: str) -> str | None:
        parent = self.snap(name).get_parent()
        return parent.name if parent else None


@pytest.fixture
def world(domain, base_images, base_digests) -> World:
    w = World(domain, base_images, base_digests)
    w.check()
    return w


def parse_xml(text: str) -> etree._Element:
    return etree.fromstring(text.encode())


# ---- create -----------------------------------------------------------------------------


def test_create_default_name_from_empty_domainsnapshot(world):
    world.stage(0, 2 * MiB)
    before = int(time.time())
    first = world.create(xml="<domainsnapshot/>")
    second = world.create(xml="<domainsnapshot/>")
    after = int(time.time())
    for snap in (first, second):
        match = re.fullmatch(r"(\d+)(-\d+)?", snap.name)
        assert match, snap.name
        assert before <= int(match.group(1)) <= after
        created = int(parse_xml(snap.get_xml_desc()).findtext("creationTime"))
        assert int(match.group(1)) == created
    assert first.name != second.name
    assert world.parent_name(second.name) == first.name
    assert world.current_name() == second.name


def test_create_reads_only_name_description_compression(world, base_images):
    world.stage(0, CLUSTER)
    base = world.create("base")
    world.stage(CLUSTER, 3 * MiB)
    other = world.bases["vda"].path
    xml = f"""<domainsnapshot>
      <name>  full  </name>
      <description>kernel 6.1 to 6.6</description>
      <compression>gzip</compression>
      <state>running</state>
      <creationTime>1</creationTime>
      <creationdate>1970-01-01T00:00:01Z</creationdate>
      <parent><name>does-not-exist</name></parent>
      <domain><name>other</name><uuid>00000000-0000-0000-0000-000000000000</uuid></domain>
      <memory snapshot='internal'/>
      <disks><disk name='vda' snapshot='external'><source file='{other}'/></disk></disks>
    </domainsnapshot>"""
    before = int(time.time())
    snap = world.create(xml=xml)
    assert snap.name == "full"
    assert snap.get_description() == "kernel 6.1 to 6.6"
    root = parse_xml(snap.get_xml_desc())
    assert root.findtext("state") == "shutoff"
    assert int(root.findtext("creationTime")) >= before
    assert root.findtext("parent/name") == base.name
    assert root.findtext("domain/name") == DOMAIN_NAME
    assert root.findtext("domain/uuid") == DOMAIN_UUID
    assert root.findtext("compression") == "gzip"
    assert root.find("memory") is None
    for target, layer in snap.layer_paths().items():
        assert layer.startswith(os.path.dirname(world.domain.live_paths()[target]) + os.sep)
        assert image_info(layer)["format-specific"]["data"]["compression-type"] == "zlib"
        assert read_raw(layer) == world.snaps["full"][target]
    assert other not in snap.get_xml_desc()


def test_create_from_the_base_and_stacking(world):
    # A snapshot of an untouched domain is the base's content; the live disk moves on.
    s0 = world.create("empty")
    assert s0.get_parent() is None
    world.stage(0, CLUSTER, 3 * MiB + CLUSTER)
    world.write("vda", 1 * MiB, 0)  # zeros over base data
    world.write("vdb", 2 * MiB, 0)
    world.create("s1")
    world.stage(CLUSTER)
    world.create("s2")
    assert world.parent_name("s2") == "s1"
    assert world.parent_name("s1") == "empty"
    assert world.current_name() == "s2"
    # A new empty live layer: no data of its own.
    for target in TARGETS:
        mapped = json.loads(
            subprocess.run(
                ["qemu-img", "map", "-U", "--output=json", world.live_path(target)],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert all(e["depth"] > 0 for e in mapped if e["data"]), mapped


# ---- revert -----------------------------------------------------------------------------


def test_revert_and_branch(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    world.create("s2")
    world.stage(2 * MiB)  # live changes, lost by the revert
    world.revert("s1")
    assert world.current_name() == "s1"
    world.stage(3 * MiB)
    s3 = world.create("s3")
    assert s3.get_parent().name == "s1"
    assert sorted(c.name for c in world.snap("s1").list_children()) == ["s2", "s3"]
    world.stage(0)
    world.revert("s2")
    assert world.current_name() == "s2"
    world.revert("s2")  # reverting again drops live changes, idempotent otherwise
    world.revert("s3")
    assert world.current_name() == "s3"


# ---- merge ------------------------------------------------------------------------------


def test_merge_with_no_dependent(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    s2 = world.create("s2")
    world.revert("s1")
    world.stage(2 * MiB)
    layers = s2.layer_paths()
    s2.deactivate(DeactivateFlags.MERGE)
    del world.snaps["s2"]
    world.check()
    assert not any(os.path.exists(p) for p in layers.values())
    assert world.current_name() == "s1"


def test_merge_with_one_child(world):
    world.stage(0, CLUSTER)
    world.write("vda", 1 * MiB, 0)
    s1 = world.create("s1")
    world.stage(CLUSTER, 2 * MiB)  # s2 overwrites one of s1's clusters
    world.write("vdb", 0, 0)  # and zeroes another over s1's data
    s2 = world.create("s2")
    world.stage(3 * MiB)
    s2_layers = s2.layer_paths()
    s1.deactivate(DeactivateFlags.MERGE)
    del world.snaps["s1"]
    world.check()
    assert s2.get_parent() is None
    assert s2.layer_paths() == s2_layers  # paths are stable
    for target in TARGETS:
        assert backing_filename(s2_layers[target]) == world.bases[target].path
    assert world.current_name() == "s2"


def test_merge_with_the_live_disk_as_only_dependent(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    world.write("vda", 0, 0)
    world.create("s2")
    world.stage(CLUSTER, 2 * MiB)
    world.write("vdb", 1 * MiB, 0)
    world.snap("s2").deactivate(DeactivateFlags.MERGE)
    del world.snaps["s2"]
    world.check()
    assert world.current_name() == "s1"
    world.snap("s1").deactivate(DeactivateFlags.MERGE)
    del world.snaps["s1"]
    world.check()
    assert world.current_name() is None
    # The domain keeps working: snapshot again.
    world.stage(3 * MiB)
    world.create("again")


@pytest.mark.parametrize("flag", [DeactivateFlags.MERGE, DeactivateFlags.MERGE_FORCE])
def test_merge_with_two_children_and_the_live_disk(world, flag):
    """libvirt refuses this case; every child, grandchild and the live disk must stay
    byte-identical."""
    world.stage(0)
    world.create("root")
    world.stage(0, CLUSTER, 2 * MiB)
    world.write("vda", 1 * MiB, 0)  # zeros over base data
    world.write("vdb", 2 * MiB + CLUSTER, 0)
    s = world.create("s")
    world.stage(CLUSTER, 3 * MiB)
    world.write("vda", 0, 0)  # zeros over s's data
    world.create("c1")
    world.stage(2 * MiB)
    world.create("grandchild")
    world.revert("s")
    world.stage(2 * MiB, 3 * MiB + CLUSTER)
    world.create("c2")
    world.revert("s")
    world.stage(0, 1 * MiB)  # the live disk is the third dependent
    s.deactivate(flag)
    del world.snaps["s"]
    world.check()
    assert world.parent_name("c1") == "root"
    assert world.parent_name("c2") == "root"
    assert world.parent_name("grandchild") == "c1"
    assert world.current_name() == "root"
    # And again at the root: two children plus the live disk, onto the base images.
    root = world.snap("root")
    world.revert("root")
    world.stage(CLUSTER)
    root.deactivate(flag)
    del world.snaps["root"]
    world.check()
    assert world.parent_name("c1") is None and world.parent_name("c2") is None
    assert world.current_name() is None


def test_merge_of_a_compressed_snapshot_keeps_contents(world):
    world.stage(0, CLUSTER)
    world.create(xml="<domainsnapshot><name>z</name><compression>zstd</compression></domainsnapshot>")
    world.stage(CLUSTER)
    world.create("child")
    world.stage(2 * MiB)
    world.snap("z").deactivate(DeactivateFlags.MERGE)
    del world.snaps["z"]
    world.check()
    assert world.snap("child").get_xml_desc().count("<compression>none</compression>") == 1


@pytest.mark.parametrize("siblings", [0, 1])
def test_merge_keeps_the_surviving_childs_compression(world, siblings):
    """Regression: a one-dependent merge commits the child into L(S) (uncompressed) and
    moves L(S) over the child's file, so the child's own compressed clusters came back
    uncompressed (and the header's compression type reset to zlib) while its metadata
    still said zstd. A surviving child's layer must stay entirely in its own setting."""
    world.stage(0)
    world.create("s")
    for target in TARGETS:
        for i in range(8):
            world.write(target, 2 * MiB + i * CLUSTER, 0x70 + i % 2)
    child = world.create(xml="<domainsnapshot><name>child</name><compression>zstd</compression></domainsnapshot>")
    world.stage(CLUSTER)
    if siblings:
        world.revert("s")
        world.stage(3 * MiB)
        world.create("sibling")
    world.snap("s").deactivate(DeactivateFlags.MERGE)
    del world.snaps["s"]
    world.check()
    assert parse_xml(child.get_xml_desc()).findtext("compression") == "zstd"
    for path in child.layer_paths().values():
        assert image_info(path)["format-specific"]["data"]["compression-type"] == "zstd"
        extents = _data_extents(path)
        assert extents and all("offset" not in e for e in extents), extents


# ---- merge: the cheaper direction (D pulls S's data when S is much smaller) ----------------


def _stage_many(world: World, target: str, first: int, count: int) -> None:
    """`count` clusters of fresh patterns from `first` on: enough to make a layer the larger side."""
    for i in range(count):
        world.write(target, first + i * CLUSTER)


def _inodes(paths: dict[str, str]) -> dict[str, int]:
    return {target: os.stat(path).st_ino for target, path in paths.items()}


def test_merge_into_a_much_larger_child_pulls_in_place(world):
    """S (two clusters and a zero cluster over base data) under a child D that holds 40
    clusters (one over S's data, zeros over another): D pulls S's data in place, so its
    file (inode and path) stays, L(S) goes, and every snapshot, the grandchild, another
    branch on S's parent and the live disk read as before."""
    world.stage(0, 3 * MiB)
    world.create("p")
    world.stage(CLUSTER, 2 * MiB)
    world.write("vda", 1 * MiB, 0)  # zeros over the base's data
    world.write("vdb", 0, 0)  # zeros over p's data
    s = world.create("s")
    for target in TARGETS:
        _stage_many(world, target, 2 * MiB + 2 * CLUSTER, 24)
    world.write("vda", CLUSTER)  # over s's data
    world.write("vdb", 2 * MiB, 0)  # zeros over s's data
    d = world.create("d")
    world.stage(3 * MiB + CLUSTER)
    world.create("grandchild")
    world.revert("p")
    world.stage(CLUSTER, 1 * MiB)  # another branch on p, not merged
    world.create("other")
    world.revert("grandchild")
    world.stage(0)
    d_layers, s_layers = d.layer_paths(), s.layer_paths()
    inodes = _inodes(d_layers)
    s.deactivate(DeactivateFlags.MERGE)
    del world.snaps["s"]
    world.check()
    assert d.layer_paths() == d_layers and _inodes(d_layers) == inodes  # D was rebased, not replaced
    assert not any(os.path.exists(p) for p in s_layers.values())
    p_layers = world.snap("p").layer_paths()
    for target in TARGETS:
        assert backing_filename(d_layers[target]) == os.path.basename(p_layers[target])
    assert world.parent_name("d") == "p" and world.parent_name("grandchild") == "d"
    assert world.current_name() == "grandchild"
    assert "s" not in world.snap("d").get_xml_desc().split("<parent>")[1].split("</parent>")[0]


def test_merge_into_a_much_larger_live_disk_pulls_per_disk(world):
    """The live disk is S's only dependent; on vda it holds far more than S (it pulls, its
    real file stays), on vdb far less (the commit, as before: L(S)'s file takes its name).
    Then the root snapshot the same way, onto the base images (vda's raw and qcow2 bases)."""
    world.stage(0)
    world.create("root")
    world.stage(CLUSTER, 2 * MiB)
    world.write("vda", 0, 0)
    for i in range(30):
        world.write("vdb", 1 * MiB + i * CLUSTER)  # vdb's S is the large side
    s = world.create("s")
    _stage_many(world, "vda", 1 * MiB, 30)
    world.write("vda", 2 * MiB, 0)
    world.write("vdb", CLUSTER)
    live_files = {t: world.domain.core.live_file(t) for t in TARGETS}
    inodes = _inodes(live_files)
    s_inode_vdb = os.stat(s.layer_paths()["vdb"]).st_ino
    s.deactivate(DeactivateFlags.MERGE)
    del world.snaps["s"]
    world.check()
    assert {t: world.domain.core.live_file(t) for t in TARGETS} == live_files
    after = _inodes(live_files)
    assert after["vda"] == inodes["vda"]  # pulled in place
    assert after["vdb"] == s_inode_vdb  # committed: L(S)'s file took the live file's name
    assert world.current_name() == "root"
    world.snap("root").deactivate(DeactivateFlags.MERGE)
    del world.snaps["root"]
    world.check()
    for target in TARGETS:
        assert backing_filename(world.live_path(target)) == world.bases[target].path
    world.stage(3 * MiB)
    world.create("again")


# ---- discard ----------------------------------------------------------------------------


def test_discard_leaf(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    s2 = world.create("s2")
    world.revert("s1")
    world.stage(2 * MiB)
    layers = s2.layer_paths()
    s2.deactivate(DeactivateFlags.DISCARD)
    del world.snaps["s2"]
    world.check()
    assert not any(os.path.exists(p) for p in layers.values())
    with pytest.raises(SnapfsError) as info:
        s2.get_xml_desc()
    assert info.value.errno == errno.ENOENT


def test_discard_refused_with_dependents(world, store_path):
    world.stage(0)
    s1 = world.create("s1")
    world.stage(CLUSTER)
    world.create("child")
    world.revert("s1")
    world.stage(2 * MiB)
    before = tree_fingerprint(store_path)
    with pytest.raises(DependentsError) as info:
        s1.deactivate(DeactivateFlags.DISCARD)
    assert info.value.errno == errno.EBUSY
    assert "'child'" in str(info.value) and "live disk" in str(info.value)
    assert "s1" in str(info.value)
    assert tree_fingerprint(store_path) == before
    assert "s1" in world.domain.last_error()
    world.check()


def test_discard_force_subtree_without_the_live_disk(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    s2 = world.create("s2")
    world.stage(2 * MiB)
    world.create("s3")
    world.revert("s1")
    world.stage(3 * MiB)
    world.create("s4")
    world.stage(0)
    doomed = [*s2.layer_paths().values(), *world.snap("s3").layer_paths().values()]
    s2.deactivate(DeactivateFlags.DISCARD_FORCE)
    del world.snaps["s2"], world.snaps["s3"]
    world.check()  # the live disk (on s4) keeps its changes
    assert not any(os.path.exists(p) for p in doomed)
    assert world.current_name() == "s4"


def test_discard_force_subtree_with_the_live_disk(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    world.create("s2")
    world.stage(2 * MiB)
    world.create("s3")
    world.stage(3 * MiB)  # live changes inside the doomed subtree
    world.snap("s2").deactivate(DeactivateFlags.DISCARD_FORCE)
    del world.snaps["s2"], world.snaps["s3"]
    world.live = dict(world.snaps["s1"])  # reset to the state of s2's parent
    world.check()
    assert world.current_name() == "s1"
    world.stage(CLUSTER)
    world.snap("s1").deactivate(DeactivateFlags.DISCARD_FORCE)
    del world.snaps["s1"]
    world.live = {t: world.bases[t].content for t in TARGETS}  # no parent: the base
    world.check()
    assert world.current_name() is None


# ---- deactivate (no flag) -------------------------------------------------------------------


def test_deactivate_rebases_the_live_disk_onto_the_parent(world, store_path):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    world.write("vda", 1 * MiB, 0)
    s2 = world.create("s2")
    world.stage(2 * MiB)
    s2.deactivate()
    world.check()  # s2 stays, live content unchanged
    assert world.current_name() == "s1"
    assert "s2" in world.snaps
    # No-op: the live disk (on s1) does not descend from s2.
    before = tree_fingerprint(store_path)
    s2.deactivate(DeactivateFlags.NONE)
    assert tree_fingerprint(store_path) == before
    world.check()
    world.snap("s1").deactivate()
    world.check()
    assert world.current_name() is None
    # s1 can now be discarded (only s2 depends on it: refused) and s2 discarded freely.
    world.snap("s2").deactivate(DeactivateFlags.DISCARD)
    del world.snaps["s2"]
    world.snap("s1").deactivate(DeactivateFlags.DISCARD)
    del world.snaps["s1"]
    world.check()


def test_deactivate_an_ancestor_further_up(world):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    world.create("s2")
    world.stage(2 * MiB)
    world.create("s3")
    world.stage(3 * MiB)
    world.snap("s2").deactivate()  # live descends from s2 through s3
    world.check()
    assert world.current_name() == "s1"


# ---- rename, description, compression ---------------------------------------------------------


def test_rename(world):
    world.stage(0)
    s1 = world.create("s1")
    world.stage(CLUSTER)
    world.create("s2")
    world.revert("s1")
    world.stage(2 * MiB)
    world.create("s3")
    s1.rename("first")
    world.snaps["first"] = world.snaps.pop("s1")
    world.check()
    assert s1.name == "first"  # the handle survives
    assert world.parent_name("s2") == "first" and world.parent_name("s3") == "first"
    assert parse_xml(world.snap("s2").get_xml_desc()).findtext("parent/name") == "first"
    with pytest.raises(SnapfsError) as info:
        world.domain.snapshot_lookup_by_name("s1")
    assert info.value.errno == errno.ENOENT
    s1.rename("first")  # same name: nothing to do
    s1.rename("ünïcode with spaces")
    world.snaps["ünïcode with spaces"] = world.snaps.pop("first")
    world.check()
    # A renamed snapshot keeps working.
    world.revert("ünïcode with spaces")
    s1.deactivate(DeactivateFlags.MERGE)
    del world.snaps["ünïcode with spaces"]
    world.check()


def test_set_description(world):
    world.stage(0)
    snap = world.create("s1")
    snap.set_description("before the upgrade\nline two")
    assert snap.get_description() == "before the upgrade\nline two"
    assert parse_xml(snap.get_xml_desc()).findtext("description") == "before the upgrade\nline two"
    snap.set_description("a <b> & 'c' \"d\" ünï")
    assert parse_xml(snap.get_xml_desc()).findtext("description") == "a <b> & 'c' \"d\" ünï"
    snap.set_description("")
    assert snap.get_description() == ""
    assert not parse_xml(snap.get_xml_desc()).findtext("description")
    world.check()


def _data_extents(path: str) -> list[dict]:
    run = subprocess.run(["qemu-img", "map", "-U", "--output=json", path], capture_output=True, check=True)
    return [e for e in json.loads(run.stdout) if e["data"] and e["depth"] == 0]


@pytest.mark.parametrize("kind, qemu_name", [("gzip", "zlib"), ("zstd", "zstd")])
def test_set_compression(world, kind, qemu_name):
    # Compressible data: 16 clusters of one byte pattern per disk.
    for target in TARGETS:
        for i in range(16):
            world.write(target, 1 * MiB + i * CLUSTER, 0x55 + i % 3)
    snap = world.create("big")
    world.stage(0)
    world.create("child")
    world.stage(CLUSTER)
    layers = snap.layer_paths()
    sizes = {t: os.path.getsize(p) for t, p in layers.items()}
    assert all("offset" in e for t in TARGETS for e in _data_extents(layers[t]))  # not compressed yet
    snap.set_compression(kind)
    world.check()
    assert snap.layer_paths() == layers
    assert parse_xml(snap.get_xml_desc()).findtext("compression") == kind
    for target, path in layers.items():
        info = image_info(path)
        assert info["format-specific"]["data"]["compression-type"] == qemu_name
        assert os.path.getsize(path) < sizes[target] // 4, (os.path.getsize(path), sizes[target])
        extents = _data_extents(path)
        assert extents and all("offset" not in e for e in extents)  # compressed clusters
    snap.set_compression("none")
    world.check()
    assert parse_xml(snap.get_xml_desc()).findtext("compression") == "none"
    for target, path in layers.items():
        extents = _data_extents(path)
        assert extents and all("offset" in e for e in extents)
        assert os.path.getsize(path) > sizes[target] // 2


# ---- readings ---------------------------------------------------------------------------------


def test_tree_readings_and_xml(world, base_images):
    assert world.domain.current_snapshot() is None
    assert world.domain.snapshot_num() == 0 and world.domain.list_snapshot_names() == []
    world.stage(0)
    a = world.create("a")
    world.stage(CLUSTER)
    b = world.domain.snapshot_create_xml(
        "<domainsnapshot><name>b</name><description>kernel 6.1 to 6.6</description>"
        "<compression>gzip</compression></domainsnapshot>"
    )
    world.snaps["b"] = dict(world.live)
    world.revert("a")
    world.stage(2 * MiB)
    c = world.create("c")
    world.check()

    assert world.domain.snapshot_num() == 3
    names = world.domain.list_snapshot_names()
    assert sorted(names) == ["a", "b", "c"]
    times = [int(parse_xml(world.snap(n).get_xml_desc()).findtext("creationTime")) for n in names]
    assert times == sorted(times)
    assert world.domain.current_snapshot() == c
    assert a.get_parent() is None and b.get_parent() == a and c.get_parent() == a
    assert sorted(s.name for s in a.list_children()) == ["b", "c"]
    assert b.list_children() == []
    assert world.domain.snapshot_lookup_by_name("b") == b

    root = parse_xml(b.get_xml_desc())
    assert root.tag == "domainsnapshot"
    assert root.findtext("name") == "b"
    assert root.findtext("description") == "kernel 6.1 to 6.6"
    assert root.findtext("state") == "shutoff"
    epoch = int(root.findtext("creationTime"))
    assert abs(epoch - time.time()) < 120
    stamp = root.findtext("creationdate")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    parsed = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    assert int(parsed.timestamp()) == epoch
    assert root.findtext("parent/name") == "a"
    assert root.findtext("domain/name") == DOMAIN_NAME
    assert root.findtext("domain/uuid") == DOMAIN_UUID
    assert root.findtext("compression") == "gzip"
    disks = root.findall("disks/disk")
    assert [d.get("name") for d in disks] == list(TARGETS)
    layers = b.layer_paths()
    for disk in disks:
        assert disk.get("snapshot") == "external" and disk.get("type") == "file"
        assert disk.find("driver").get("type") == "qcow2"
        source = disk.find("source").get("file")
        assert source == layers[disk.get("name")] and os.path.isabs(source)
        assert read_raw(source) == world.snaps["b"][disk.get("name")]
    assert parse_xml(a.get_xml_desc()).find("parent") is None

    # The domain XML points its snapshotted disks at the live layers; the cdrom is kept.
    dom = parse_xml(world.domain.xml_desc())
    assert dom.findtext("name") == DOMAIN_NAME and dom.findtext("uuid") == DOMAIN_UUID
    sources = {
        d.find("target").get("dev"): (d.find("driver").get("type"), d.find("source").get("file"))
        for d in dom.findall("devices/disk")
        if d.get("device") == "disk"
    }
    assert sources == {t: ("qcow2", world.live_path(t)) for t in TARGETS}
    assert [d.find("target").get("dev") for d in dom.findall("devices/disk") if d.get("device") == "cdrom"] == ["sda"]
    assert world.domain.uuid() == DOMAIN_UUID
    assert world.domain.name == DOMAIN_NAME


def test_reopened_store_sees_the_same_tree(world, store_path):
    world.stage(0)
    world.create("s1")
    world.stage(CLUSTER)
    world.create("s2")
    again = snapfs.open_store(store_path).lookup_domain(DOMAIN_NAME)
    assert sorted(again.list_snapshot_names()) == ["s1", "s2"]
    assert again.current_snapshot().name == "s2"
    assert again.snapshot_lookup_by_name("s2").get_parent().name == "s1"
