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
import sys
import tempfile
import time

import pytest
from helpers import tree_fingerprint

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount and to switch to uid 65534"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    from fsfixtures import core_call, define_store

    setup = define_store(str(tmp_path))
    made = core_call(setup.root, "await store.domain('vm1').create('s1', 'first')")
    assert made.returncode == 0, made.stderr
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


def mount(store: str, path: str, allow_other: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "snapfs.mount", store, path, "--foreground"]
    proc = subprocess.Popen(
        args + (["--allow-other"] if allow_other else []),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while not os.path.ismount(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the mount did not come up: {proc.communicate()[0]!r}")
        time.sleep(0.05)
    return proc


def unmount(proc: subprocess.Popen, path: str) -> int:
    subprocess.run(["fusermount3", "-u", path], capture_output=True)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def test_without_allow_other_another_uid_cannot_get_in(store, mountpoint):
    proc = mount(store, mountpoint, allow_other=False)
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
        assert unmount(proc, mountpoint) == 0
    assert tree_fingerprint(store) == before


def test_with_allow_other_modes_are_enforced(store, mountpoint):
    proc = mount(store, mountpoint, allow_other=True)
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
        assert unmount(proc, mountpoint) == 0
