"""The layer naming of DESIGN section 8: every layer is a real file that keeps its name from
birth to deletion, and a disk's live layer has a stable name, layers/<t>/live.qcow2, a
relative symlink to its real file. qemu-img works on the mount's disks/<t> and on every
path an XML names; a create renames nothing; an old store (live.qcow2 a regular file) is
carried over on open, safely at every point; `snapfs mount` never makes a store."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from factory import new_domain
from fsfixtures import Mount, unmount_and_wait
from helpers import CLUSTER, DISK_SIZE, SNAPFS, expected_content, layout_problems, read_raw, write_pattern

import snapfs

pytestmark = pytest.mark.timeout(300)

TARGETS = ("vda", "vdb")
BASE = {"vda": {0: 0xA1}, "vdb": {0: 0xB1}}  # factory.SIMPLE_WRITES


class Tracker:
    """A two-disk domain driven through the API, with what each disk must hold."""

    def __init__(self, domain: snapfs.Domain) -> None:
        self.domain = domain
        self.live = {t: dict(BASE[t]) for t in TARGETS}
        self.snaps: dict[str, dict] = {}
        self.pattern = 0x10

    def write(self, *clusters: int) -> None:
        for target in TARGETS:
            for cluster in clusters:
                write_pattern(self.domain.live_paths()[target], self.pattern, cluster * CLUSTER)
                self.live[target][cluster * CLUSTER] = self.pattern
                self.pattern += 1

    def create(self, name: str) -> None:
        self.domain.snapshot_create_xml(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
        self.snaps[name] = {t: dict(w) for t, w in self.live.items()}

    def revert(self, name: str) -> None:
        self.domain.create_with_snapshot(self.domain.snapshot_lookup_by_name(name))
        self.live = {t: dict(w) for t, w in self.snaps[name].items()}

    def merge(self, name: str) -> None:
        self.domain.snapshot_lookup_by_name(name).deactivate(snapfs.DeactivateFlags.MERGE)
        del self.snaps[name]


def all_snapshots(domain: snapfs.Domain) -> list:
    return [domain.snapshot_lookup_by_name(name) for name in domain.list_snapshot_names()]


def qemu_img_problems(path: str, want: bytes, scratch: str) -> list[str]:
    """info --backing-chain, check, convert -O raw (compared with `want`) and compare
    against a raw image of `want`, all on `path` exactly as given (never resolved)."""
    problems = []
    for args in (["info", "--backing-chain", "--output=json"], ["check"]):
        run = subprocess.run(["qemu-img", *args, "-U", path], capture_output=True, text=True)
        if run.returncode != 0:
            problems.append(f"qemu-img {args[0]} {path}: {run.stderr.strip()}")
    out = os.path.join(scratch, "out.raw")
    run = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, out], capture_output=True, text=True)
    if run.returncode != 0:
        problems.append(f"qemu-img convert {path}: {run.stderr.strip()}")
    else:
        with open(out, "rb") as f:
            if f.read() != want:
                problems.append(f"qemu-img convert {path}: wrong content")
        with open(out, "wb") as f:
            f.write(want)
        run = subprocess.run(["qemu-img", "compare", "-U", "-F", "raw", path, out], capture_output=True, text=True)
        if run.returncode != 0:
            problems.append(f"qemu-img compare {path}: {run.stdout.strip()} {run.stderr.strip()}")
    return problems


def source_files(text: str) -> dict[str, str]:
    """{target: source file} of the disks an XML document names."""
    found = re.findall(r"<disk\b[^>]*>.*?</disk>", text, re.S)
    files = {}
    for disk in found:
        target = re.search(r"<target dev=['\"]([^'\"]+)", disk) or re.search(r"name=['\"]([^'\"]+)", disk)
        source = re.search(r"<source file=['\"]([^'\"]+)", disk)
        if target and source:
            files[target.group(1)] = source.group(1)
    return files


def everything_problems(t: Tracker, mnt: str, scratch: str) -> list[str]:
    """qemu-img on MNT/vm1/disks/<t>, on the domain XML's paths and on every snapshot XML's
    paths (read through the mount), each against the content it must have."""
    problems = []
    for target in TARGETS:
        want = expected_content(t.live[target], DISK_SIZE)
        problems += qemu_img_problems(os.path.join(mnt, "vm1", "disks", target), want, scratch)
    with open(os.path.join(mnt, "vm1", "xml")) as f:
        named = source_files(f.read())
    assert sorted(named) == sorted(TARGETS), named
    for target, path in named.items():
        problems += qemu_img_problems(path, expected_content(t.live[target], DISK_SIZE), scratch)
    for name, content in t.snaps.items():
        with open(os.path.join(mnt, "vm1", "snapshots", name, "xml")) as f:
            named = {k: v for k, v in source_files(f.read()).items() if k in TARGETS and v.endswith(".qcow2")}
        assert sorted(named) == sorted(TARGETS), named
        for target, path in named.items():
            problems += qemu_img_problems(path, expected_content(content[target], DISK_SIZE), scratch)
    return problems + layout_problems(t.domain)


def test_qemu_img_on_the_mounts_disks_and_every_xml_path(tmp_path):
    domain = new_domain(str(tmp_path))
    t = Tracker(domain)
    mount = Mount(str(tmp_path / "store"), str(tmp_path / "mnt")).start()
    scratch = str(tmp_path)
    try:
        assert everything_problems(t, mount.path, scratch) == []
        t.write(1, 2)
        t.create("a")
        t.write(2, 3)
        t.create("b")
        t.write(3, 4)
        t.create("c")
        t.write(4, 5)
        assert everything_problems(t, mount.path, scratch) == []
        t.merge("c")  # one dependent: the live disk
        assert everything_problems(t, mount.path, scratch) == []
        t.merge("a")  # one dependent: the child b
        assert everything_problems(t, mount.path, scratch) == []
        t.revert("b")
        t.write(6)
        t.create("d")
        t.revert("b")
        t.write(7)
        t.create("e")
        t.write(8)
        assert everything_problems(t, mount.path, scratch) == []
        t.merge("b")  # two dependents: d and e
        assert everything_problems(t, mount.path, scratch) == []
        t.revert("d")
        assert everything_problems(t, mount.path, scratch) == []
        listed = sorted(os.listdir(os.path.join(mount.path, "vm1", "disks")))
        real = {os.path.basename(p) for p in domain.live_layer_paths().values()}
        real |= {os.path.basename(p) for s in all_snapshots(domain) for p in s.layer_paths().values()}
        assert listed == sorted(["vda", "vdb", *real])
    finally:
        mount.stop()


def real_files(domain: snapfs.Domain) -> dict[tuple[int, int], str]:
    """(dev, inode) -> path of every regular file in the disks' layer directories."""
    found = {}
    for live in domain.live_paths().values():
        directory = os.path.dirname(live)
        for name in os.listdir(directory):
            st = os.lstat(os.path.join(directory, name))
            if not os.path.islink(os.path.join(directory, name)):
                found[(st.st_dev, st.st_ino)] = os.path.join(directory, name)
    return found


