"""Disk-only snapshots and merges of a running domain over QMP (issue 13, DESIGN section 8).

One tiny Linux guest (tests/guest) boots per module under TCG on the live layers of a
two-disk domain (vda on a qcow2 base, vdb on a raw one) and writes its sequence counter to
both; the test hands its QMP socket to snapfs with `attach`, as a user with a QEMU of their
own would. Before the boot an offline tree is made (a, b a branch off a, c on a, the live
disk on c), each layer holding a pattern of its own above the counter. Then, through the
API, the command line and the mount: live creates (one instant on both disks, the guest
never stopped, ten in a row), live merges of every shape, refusals, and a merge whose
snapfs is killed while QEMU's stream job runs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from factory import define_domain, make_bases
from fsfixtures import Mount
from guest.build import guest_files
from guest.counter import check_consistent, read_counter
from guest.vm import Guest, running_guest
from helpers import qemu_check_problems
from livehelpers import (
    CLUSTER,
    COUNTER_AREA,
    DISK_ONLY,
    DOM,
    PATTERN_AT,
    TARGETS,
    LiveDomain,
    MiB,
    active_files,
    assert_guest_writes_live,
    block_jobs,
    check_snapshot,
    cli,
    counter,
    define_with_snapshots,
    frozen_state,
    has_pattern,
    hmp,
    layout_problems,
    traced,
)

import snapfs
from snapfs import qmp
from snapfs.engines.qmp import node_name
from snapfs.errors import SnapfsError

pytestmark = pytest.mark.timeout(240)

DISK_SIZE = 40 * MiB


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDomain]:
    directory = tmp_path_factory.mktemp("live")
    root, domain, patterns = define_with_snapshots(directory, DISK_SIZE, ("a", "b", "c"), 0x30, {"c": "a"})
    real = {t: Path(p) for t, p in domain.live_layer_paths().items()}
    with running_guest(directory, real) as guest:
        domain.attach(str(guest.sock))
        yield LiveDomain(root, domain, guest, patterns)


# ---- what the tests check ---------------------------------------------------------------------
def assert_healthy(live: LiveDomain) -> None:
    """Layout right, every frozen layer checks clean, the guest writes into the live layer."""
    assert layout_problems(live.domain) == []
    for name in live.domain.list_snapshot_names():
        for path in live.snap(name).layer_paths().values():
            assert qemu_check_problems(path) == []
    assert_guest_writes_live(live)


def max_gap(guest: Guest, start: float, end: float) -> tuple[float, float]:
    """(longest gap between counter steps around [start, end], median gap before it)."""
    times = [t for t, _ in guest.counter_times()]
    gaps = [(b - a, a, b) for a, b in zip(times, times[1:], strict=False)]
    around = [g for g, a, b in gaps if b >= start and a <= end] or [0.0]
    before = [g for g, _, b in gaps if b < start][-50:]
    return max(around), statistics.median(before)


# ---- create -----------------------------------------------------------------------------------
def test_live_create_two_disks_one_instant(live: LiveDomain) -> None:
    live.guest.wait_counter(live.guest.last() + 3)
    before = live.guest.last()
    old_live = live.domain.live_layer_paths()
    started = time.monotonic()
    live.domain.snapshot_create_xml(DISK_ONLY.format("l1"))
    ended = time.monotonic()
    n = check_snapshot(live, "l1", before)
    assert live.snap("l1").layer_paths() == old_live  # the live files became L(l1): nothing renamed
    new_live = live.domain.live_layer_paths()
    assert set(new_live.values()) & set(old_live.values()) == set()
    assert active_files(live.guest.sock) == set(new_live.values())
    live.guest.wait_counter(n.last + 10)
    gap, step = max_gap(live.guest, started, ended)
    assert gap < step + 2.0, "the guest was stopped"
    assert_healthy(live)
    assert counter(live.snap("l1").layer_paths()["vda"], "vda") == n  # frozen stays frozen


def test_ten_in_a_row_through_api_and_cli(live: LiveDomain, tmp_path: Path) -> None:
    previous = -1
    started = time.monotonic()
    for i in range(10):
        live.guest.wait_counter(live.guest.last() + 2)
        before = live.guest.last()
        name = f"row{i}"
        if i % 3 == 1:
            cli(live.root, "snapshot-create-as", DOM, name, "--disk-only")
        elif i % 3 == 2:
            request = tmp_path / f"{name}.xml"
            request.write_text(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
            cli(live.root, "snapshot-create", DOM, str(request), "--disk-only")
        else:
            live.domain.snapshot_create_xml(DISK_ONLY.format(name))
        n = check_snapshot(live, name, before)
        assert n.last > previous, "the counter rises across each snapshot"
        previous = n.last
    gap, step = max_gap(live.guest, started, time.monotonic())
    assert gap < step + 2.0, "the guest was stopped"
    assert_healthy(live)


async def _add_by_hand(sock: Path, paths: list[str]) -> None:
    async with qmp.connect(sock) as q:
        for path in paths:
            file = {"driver": "file", "filename": path}
            await q.execute(
                "blockdev-add", {"driver": "qcow2", "node-name": node_name(path), "file": file}, backing=None
            )


def test_switch_with_overlays_qemu_has_already(live: LiveDomain, tmp_path: Path) -> None:
    """snapfs dies before the switch, and QEMU holds the new overlays already (added by hand
    here, as an older snapfs's blockdev-add or a memory create's qmp_add leaves them): the
    one-command transaction (blockdev-snapshot-sync, mode existing) cannot open them again
    and changes nothing; the recovery's switch then uses the nodes there (blockdev-snapshot)."""
    trace = str(tmp_path / "trace")
    cli(live.root, "snapshot-create-as", DOM, "sw0", "--disk-only", env={"SNAPFS_TRACE_STEPS": trace})
    with open(trace) as f:
        point = next(line.strip() for line in f if line.strip().endswith(":switch"))
    live.guest.wait_counter(live.guest.last() + 2)
    before = live.guest.last()
    crashed = cli(
        live.root,
        "snapshot-create-as",
        DOM,
        "sw1",
        "--disk-only",
        check=False,
        env={"SNAPFS_CRASH_AT": point + ":before"},
    )
    assert crashed.returncode == 86, crashed.stderr
    journal = json.loads((Path(live.root) / "domains" / DOM / "journal.json").read_text())
    switch = next(step for step in journal["steps"] if step["do"] == "switch")
    overlays = [os.path.join(live.root, "domains", DOM, d["overlay"]) for d in switch["disks"]]
    trio.run(_add_by_hand, live.guest.sock, overlays)
    cli(live.root, "snapshot-list", DOM)  # the next command (opening the store) finishes the create
    check_snapshot(live, "sw1", before)
    assert active_files(live.guest.sock) == set(overlays) == set(live.domain.live_layer_paths().values())
    assert_healthy(live)


