"""contrib/snapfs-backup at its edges (issue 15, item 7): refusals are one sentence and a
non-zero exit, never a traceback; a restore writes a sparse file."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from fsfixtures import CLUSTER, DISK_SIZE, PYTHON, REPO, fs_fixture, write_pattern  # noqa: F401
from refusal import cli_refused

import snapfs

pytestmark = pytest.mark.timeout(300)

BACKUP = os.path.join(REPO, "contrib", "snapfs-backup")


def backup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, BACKUP, *args], capture_output=True, text=True, timeout=120)


def refused(run: subprocess.CompletedProcess, says: str) -> None:
    cli_refused(run, says, prefix="snapfs-backup: ")


@pytest.fixture
def backed_up(fs, tmp_path):
    """vm1 with two snapshots (s1 <- s2), a full backup of s1 and an incremental one of s2."""
    for target in ("vda", "vdb"):
        write_pattern(fs.live(target), 0x11, 0, 2 * CLUSTER)
    os.mkdir(fs.snap("s1"))
    for target in ("vda", "vdb"):
        write_pattern(fs.live(target), 0x22, 8 * CLUSTER, CLUSTER)
        write_pattern(fs.live(target), 0x00, 0, CLUSTER)  # zeros over data: the restore must write them
    os.mkdir(fs.snap("s2"))
    dest = str(tmp_path / "backups")
    os.makedirs(dest)
    assert backup("full", fs.mnt, "vm1", "s1", dest).returncode == 0
    assert backup("incremental", fs.mnt, "vm1", "s2", dest, "--since", "s1").returncode == 0
    return fs, dest


def test_refusals_are_one_sentence(backed_up, tmp_path):
    fs, dest = backed_up
    refused(backup("full", fs.mnt, "vm1", "nosuch", str(tmp_path / "other")), "no snapshot 'nosuch'")
    refused(backup("full", fs.mnt, "vm1", "s1", dest), "already exists")
    refused(backup("incremental", fs.mnt, "vm1", "nosuch", dest, "--since", "s1"), "no snapshot 'nosuch'")
    refused(backup("incremental", fs.mnt, "vm1", "s2", dest, "--since", "s1"), "already exists")
    refused(backup("restore", dest, "nosuch", str(tmp_path / "out")), "no backup of nosuch")
    assert not os.path.exists(tmp_path / "out"), "a refused restore made its directory"
    out = str(tmp_path / "out2")
    assert backup("restore", dest, "s1", out).returncode == 0
    refused(backup("restore", dest, "s1", out), "already exists")


def test_restore_is_sparse_and_exact(backed_up, tmp_path):
    fs, dest = backed_up
    for name in ("s1", "s2"):
        out = str(tmp_path / f"restored-{name}")
        assert backup("restore", dest, name, out).returncode == 0
        for target in ("vda", "vdb"):
            restored = os.path.join(out, f"{target}.raw")
            with open(restored, "rb") as f, open(fs.snap(name, f"disks/{target}.raw"), "rb") as want:
                assert f.read() == want.read(), f"{name}/{target} restored byte for byte"
            assert os.path.getsize(restored) == DISK_SIZE
            data_blocks = 3 * CLUSTER // 512  # the clusters that hold data (the rest is zeros)
            assert os.stat(restored).st_blocks <= data_blocks + 64, (
                f"{name}/{target}: {os.stat(restored).st_blocks} blocks, the disk is {DISK_SIZE // 512}"
            )


def data_extents(layer: str) -> list[dict]:
    """Where the image holds data, from qemu-img map of the layer through its chain."""
    run = subprocess.run(["qemu-img", "map", "--output=json", layer], capture_output=True, text=True, check=True)
    found: list[dict] = []
    for e in json.loads(run.stdout):
        if e["data"] and not e["zero"]:
            if found and found[-1]["start"] + found[-1]["length"] == e["start"]:
                found[-1]["length"] += e["length"]
            else:
                found.append({"start": e["start"], "length": e["length"]})
    return found


def joined(extents: list[dict]) -> list[dict]:
    """The extents' (start, length) with neighbours in the image joined."""
    found: list[dict] = []
    for e in extents:
        if found and found[-1]["start"] + found[-1]["length"] == e["start"]:
            found[-1]["length"] += e["length"]
        else:
            found.append({"start": e["start"], "length": e["length"]})
    return found


