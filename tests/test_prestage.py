"""Pre-staged overlays (issue 16, snapfs/prestage.py): after a change, each disk's next live
layer is made ahead in `staged/<target>.qcow2`; a create renames it into place instead of
running qemu-img. A stale or damaged one is never used; a crash while one is made loses
nothing and leaves nothing behind after the next change; nothing a user sees shows it."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from factory import new_domain
from failfixtures import assert_store_clean
from fsfixtures import Mount
from helpers import SNAPFS, backing_filename, image_info, read_raw, store_integrity_problems, write_pattern

import snapfs
from snapfs import prestage

TARGETS = ("vda", "vdb")


def domain_dir(domain: snapfs.Domain, root: str) -> str:
    return os.path.join(root, "domains", domain.name)


def staged(root: str, target: str) -> str:
    return os.path.join(root, "domains", "vm1", "staged", f"{target}.qcow2")


def settled(root: str) -> None:
    """Wait for this process's pre-staging of vm1 (it runs in a thread after each change)."""
    prestage.wait_now(os.path.join(root, "domains", "vm1"))


def header_backing(path: str) -> str | None:
    """The backing name in a qcow2 header (None while the file is missing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return None
    offset, length = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
    return head[offset : offset + length].decode()


@pytest.fixture
def made(tmp_path) -> tuple[snapfs.Domain, str]:
    domain = new_domain(str(tmp_path))
    root = str(tmp_path / "store")
    settled(root)
    return domain, root


def create(domain: snapfs.Domain, name: str) -> snapfs.Snapshot:
    return domain.snapshot_create_xml(f"<domainsnapshot><name>{name}</name></domainsnapshot>")


def test_the_next_live_layer_is_made_ahead_and_taken_by_a_create(made):
    domain, root = made
    for target in TARGETS:  # made right after define, on the live file's name
        assert backing_filename(staged(root, target)) == os.path.basename(domain.live_layer_paths()[target])
    inodes = {t: os.stat(staged(root, t)).st_ino for t in TARGETS}
    write_pattern(domain.live_paths()["vda"], 0xC1, 0)
    snap = create(domain, "s1")
    for target in TARGETS:
        assert os.stat(domain.live_layer_paths()[target]).st_ino == inodes[target], "renamed, not made again"
    settled(root)
    for target in TARGETS:
        assert backing_filename(staged(root, target)) == os.path.basename(domain.live_layer_paths()[target])
    assert read_raw(domain.live_paths()["vda"]) == read_raw(snap.layer_paths()["vda"])
    assert store_integrity_problems(root, "vm1") == []


def test_a_revert_makes_its_own_and_a_stale_one_is_replaced(made):
    domain, root = made
    s1 = create(domain, "s1")
    create(domain, "s2")
    settled(root)
    stale = backing_filename(staged(root, "vda"))
    domain.create_with_snapshot(s1)
    settled(root)
    live = os.path.basename(domain.live_layer_paths()["vda"])
    assert stale != live and backing_filename(staged(root, "vda")) == live
    assert backing_filename(domain.live_layer_paths()["vda"]) == os.path.basename(s1.layer_paths()["vda"])
    assert store_integrity_problems(root, "vm1") == []


def _written(path: str) -> None:
    image = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": None})
    subprocess.run(["qemu-io", "-c", "write -P 0xee 0 64k", "json:" + image], check=True, capture_output=True)


def _truncated(path: str) -> None:
    os.truncate(path, 4096)


def _resized(path: str) -> None:
    """As one made before the disk's size changed: right backing, another size."""
    size = image_info(path)["virtual-size"] + (1 << 20)
    backing = backing_filename(path)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", path, str(size)], check=True
    )


def _linked(path: str) -> None:
    os.link(path, path + ".second-name")


def _garbage(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 512)