def test_memory_snapshot_of_attached_domain(live: LiveDomain) -> None:
    """Without --disk-only a running domain's memory is saved too (tests/test_memory.py has
    the reverts); merging the snapshot removes its memory file."""
    names = live.domain.list_snapshot_names()
    cli(live.root, "snapshot-create-as", DOM, "withmem")
    snap = live.snap("withmem")
    assert "<state>running</state>" in snap.get_xml_desc()
    memory = Path(live.root) / "domains" / DOM / "memory" / snap.id
    assert memory.stat().st_size > MiB
    cli(live.root, "snapshot-delete", DOM, "withmem")
    assert not memory.exists() and live.domain.list_snapshot_names() == names
    compressed = "<domainsnapshot><name>z</name><compression>gzip</compression><memory snapshot='no'/></domainsnapshot>"
    with pytest.raises(SnapfsError, match="is running: QEMU holds the layers"):
        live.domain.snapshot_create_xml(compressed)
    assert live.domain.list_snapshot_names() == names
    assert_healthy(live)


# ---- merge ------------------------------------------------------------------------------------
def merge_and_check(live: LiveDomain, name: str, how: str) -> None:
    """Merge `name` while the guest writes: every other snapshot keeps its layer paths and
    content, the live disk its patterns, the guest keeps writing, QEMU runs on the live files."""
    state = frozen_state(live)
    gone = state.pop(name)
    domain_xml = live.domain.xml_desc()
    printed = live.guest.last()
    if how == "api":
        live.snap(name).deactivate(snapfs.DeactivateFlags.MERGE)
    else:
        cli(live.root, "snapshot-delete", DOM, name)
    assert name not in live.domain.list_snapshot_names()
    for path in gone[0].values():
        assert not os.path.exists(path)
    assert frozen_state(live) == state
    assert live.domain.xml_desc() == domain_xml
    live.guest.wait_counter(printed + 5)
    assert active_files(live.guest.sock) == set(live.domain.live_layer_paths().values())
    for index, pattern_name in enumerate(("a", "b", "c")):
        if pattern_name != "b":
            for path in live.domain.live_paths().values():
                assert has_pattern(path, live.patterns[pattern_name], PATTERN_AT + index * CLUSTER)
    assert_healthy(live)