def assert_placed(fs, target: str, listed: list[dict], snapshot: str = "s2") -> None:
    """Every extent the .map places in a layer file holds there the bytes the .raw has."""
    with open(fs.snap(snapshot, f"disks/{target}.raw"), "rb") as raw:
        for e in listed:
            if "file" not in e:
                continue
            with open(os.path.join(fs.mnt, "vm1", "disks", e["file"]), "rb") as layer:
                layer.seek(e["offset"])
                raw.seek(e["start"])
                assert layer.read(e["length"]) == raw.read(e["length"]), f"{target}: {e}"


@pytest.fixture
def holey(fs):
    """vm1's vda with data in three places over two layers, snapshot s2 on s1; vdb untouched."""
    write_pattern(fs.live("vda"), 0x11, 0, 2 * CLUSTER)
    os.mkdir(fs.snap("s1"))
    write_pattern(fs.live("vda"), 0x22, 8 * CLUSTER, CLUSTER)
    write_pattern(fs.live("vda"), 0x33, 30 * CLUSTER, 3 * CLUSTER)
    os.mkdir(fs.snap("s2"))
    domain = snapfs.Store(snapfs.api.open_store_core(fs.store)).lookup_domain("vm1")
    return fs, {t: domain.snapshot_lookup_by_name("s2").layer_paths()[t] for t in ("vda", "vdb")}


def test_a_raw_shows_its_data_as_blocks_and_a_map_lists_it(holey):
    fs, layers = holey
    disks = fs.snap("s2", "disks")
    assert sorted(os.listdir(disks)) == [f"{t}{s}" for t in ("vda", "vdb") for s in (".changes", ".map", ".raw")]
    for target, layer in layers.items():
        with open(os.path.join(disks, f"{target}.map")) as f:
            listed = [json.loads(line) for line in f]
        assert joined(listed) == data_extents(layer)
        assert_placed(fs, target, listed)
        data = sum(e["length"] for e in listed)
        raw = os.path.join(disks, f"{target}.raw")
        assert os.stat(raw).st_size == DISK_SIZE
        assert os.stat(raw).st_blocks * 512 == data
        du = subprocess.run(["du", "-B1", raw], capture_output=True, text=True, check=True).stdout.split()[0]
        assert int(du) == data, f"du of {target}.raw"
    assert sum(e["length"] for e in data_extents(layers["vda"])) == 6 * CLUSTER


# Runs the script counting the bytes it reads from the mount's .raw files and those it
# copies from layer files (printed: "RAW LAYER").
COUNTING = """
import atexit, os, runpy, sys
real, real_copy, read = os.preadv, os.copy_file_range, [0, 0]
def preadv(fd, buffers, offset):
    count = real(fd, buffers, offset)
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".raw") and "/snapshots/" in os.readlink(f"/proc/self/fd/{fd}"):
        read[0] += count
    elif os.readlink(f"/proc/self/fd/{fd}").endswith(".qcow2"):
        read[1] += count
    return count
def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
    count = real_copy(src, dst, count, offset_src, offset_dst)
    read[1] += count
    return count
os.preadv, os.copy_file_range = preadv, copy_file_range
atexit.register(lambda: print(read[0], read[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_backup_reads_only_the_data_and_restores_a_sparse_file(holey, tmp_path):
    fs, layers = holey
    dest = str(tmp_path / "backups")
    run = subprocess.run([PYTHON, "-c", COUNTING, BACKUP, "full", fs.mnt, "vm1", "s2", dest], capture_output=True)
    assert run.returncode == 0, run.stderr
    data = sum(e["length"] for layer in layers.values() for e in data_extents(layer))
    listed = []
    for target in layers:
        with open(fs.snap("s2", f"disks/{target}.map")) as f:
            listed += [json.loads(line) for line in f]
    placed = sum(e["length"] for e in listed if "file" in e)
    assert placed >= 6 * CLUSTER, "what vm1 wrote lies in its layer files"
    through_raw, from_layers = map(int, run.stdout.split()[-2:])
    assert (through_raw, from_layers) == (data - placed, placed), "(through the .raw: the base image's, from layers)"
    out = str(tmp_path / "out")
    assert backup("restore", dest, "s2", out).returncode == 0
    for target, layer in layers.items():
        restored = os.path.join(out, f"{target}.raw")
        with open(restored, "rb") as f, open(fs.snap("s2", f"disks/{target}.raw"), "rb") as want:
            assert f.read() == want.read()
        assert os.path.getsize(restored) == DISK_SIZE
        assert os.stat(restored).st_blocks * 512 <= sum(e["length"] for e in data_extents(layer)) + 64 * 512
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", restored, layer], capture_output=True
        )
        assert compare.returncode == 0, compare.stdout


# Runs the script on a kernel that cannot copy between the files (EXDEV, as across
# filesystems before Linux 5.19).
NO_COPY_RANGE = """
import errno, os, runpy, sys
def copy_file_range(*args):
    raise OSError(errno.EXDEV, "Invalid cross-device link")
