"""An attached QEMU whose command line names the stable symlinks (issue 13, DESIGN section 8).

The test starts the guest itself (tests/guest, its own `-qmp`), each disk a `-blockdev` on
`layers/<disk>/live.qcow2`, the symlink, and hands the socket to snapfs with `attach`. A
merge while QEMU still runs the live layer through the symlink; the first create, killed
at its `repoint` step and recovered, which re-points the frozen node at its real file
before the symlink moves; more creates (crash-consistent from one instant), merges of a
snapshot whose dependent is the re-pointed node (a stream that reopens it read-write), of
the current snapshot, and through the CLI. A QEMU that opened the symlink with `-drive`
(no node name, which blockdev-reopen cannot address) is refused with one sentence.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from factory import define_domain, make_bases
from guest.vm import QEMU, boot_args, running_guest
from helpers import qemu_check_problems, tree_fingerprint
from livehelpers import (
    CLUSTER,
    DISK_ONLY,
    DOM,
    PATTERN_AT,
    TARGETS,
    LiveDomain,
    MiB,
    PausedQemu,
    active_files,
    assert_guest_writes_live,
    check_snapshot,
    cli,
    define_with_snapshots,
    frozen_state,
    has_pattern,
    layout_problems,
    operate,
)

import snapfs
from snapfs import qmp
from snapfs.engines.qmp import block_nodes

pytestmark = pytest.mark.timeout(240)

DISK_SIZE = 40 * MiB
CRASH_STATUS = 86


@pytest.fixture(scope="module")
def attached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDomain]:
    """a ── b ── live (offline), then the guest on the live.qcow2 symlinks."""
    directory = tmp_path_factory.mktemp("attached")
    root, domain, patterns = define_with_snapshots(directory, DISK_SIZE, ("a", "b"), 0x50)
    links = {t: Path(p) for t, p in domain.live_paths().items()}
    assert all(p.is_symlink() for p in links.values())
    with running_guest(directory, links) as guest:
        cli(root, "attach", DOM, str(guest.sock))
        yield LiveDomain(root, domain, guest, patterns)


# ---- what the tests check ---------------------------------------------------------------------
async def _nodes_on_links(sock: Path, links: set[str]) -> list[str]:
    async with qmp.connect(sock) as q:
        return [n.name for n in await block_nodes(q) if n.path in links and n.drv != "file"]


def nodes_on_links(a: LiveDomain) -> list[str]:
    """QEMU's format nodes whose recorded file is one of the live.qcow2 symlinks (QEMU may
    name it inside a json:{...} after a stream: snapfs reads it out as the engine does)."""
    return trio.run(_nodes_on_links, a.guest.sock, set(a.domain.live_paths().values()))


def assert_healthy(a: LiveDomain) -> None:
    """Layout right, every frozen layer checks clean, the guest writes its counter into the
    live layer (read through the symlink), QEMU's devices on the live layers' real files or
    on the symlinks leading to them."""
    assert layout_problems(a.domain) == []
    for name in a.domain.list_snapshot_names():
        for path in a.snap(name).layer_paths().values():
            assert qemu_check_problems(path) == []
    assert {os.path.realpath(f) for f in active_files(a.guest.sock)} == set(a.domain.live_layer_paths().values())
    assert_guest_writes_live(a)


def merge_and_check(a: LiveDomain, name: str, how: str = "api") -> None:
    """Merge `name` while the guest writes: every other snapshot keeps its paths and content,
    the live disk keeps every pattern, the guest keeps writing, the merged layers are gone."""
    state = frozen_state(a)
    gone = state.pop(name)
    printed = a.guest.last()
    if how == "api":
        a.snap(name).deactivate(snapfs.DeactivateFlags.MERGE)
    else:
        cli(a.root, "snapshot-delete", DOM, name)
    assert name not in a.domain.list_snapshot_names()
    assert not any(os.path.exists(p) for p in gone[0].values())
    assert frozen_state(a) == state
    a.guest.wait_counter(printed + 5)
    for index, pattern_name in enumerate(("a", "b")):
        for path in a.domain.live_paths().values():
            assert has_pattern(path, a.patterns[pattern_name], PATTERN_AT + index * CLUSTER)
    assert_healthy(a)


def repoint_point(directory: Path) -> str:
    """The journal point of a create's repoint step, from a traced create on a small store
    whose paused QEMU runs the symlinks."""
    root = str(directory / "store")
    define_domain(root, DOM, make_bases(str(directory / "images")))
    qemu = PausedQemu(root, directory, through_links=True)
    trace = str(directory / "trace")
    try:
        assert operate(root, "create", "s", {"SNAPFS_TRACE_STEPS": trace}) == 0
    finally:
        qemu.kill()
    with open(trace) as f:
        points = [line.strip() for line in f if line.strip().endswith(":repoint")]
    assert len(points) == 1, points
    return points[0]


# ---- the tests, in order on one guest -----------------------------------------------------------
def test_merge_current_while_qemu_runs_the_symlink(attached: LiveDomain) -> None:
    """b's dependent is the live layer, which QEMU opened through live.qcow2."""
    assert len(nodes_on_links(attached)) == len(TARGETS)
    merge_and_check(attached, "b")
    assert attached.domain.current_snapshot().name == "a"
    assert len(nodes_on_links(attached)) == len(TARGETS)  # the symlink did not move: nothing re-pointed