def test_a_create_or_a_revert_renames_no_layer_file(tmp_path):
    domain = new_domain(str(tmp_path))
    t = Tracker(domain)
    t.write(1)
    for step in ("s1", "s2", "revert s1", "s3"):
        before = real_files(domain)
        live_before = {tg: os.stat(p) for tg, p in domain.live_paths().items()}  # through the symlink
        if step.startswith("revert"):
            t.revert(step.split()[1])
        else:
            t.create(step)
            snap = domain.snapshot_lookup_by_name(step)
            for target, layer in snap.layer_paths().items():
                assert os.path.samestat(os.lstat(layer), live_before[target]), "the live file IS L(S)"
        after = real_files(domain)
        for inode, path in before.items():
            assert after.get(inode, path) == path, f"{path} was renamed to {after[inode]}"
        assert layout_problems(domain) == []


# ---- carrying an old store over -----------------------------------------------------------
def make_old_layout(root: str, domain: snapfs.Domain) -> None:
    """Turn a domain into what the code before DESIGN section 8 made: live.qcow2 the live
    layer's regular file, L(S) at <id>.qcow2 with <id>.qcow2 backing links, no `layers` in
    the records and no `live` in the state."""
    path = os.path.join(root, "domains", domain.name)
    snaps = all_snapshots(domain)
    renames = {}
    for target, real in domain.live_layer_paths().items():
        renames[real] = os.path.join(os.path.dirname(real), "live.qcow2")
        for snap in snaps:
            layer = snap.layer_paths()[target]
            renames[layer] = os.path.join(os.path.dirname(layer), f"{snap.id}.qcow2")
    for src, dst in renames.items():
        os.rename(src, dst)
    for snap in snaps:
        parent = snap.get_parent()
        if parent is not None:
            for target in TARGETS:
                layer = os.path.join(path, "layers", target, f"{snap.id}.qcow2")
                rebase_unsafe(layer, f"{parent.id}.qcow2")
    current = domain.current_snapshot()
    if current is not None:
        for target in TARGETS:
            rebase_unsafe(os.path.join(path, "layers", target, "live.qcow2"), f"{current.id}.qcow2")
    for name in os.listdir(os.path.join(path, "snapshots")):
        edit_json(os.path.join(path, "snapshots", name), lambda d: d.pop("layers", None))
    edit_json(os.path.join(path, "state.json"), lambda d: d.pop("live"))