os.copy_file_range = copy_file_range
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_backup_reads_the_layer_files_without_copy_file_range(holey, tmp_path):
    fs, layers = holey
    dest, out = str(tmp_path / "backups"), str(tmp_path / "out")
    run = subprocess.run([PYTHON, "-c", NO_COPY_RANGE, BACKUP, "full", fs.mnt, "vm1", "s2", dest], capture_output=True)
    assert run.returncode == 0, run.stderr
    assert backup("restore", dest, "s2", out).returncode == 0
    for target, layer in layers.items():
        restored = os.path.join(out, f"{target}.raw")
        with open(restored, "rb") as f, open(fs.snap("s2", f"disks/{target}.raw"), "rb") as want:
            assert f.read() == want.read(), target
        assert os.stat(restored).st_blocks * 512 <= sum(e["length"] for e in data_extents(layer)) + 64 * 512


def test_a_full_backup_reads_compressed_data_through_the_raw(holey, tmp_path):
    """s1 recompressed: its clusters have no offset in a file, so the .map places only s2's
    own data in a layer file; the backup reads the rest through the .raw, and the restore
    holds every pattern where it was written."""
    fs, layers = holey
    with open(fs.snap("s1", "compression"), "w") as f:
        f.write("zstd\n")
    with open(fs.snap("s2", "disks/vda.map")) as f:
        listed = [json.loads(line) for line in f]
    assert joined(listed) == data_extents(layers["vda"])
    assert [e["start"] for e in listed if "file" in e] == [8 * CLUSTER, 30 * CLUSTER], "only s2's own clusters"
    assert_placed(fs, "vda", listed)
    dest, out = str(tmp_path / "backups"), str(tmp_path / "out")
    run = subprocess.run([PYTHON, "-c", COUNTING, BACKUP, "full", fs.mnt, "vm1", "s2", dest], capture_output=True)
    assert run.returncode == 0, run.stderr
    data = sum(e["length"] for layer in layers.values() for e in data_extents(layer))
    through_raw, from_layers = map(int, run.stdout.split()[-2:])
    assert (through_raw, from_layers) == (data - 4 * CLUSTER, 4 * CLUSTER), "(s1's and the base's, s2's own)"
    assert backup("restore", dest, "s2", out).returncode == 0
    restored = os.path.join(out, "vda.raw")
    with open(restored, "rb") as f:
        for pattern, start, length in (
            (0x11, 0, 2 * CLUSTER),
            (0x22, 8 * CLUSTER, CLUSTER),
            (0x33, 30 * CLUSTER, 3 * CLUSTER),
        ):
            f.seek(start)
            assert f.read(length) == bytes([pattern]) * length, f"pattern {pattern:#x} at {start}"
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", restored, layers["vda"]], capture_output=True
    )
    assert compare.returncode == 0, compare.stdout