def test_first_create_killed_at_repoint_then_recovered(attached: LiveDomain, tmp_path: Path) -> None:
    """snapfs killed right after the switch, before the re-point: the next command finishes
    it, and only then the symlinks move."""
    point = repoint_point(tmp_path)
    attached.guest.wait_counter(attached.guest.last() + 3)
    before = attached.guest.last()
    old_live = attached.domain.live_layer_paths()
    status = operate(attached.root, "create", "s1", {"SNAPFS_CRASH_AT": f"{point}:before"})
    assert status == CRASH_STATUS
    for target, link in attached.domain.live_paths().items():
        assert os.readlink(link) == os.path.basename(old_live[target])  # not moved yet
    snapfs.open_store(attached.root)  # recovery
    assert nodes_on_links(attached) == []
    check_snapshot(attached, "s1", before)
    assert attached.snap("s1").layer_paths() == old_live
    assert active_files(attached.guest.sock) == set(attached.domain.live_layer_paths().values())
    assert_healthy(attached)


def test_creates_one_instant_guest_never_stopped(attached: LiveDomain) -> None:
    previous = -1
    for name in ("s2", "s3", "s4"):
        attached.guest.wait_counter(attached.guest.last() + 2)
        before = attached.guest.last()
        started = time.monotonic()
        attached.domain.snapshot_create_xml(DISK_ONLY.format(name))
        assert time.monotonic() - started < 5
        n = check_snapshot(attached, name, before).last
        assert n > previous
        previous = n
    assert_healthy(attached)


def test_merge_snapshot_whose_dependent_is_the_repointed_node(attached: LiveDomain) -> None:
    """a's one dependent is s1, the layer QEMU opened through the symlink and snapfs re-pointed:
    the stream reopens that node read-write on its real file."""
    assert [c.name for c in attached.snap("a").list_children()] == ["s1"]
    s1 = attached.snap("s1").layer_paths()
    merge_and_check(attached, "a")
    assert attached.snap("s1").get_parent() is None
    assert attached.snap("s1").layer_paths() == s1


def test_merge_frozen_on_chain_and_current(attached: LiveDomain) -> None:
    merge_and_check(attached, "s3")  # one dependent, s4: a frozen layer snapfs added
    assert attached.snap("s4").get_parent().name == "s2"
    merge_and_check(attached, "s4")  # the current snapshot: the live layer pulls it
    assert attached.domain.current_snapshot().name == "s2"


def test_through_the_cli(attached: LiveDomain) -> None:
    attached.guest.wait_counter(attached.guest.last() + 2)
    before = attached.guest.last()
    cli(attached.root, "snapshot-create-as", DOM, "c1", "--disk-only")
    check_snapshot(attached, "c1", before)
    merge_and_check(attached, "c1", "cli")
    assert "running" in cli(attached.root, "domstate", DOM).stdout


