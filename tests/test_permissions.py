"""Who may use a mount (DESIGN section 2), tested with a real second uid (nobody, 65534).

Without --allow-other only the mounting user (root here) gets in; with it, the file modes
are enforced by the kernel (default_permissions): xml and state are read-only for all,
control, description and compression writable by the owner only, and snapshots/ takes
mkdir from the owner only. Refused attempts leave the store as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
from fsfixtures import Mount, define_store
from helpers import tree_fingerprint

import snapfs

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount and to switch to uid 65534"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

OTHER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*OTHER, "bash", "-c", script, "bash", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "LC_ALL": "C"},
    )


@pytest.fixture
def store(tmp_path):
    setup = define_store(str(tmp_path))
    domain = snapfs.open_store(setup.root).lookup_domain("vm1")
    domain.snapshot_create_xml("<domainsnapshot><name>s1</name><description>first</description></domainsnapshot>")
    return setup.root


@pytest.fixture
def mountpoint():
    # Under a directory nobody can traverse (pytest's tmp is 0700), only a FUSE refusal is tested.
    parent = tempfile.mkdtemp(prefix="snapfs-perm-")
    os.chmod(parent, 0o755)
    path = os.path.join(parent, "mnt")
    os.mkdir(path)
    yield path
    if os.path.ismount(path) or not os.path.exists(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    shutil.rmtree(parent, ignore_errors=True)


def mount(store: str, path: str, allow_other: bool) -> Mount:
    return Mount(store, path, options=("--allow-other",) if allow_other else ()).start()


def test_without_allow_other_another_uid_cannot_get_in(store, mountpoint):
    mounted = mount(store, mountpoint, allow_other=False)
    before = tree_fingerprint(store)
    try:
        assert sorted(os.listdir(mountpoint)) == ["vm1", "vm2"]  # root, the mounter, can
        for script in (
            'ls "$1"',
            'cat "$1"/vm1/xml',
            'stat "$1"/vm1',
            'mkdir "$1"/vm1/snapshots/x',
            'echo merge > "$1"/vm1/snapshots/s1/control',
        ):
            run = as_nobody(script, mountpoint)
            assert run.returncode != 0, f"uid 65534 ran {script!r}: {run.stdout}"
            assert "Permission denied" in run.stderr, run.stderr
    finally:
        assert mounted.stop() == 0, mounted.log()
    assert tree_fingerprint(store) == before


def test_with_allow_other_modes_are_enforced(store, mountpoint):
    mounted = mount(store, mountpoint, allow_other=True)
    snap = os.path.join(mountpoint, "vm1", "snapshots", "s1")
    before = tree_fingerprint(store)
    try:
        # Another uid reads everything readable...
        run = as_nobody(
            'cat "$1"/vm1/xml "$2"/xml "$2"/state "$2"/description && ls -lR "$1" > /dev/null', mountpoint, snap
        )
        assert run.returncode == 0, run.stderr
        assert "<domainsnapshot>" in run.stdout and "shutoff" in run.stdout and "first" in run.stdout
        # ...and writes nothing.
        for script in (
            'echo merge > "$1"/control',
            'echo revert > "$1"/control',
            'echo other > "$1"/description',
            'echo zstd > "$1"/compression',
            'echo x > "$1"/xml',
            'echo x > "$1"/state',
            'mkdir "$1"/../x',
            'rmdir "$1"',
            'mv "$1" "$1"/../renamed',
        ):
            run = as_nobody(script, snap)
            assert run.returncode != 0, f"uid 65534 ran {script!r}"
            assert "Permission denied" in run.stderr or "Operation not permitted" in run.stderr, (script, run.stderr)
        assert tree_fingerprint(store) == before
        # The owner may write what is writable, and not what is read-only.
        with open(os.path.join(snap, "description"), "w") as f:
            f.write("second\n")
        with open(os.path.join(snap, "description")) as f:
            assert f.read() == "second\n"
        for name in ("xml", "state"):
            with pytest.raises(PermissionError):
                open(os.path.join(snap, name), "w").close()
    finally:
        assert mounted.stop() == 0, mounted.log()