def test_merge_two_dependents_one_off_chain(live: LiveDomain) -> None:
    """a's children: b (a shut-off branch) and c (a frozen layer on the running chain)."""
    assert sorted(c.name for c in live.snap("a").list_children()) == ["b", "c"]
    merge_and_check(live, "a", "api")
    assert live.snap("b").get_parent() is None and live.snap("c").get_parent() is None


def test_merge_frozen_on_chain(live: LiveDomain) -> None:
    """row3's one dependent is row4, a layer QEMU holds read-only (snapfs added it)."""
    merge_and_check(live, "row3", "cli")
    assert live.snap("row4").get_parent().name == "row2"


def test_merge_current(live: LiveDomain) -> None:
    """The current snapshot: its dependent is the live layer QEMU writes."""
    current = live.domain.current_snapshot()
    parent = current.get_parent().name
    merge_and_check(live, current.name, "api")
    assert live.domain.current_snapshot().name == parent


def test_merge_off_chain_and_rename_and_description(live: LiveDomain) -> None:
    merge_and_check(live, "b", "cli")  # off the running chain: as offline
    cli(live.root, "snapshot-rename", DOM, "row0", "first-row")
    cli(live.root, "snapshot-desc", DOM, "first-row", "made while running")
    assert live.snap("first-row").get_description() == "made while running"


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["create-with-snapshot", DOM, "c"], "shut"),
        (["snapshot-deactivate", DOM, "c", "--deleteforce"], "shut"),
        (["snapshot-compress", DOM, "c", "gzip"], "shut"),
    ],
    ids=["revert", "discard-force", "compress"],
)
def test_refused_while_running(live: LiveDomain, args: list[str], words: str) -> None:
    names = live.domain.list_snapshot_names()
    live_files = live.domain.live_layer_paths()
    run = cli(live.root, *args, check=False)
    assert run.returncode != 0 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert live.domain.list_snapshot_names() == names and live.domain.live_layer_paths() == live_files
    assert_guest_writes_live(live)


def test_deactivate_while_running(live: LiveDomain) -> None:
    """The live layer pulls what lies above S's parent (a stream, nothing deleted): every
    snapshot stays as it was, the live disk reads the same, current becomes S's parent."""
    live.domain.snapshot_create_xml(DISK_ONLY.format("d1"))
    live.domain.snapshot_create_xml(DISK_ONLY.format("d2"))
    state, parent = frozen_state(live), live.snap("d1").get_parent().name
    printed = live.guest.last()
    cli(live.root, "snapshot-deactivate", DOM, "d1")
    assert live.domain.current_snapshot().name == parent
    assert frozen_state(live) == state
    live.guest.wait_counter(printed + 5)
    assert active_files(live.guest.sock) == set(live.domain.live_layer_paths().values())
    for path in live.domain.live_paths().values():
        assert has_pattern(path, live.patterns["c"], PATTERN_AT + 2 * CLUSTER)
    assert_healthy(live)


# ---- the mount --------------------------------------------------------------------------------
def test_mount_mkdir_and_merge(live: LiveDomain, tmp_path: Path) -> None:
    mount = Mount(live.root, str(tmp_path / "mnt")).start()
    try:
        snapshots = tmp_path / "mnt" / DOM / "snapshots"
        before = live.guest.last()
        os.mkdir(snapshots / "by-mkdir")
        check_snapshot(live, "by-mkdir", before)
        live.guest.wait_counter(live.guest.last() + 3)
        (snapshots / "by-mkdir" / "control").write_text("merge\n")
        assert "by-mkdir" not in os.listdir(snapshots)
    finally:
        assert mount.stop() == 0, mount.log()[-2000:]
    assert_healthy(live)