def rebase_unsafe(layer: str, backing: str) -> None:
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", backing, layer], check=True)


def edit_json(path: str, change) -> None:
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def contents(domain: snapfs.Domain) -> dict:
    got = {("live", t): read_raw(p) for t, p in domain.live_paths().items()}
    for snap in all_snapshots(domain):
        got.update({(snap.name, t): read_raw(p) for t, p in snap.layer_paths().items()})
    return got


@pytest.fixture(scope="module")
def old_store(tmp_path_factory):
    """An old-layout store (vm1: a -> b, live on b with unsaved writes) and the content of
    every disk, made once."""
    directory = str(tmp_path_factory.mktemp("old"))
    domain = new_domain(directory)
    t = Tracker(domain)
    t.write(1)
    t.create("a")
    t.write(2)
    t.create("b")
    t.write(3)
    want = contents(domain)
    root = os.path.join(directory, "store")
    make_old_layout(root, domain)
    return root, want


CARRY_OVER_POINTS = ["state", "vda:link", "vda:symlink", "vda:done", "vdb:link", "vdb:symlink"]


@pytest.mark.parametrize("crash", [None, *CARRY_OVER_POINTS])
def test_an_old_store_is_carried_over_on_open(tmp_path, old_store, crash):
    template, want = old_store
    root = str(tmp_path / "store")
    shutil.copytree(template, root, symlinks=True)
    layers = os.path.join(root, "domains", "vm1", "layers")
    inodes = {t: os.lstat(os.path.join(layers, t, "live.qcow2")).st_ino for t in TARGETS}
    assert not any(os.path.islink(os.path.join(layers, t, "live.qcow2")) for t in TARGETS)
    if crash:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
        env["SNAPFS_CRASH_AT"] = f"carry-over:{crash}"
        run = subprocess.run([SNAPFS, "--store", root, "list"], env=env, capture_output=True, text=True)
        assert run.returncode == 86, run.stderr
    domain = snapfs.open_store(root).lookup_domain("vm1")
    assert layout_problems(domain) == []
    assert contents(domain) == want
    for target, real in domain.live_layer_paths().items():
        assert os.lstat(real).st_ino == inodes[target], "the live file itself, not a copy"
        assert os.readlink(domain.live_paths()[target]) == os.path.basename(real)
    with open(os.path.join(root, "domains", "vm1", "state.json")) as f:
        assert sorted(json.load(f)["live"]) == sorted(TARGETS)
    assert sorted(os.listdir(os.path.join(root, "domains", "vm1"))) == sorted(
        {"domain.json", "domain.xml", "state.json", "snapshots", "layers", "lock"}
        | ({"last-error", "staged"} & set(os.listdir(os.path.join(root, "domains", "vm1"))))
    )
    domain.snapshot_create_xml("<domainsnapshot><name>c</name></domainsnapshot>")  # and it works on
    domain.snapshot_lookup_by_name("a").deactivate(snapfs.DeactivateFlags.MERGE)
    assert layout_problems(domain) == []
    assert read_raw(domain.live_paths()["vda"]) == want[("live", "vda")]


def test_an_old_store_whose_live_disk_is_in_use_waits(tmp_path, old_store):
    template, _ = old_store
    root = str(tmp_path / "store")
    shutil.copytree(template, root, symlinks=True)
    live = os.path.join(root, "domains", "vm1", "layers", "vda", "live.qcow2")
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", live], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()
        store = snapfs.open_store(root)
        assert not os.path.islink(live)
        domain = store.lookup_domain("vm1")
        assert "in use" in domain.last_error()
        with pytest.raises(snapfs.SnapfsError) as caught:
            domain.snapshot_create_xml("<domainsnapshot/>")
        assert caught.value.errno == 16
    finally:
        holder.communicate(b"quit\n", timeout=10)
    domain.snapshot_create_xml("<domainsnapshot><name>c</name></domainsnapshot>")
    assert os.path.islink(live)
    assert layout_problems(domain) == []


# ---- snapfs mount never makes a store ------------------------------------------------------
@pytest.mark.parametrize("kind", ["empty", "other files"])
def test_mount_on_a_path_that_is_not_a_store_is_refused(tmp_path, kind):
    root = tmp_path / "notastore"
    root.mkdir()
    if kind == "other files":
        (root / "notes.txt").write_text("mine\n")
    before = sorted(os.listdir(root))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    command = [SNAPFS, "--store", str(root), "mount", str(mnt), "--foreground"]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:  # it mounted and serves: unmount it, then fail
        unmount_and_wait(str(mnt))
        pytest.fail(f"snapfs mount served {root}, which is not a store")
    assert run.returncode != 0
    assert "no snapfs store" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert sorted(os.listdir(root)) == before
    assert not os.path.ismount(mnt)