@pytest.mark.parametrize("damage", [_written, _truncated, _resized, _linked, _garbage])
def test_a_damaged_staged_overlay_is_never_used(made, damage):
    """Written to, torn, the wrong size, a second name, a broken header: the create makes
    its own overlay, the new live disk reads exactly as the snapshot, and the next
    pre-staging replaces the bad one."""
    domain, root = made
    bad = staged(root, "vda")
    damage(bad)
    inode = os.stat(bad).st_ino
    snap = create(domain, "s1")
    live = domain.live_layer_paths()["vda"]
    assert os.stat(live).st_ino != inode
    assert read_raw(domain.live_paths()["vda"]) == read_raw(snap.layer_paths()["vda"])
    assert image_info(live)["virtual-size"] == image_info(snap.layer_paths()["vda"])["virtual-size"]
    if os.path.exists(bad + ".second-name"):
        os.unlink(bad + ".second-name")
    settled(root)
    assert backing_filename(staged(root, "vda")) == os.path.basename(live)
    assert store_integrity_problems(root, "vm1") == []


@pytest.mark.parametrize("point", ["prestage:vda:built", "prestage:vda:staged"])
def test_a_crash_while_pre_staging_loses_nothing(made, point):
    """The command line pre-stages before it exits; killed there, the create it made is whole,
    and the next change removes a half-made one (or takes a whole one) and leaves the store clean."""
    domain, root = made
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")} | {"SNAPFS_CRASH_AT": point}
    os.unlink(staged(root, "vda"))  # so the command line's own pre-staging makes one
    run = subprocess.run([SNAPFS, "--store", root, "snapshot-create-as", "vm1", "s1"], env=env, capture_output=True)
    assert run.returncode == 86, run.stderr
    reopened = snapfs.open_store(root).lookup_domain("vm1")
    s1 = reopened.snapshot_lookup_by_name("s1")
    assert reopened.current_snapshot().name == "s1"
    part = staged(root, "vda") + ".part"
    assert os.path.exists(part) == (point == "prestage:vda:built")
    s2 = create(reopened, "s2")
    settled(root)
    assert not os.path.exists(part)
    assert read_raw(s2.layer_paths()["vda"]) == read_raw(s1.layer_paths()["vda"])
    assert store_integrity_problems(root, "vm1") == []
    assert_store_clean(root)


def test_users_never_see_it(made, tmp_path):
    """Not a layer in the mount's disks/, not a leftover or a problem in `snapfs list`; a
    mkdir through the mount takes the overlay the daemon made ahead after the last change."""
    domain, root = made
    create(domain, "s1")
    settled(root)
    listed = subprocess.run([SNAPFS, "--store", root, "list"], capture_output=True, text=True, check=True).stdout
    assert "staged" not in listed and "unfinished" not in listed and "broken" not in listed
    mount = Mount(root, str(tmp_path / "mnt")).start()
    try:
        names = set(os.listdir(os.path.join(mount.path, "vm1", "disks")))
        assert not {"staged", *(os.path.basename(staged(root, t)) for t in TARGETS)} & names
        assert {os.path.basename(p) for p in domain.live_layer_paths().values()} <= names
        for name in ("m1", "m2"):
            inode = os.stat(staged(root, "vda")).st_ino
            os.mkdir(os.path.join(mount.path, "vm1", "snapshots", name))
            assert os.stat(domain.live_layer_paths()["vda"]).st_ino == inode
            live = os.path.basename(domain.live_layer_paths()["vda"])
            deadline = time.monotonic() + 30
            while header_backing(staged(root, "vda")) != live:  # the daemon's thread, after the mkdir
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        mount.stop()
    assert store_integrity_problems(root, "vm1") == []


def test_off_with_snapfs_prestage_0(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPFS_PRESTAGE", "0")
    domain = new_domain(str(tmp_path))
    create(domain, "s1")
    root = str(tmp_path / "store")
    settled(root)
    assert not os.path.exists(os.path.join(root, "domains", "vm1", "staged"))
