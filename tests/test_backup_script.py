"""contrib/snapfs-backup at its edges (issue 15, item 7): refusals are one sentence and a
non-zero exit, never a traceback; a restore writes a sparse file."""

from __future__ import annotations

import os
import subprocess

import pytest
from fsfixtures import CLUSTER, DISK_SIZE, PYTHON, REPO, fs_fixture, write_pattern  # noqa: F401

pytestmark = pytest.mark.timeout(300)

BACKUP = os.path.join(REPO, "contrib", "snapfs-backup")


def backup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, BACKUP, *args], capture_output=True, text=True, timeout=120)


def refused(run: subprocess.CompletedProcess, says: str) -> None:
    assert run.returncode != 0, run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs-backup: "), run.stderr
    assert "Traceback" not in run.stderr and says in lines[0], lines[0]


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