def test_drive_on_the_symlink_is_refused(tmp_path: Path) -> None:
    """-drive gives the node no name, and blockdev-reopen cannot address an automatic one
    (QEMU 7.2: "Cannot change the option 'node-name'"): refused before anything is written."""
    root = str(tmp_path / "store")
    domain = define_domain(root, DOM, make_bases(str(tmp_path / "images")))
    sock = tmp_path / "qmp.sock"
    command = [QEMU, "-m", "128", *boot_args(), "-S", "-qmp", f"unix:{sock},server=on,wait=off"]
    for target, link in domain.live_paths().items():
        command += ["-drive", f"file={link},if=none,id=drive-{target},format=qcow2"]
        command += ["-device", f"virtio-blk-pci,drive=drive-{target},id={target}"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and trio.run(qmp.answers, sock)):
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.05)
        cli(root, "attach", DOM, str(sock))
        before = sorted(os.listdir(os.path.dirname(domain.live_paths()["vda"])))
        run = cli(root, "snapshot-create-as", DOM, "s", "--disk-only", check=False)
        assert run.returncode != 0 and "-drive" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
        assert domain.list_snapshot_names() == []
        assert sorted(os.listdir(os.path.dirname(domain.live_paths()["vda"]))) == before
    finally:
        proc.kill()
        proc.wait(10)


async def _run_then_pause(sock: Path) -> None:
    async with qmp.connect(sock) as q:
        await q.execute("cont")
        await q.execute("stop")


def test_memory_snapshot_on_the_symlinks(tmp_path: Path) -> None:
    """A create with memory switches the disks as a disk-only one (switch_memory), then
    re-points the frozen nodes the same way; a paused QEMU stays paused."""
    root = str(tmp_path / "store")
    domain = define_domain(root, DOM, make_bases(str(tmp_path / "images")))
    old_live = domain.live_layer_paths()
    qemu = PausedQemu(root, tmp_path, through_links=True)
    try:
        trio.run(_run_then_pause, qemu.sock)  # out of prelaunch: QEMU 7.2 aborts a migration from there
        cli(root, "snapshot-create-as", DOM, "m1")
        snap = domain.snapshot_lookup_by_name("m1")
        assert "<state>paused</state>" in snap.get_xml_desc()
        assert (Path(root) / "domains" / DOM / "memory" / snap.id).stat().st_size > 0
        assert snap.layer_paths() == old_live
        links = set(domain.live_paths().values())
        assert trio.run(_nodes_on_links, qemu.sock, links) == []
        assert active_files(qemu.sock) == set(domain.live_layer_paths().values())
        assert layout_problems(domain) == []
        assert all(qemu_check_problems(p) == [] for p in old_live.values())
    finally:
        qemu.kill()


def test_memory_snapshot_before_the_guest_ran_is_refused(tmp_path: Path) -> None:
    """A QEMU still in prelaunch (-S, never continued) has no memory to save, and QEMU 7.2
    aborts a migration from there: a create with memory is refused with one sentence, QEMU
    lives on, nothing changes; a disk-only snapshot of it works."""
    root = str(tmp_path / "store")
    domain = define_domain(root, DOM, make_bases(str(tmp_path / "images")))
    qemu = PausedQemu(root, tmp_path)
    try:
        before = tree_fingerprint(root)
        result = cli(root, "snapshot-create-as", DOM, "m1", check=False)
        assert result.returncode != 0 and "has not run yet" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        with pytest.raises(snapfs.SnapfsError) as caught:
            domain.snapshot_create_xml("<domainsnapshot><name>m1</name></domainsnapshot>")
        assert caught.value.errno == errno.EBUSY and "disk-only" in str(caught.value)
        assert qemu.proc.poll() is None and trio.run(_status, qemu.sock) == "prelaunch"
        assert tree_fingerprint(root) == before and domain.list_snapshot_names() == []
        cli(root, "snapshot-create-as", DOM, "d1", "--disk-only")
        assert "<state>disk-snapshot</state>" in domain.snapshot_lookup_by_name("d1").get_xml_desc()
        assert active_files(qemu.sock) == set(domain.live_layer_paths().values())
    finally:
        qemu.kill()


async def _status(sock: Path) -> str:
    async with qmp.connect(str(sock), timeout=5.0) as q:
        return (await q.execute("query-status"))["status"]
