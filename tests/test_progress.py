"""Progress of long work: the domain's job file, and the CLI's line on a terminal."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest
from fsfixtures import Mount
from helpers import SNAPFS, make_image, write_pattern


def slow_qemu_img(tmp_path) -> str:
    """qemu-img that pauses 2 s before a commit, so a merge is still running when read."""
    wrapper = tmp_path / "qemu-img"
    wrapper.write_text('#!/bin/sh\n[ "$1" = commit ] && sleep 2\nexec qemu-img "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def domain_with_merge(tmp_path) -> str:
    store = str(tmp_path / "store")
    disk = make_image(str(tmp_path / "d.qcow2"), "qcow2", 16 << 20)
    subprocess.run(
        [SNAPFS, "--store", store, "define", "--name", "vm1", "--disk", f"vda={disk}"], check=True, capture_output=True
    )
    live = os.path.join(store, "domains", "vm1", "layers", "vda", "live.qcow2")
    write_pattern(live, 0x11, 0, 8 << 20)
    subprocess.run([SNAPFS, "--store", store, "snapshot-create-as", "vm1", "s"], check=True, capture_output=True)
    write_pattern(live, 0x22, 0, 8 << 20)
    return store


def watch_merge(tmp_path, store: str, job: str) -> tuple[str, subprocess.CompletedProcess]:
    """Run a (slowed) CLI merge of s and return the first job line read from `job`."""
    env = {**os.environ, "SNAPFS_QEMU_IMG": slow_qemu_img(tmp_path)}
    merge = subprocess.Popen(
        [SNAPFS, "--store", store, "snapshot-deactivate", "vm1", "s", "--merge"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = ""
    deadline = time.monotonic() + 30
    while merge.poll() is None and time.monotonic() < deadline and not seen:
        with contextlib.suppress(FileNotFoundError):
            with open(job) as f:
                seen = f.read()
        time.sleep(0.05)
    out, err = merge.communicate(timeout=60)
    return seen, subprocess.CompletedProcess(merge.args, merge.returncode, out, err)


@pytest.mark.timeout(120)
def test_job_file_through_the_mount(tmp_path):
    store = domain_with_merge(tmp_path)
    mount = Mount(store, str(tmp_path / "mnt")).start()
    try:
        job = os.path.join(mount.path, "vm1", "job")
        with open(job) as f:
            assert f.read() == "", "idle: the job file is empty"
        seen, run = watch_merge(tmp_path, store, job)
        assert run.returncode == 0, run.stderr
        assert seen.startswith("merge s: step 1 of ") and seen.endswith("%\n"), seen
        with open(job) as f:
            assert f.read() == ""
        assert os.stat(job).st_size == 0
    finally:
        mount.stop()


def test_job_file_during_a_merge_and_quiet_off_a_terminal(tmp_path):
    store = domain_with_merge(tmp_path)
    job = os.path.join(store, "domains", "vm1", "job")
    seen, run = watch_merge(tmp_path, store, job)
    assert run.returncode == 0, run.stderr
    err = run.stderr
    assert seen.startswith("merge s: step 1 of ") and "commit" in seen and seen.endswith("%\n"), seen
    assert err == "", "no progress line when stderr is not a terminal"
    assert not os.path.exists(job), "the job file is removed when the operation ends"


def test_progress_line_on_a_terminal(tmp_path):
    store = domain_with_merge(tmp_path)
    env = {**os.environ, "SNAPFS_QEMU_IMG": slow_qemu_img(tmp_path)}
    command = f"{SNAPFS} --store {store} snapshot-deactivate vm1 s --merge"
    run = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "merge s: step 1 of" in run.stdout and "%" in run.stdout, run.stdout
    assert "Domain snapshot s merged" in run.stdout