# ---- snapfs killed while QEMU streams ---------------------------------------------------------
KILLER = """
import sys, snapfs
domain = snapfs.open_store(sys.argv[1]).lookup_domain(sys.argv[2])
domain.snapshot_lookup_by_name(sys.argv[3]).deactivate(snapfs.DeactivateFlags.MERGE)
"""


def test_snapfs_killed_while_qemu_streams(live: LiveDomain, tmp_path: Path) -> None:
    """A stream job outlives snapfs; the next command finds it by its id and waits for it."""
    for target in TARGETS:
        command = f'qemu-io -d {target}/virtio-backend "write -P 0x77 {PATTERN_AT + 4 * MiB} {8 * MiB}"'
        trio.run(hmp, live.guest.sock, command)
    live.domain.snapshot_create_xml(DISK_ONLY.format("big"))
    for path in live.snap("big").layer_paths().values():
        assert os.stat(path).st_blocks * 512 >= 8 * MiB, "the guest's write did not reach the layer"
    live.domain.snapshot_create_xml(DISK_ONLY.format("after-big"))
    state = frozen_state(live)
    del state["big"]
    trace = str(tmp_path / "trace")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    env |= {"SNAPFS_QMP_STREAM_SPEED": str(MiB), "SNAPFS_TRACE_STEPS": trace}
    proc = subprocess.Popen([sys.executable, "-c", KILLER, live.root, DOM, "big"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not traced(trace, "stream") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # the job runs (8 MiB at 1 MiB/s)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert block_jobs(live.guest.sock), "the job should outlive snapfs"
    cli(live.root, "snapshot-list", DOM)  # the next command (opening the store) finishes it
    assert "big" not in live.domain.list_snapshot_names()
    assert frozen_state(live) == state
    for path in live.domain.live_paths().values():
        assert has_pattern(path, 0x77, PATTERN_AT + 4 * MiB, 8 * MiB)
    assert_healthy(live)


# ---- a QEMU snapfs started itself ------------------------------------------------------------
def wait_counter_in(image: str, disk: str, n: int, timeout: float = 90.0) -> int:
    """Wait until the counter in `image` reached n (no console here: QEMU is daemonized)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        blocks = read_counter(image, COUNTER_AREA)
        if blocks and check_consistent(blocks, disk).last >= n:
            return check_consistent(blocks, disk).last
        time.sleep(0.5)
    raise AssertionError(f"the counter in {image} did not reach {n}")


@pytest.mark.timeout(180)
def test_started_by_snapfs_create_merge_destroy(tmp_path: Path) -> None:
    """`snapfs start` (its own node names, its socket under STORE/run) gets the same live
    snapshot and merge; once destroyed, the next snapshot is an offline one."""
    bases = make_bases(str(tmp_path / "images"), {}, sizes={t: DISK_SIZE for t in TARGETS})
    root = str(tmp_path / "store")
    domain = define_domain(root, "vm2", bases)
    kernel, initrd = guest_files()
    args = ["-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot"]
    args += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1"]
    args += ["-serial", f"file:{tmp_path / 'console'}"]
    cli(root, "start", "vm2", "--", *args)
    try:
        live_vda = domain.live_paths()["vda"]
        wait_counter_in(live_vda, "vda", 5)
        cli(root, "snapshot-create-as", "vm2", "s1", "--disk-only")
        s1 = domain.snapshot_lookup_by_name("s1")
        frozen = {t: counter(p, t) for t, p in s1.layer_paths().items()}
        assert frozen["vdb"].last <= frozen["vda"].last <= frozen["vdb"].last + 1
        assert "<state>disk-snapshot</state>" in s1.get_xml_desc()
        wait_counter_in(live_vda, "vda", frozen["vda"].last + 5)
        cli(root, "snapshot-delete", "vm2", "s1")
        assert domain.list_snapshot_names() == []
        now = wait_counter_in(live_vda, "vda", frozen["vda"].last + 10)
        assert counter(domain.live_paths()["vdb"], "vdb").last >= now - 1
        assert "running" in cli(root, "domstate", "vm2").stdout
        assert layout_problems(domain) == []
    finally:
        cli(root, "destroy", "vm2", check=False)
    cli(root, "snapshot-create-as", "vm2", "s2")
    assert "<state>shutoff</state>" in domain.snapshot_lookup_by_name("s2").get_xml_desc()
    assert layout_problems(domain) == []
