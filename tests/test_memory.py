"""Snapshots with memory of a running domain, and reverts to them (issue 14, DESIGN section 8).

snapfs itself starts the tiny test guest (tests/guest) once per module on a two-disk domain
(vda on a qcow2 base, vdb on a raw one), its console appended to a file, so that a revert
restarts QEMU with the recorded arguments. The guest writes its sequence counter to both
disks; a memory snapshot is right when, after a revert, the guest carries on in the same
boot (its boot tag) from the snapshot's counter over the snapshot's blocks.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from factory import define_domain, make_bases
from fsfixtures import Mount
from guest.counter import Counter, Record, read_counter
from guest.vm import boot_args
from livehelpers import CLUSTER, COUNTER_AREA, DOM, PATTERN_AT, TARGETS, MiB, cli, has_pattern, hmp

import snapfs
import snapfs.api
from snapfs import qmp

pytestmark = pytest.mark.timeout(300)

DISK_SIZE = 40 * MiB
GUEST_MIB = 256
BOOT = re.compile(r"snapfs-guest: boot (\S+)")


@dataclass
class Vm:
    root: str
    domain: snapfs.Domain
    console: Path

    def lines(self) -> list[str]:
        return self.console.read_text(errors="replace").splitlines()

    def mark(self) -> int:
        return len(self.lines())

    def counters(self, since: int = 0) -> list[int]:
        return [int(line[2:]) for line in self.lines()[since:] if line.startswith("C ") and line[2:].isdigit()]

    def boots(self, since: int = 0) -> list[str]:
        return [m.group(1) for line in self.lines()[since:] if (m := BOOT.match(line))]

    def wait_counter(self, n: int, since: int = 0, timeout: float = 90.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.counters(since)
            if found and found[-1] >= n:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"the counter did not reach {n}: {self.lines()[-5:]}")

    def wait_printing(self, since: int, timeout: float = 90.0, old_printing: bool = True) -> list[int]:
        """The counter lines the new QEMU printed after line `since` (the old one may have
        printed some before it ended: the new ones start where the sequence goes back or a
        boot line is), once there are three."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()[since:]
            boots = [i for i, line in enumerate(lines) if BOOT.match(line)]
            if boots:
                lines = lines[boots[-1] :]
            found = [int(line[2:]) for line in lines if line.startswith("C ") and line[2:].isdigit()]
            drops = [i for i in range(1, len(found)) if found[i] <= found[i - 1]]
            if drops:
                found = found[drops[-1] :]
            if (boots or drops or not old_printing) and len(found) >= 3:
                return found
            time.sleep(0.05)
        raise AssertionError(f"the guest printed nothing after line {since}: {self.lines()[-5:]}")

    def sock(self) -> Path:
        return Path(self.root) / "run" / "qemu.d" / f"{DOM}.qmp"

    def state(self) -> str:
        return cli(self.root, "domstate", DOM).stdout.strip()


def qemu_args(console: Path) -> list[str]:
    console_args = ["-chardev", f"file,id=con,path={console},append=on", "-serial", "chardev:con"]
    return ["-m", str(GUEST_MIB), *boot_args(), *console_args]


@contextmanager
def started_vm(directory: Path, disk_size: int) -> Iterator[Vm]:
    """A two-disk domain in a store under `directory`, started by snapfs (the API) and
    writing its counter; its QEMU is killed when the block ends."""
    bases = make_bases(str(directory / "images"), {}, sizes={t: disk_size for t in TARGETS})
    root = str(directory / "store")
    domain = define_domain(root, DOM, bases)
    console = directory / "console.log"
    domain.create(qemu_args=qemu_args(console))
    machine = Vm(root, domain, console)
    try:
        machine.wait_counter(3)
        yield machine
    finally:
        kill_qemu(root)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    with started_vm(tmp_path_factory.mktemp("mem"), DISK_SIZE) as machine:
        yield machine


def kill_qemu(root: str) -> None:
    pidfile = Path(root) / "run" / "qemu.d" / f"{DOM}.pid"
    try:
        os.kill(int(pidfile.read_text().strip()), 9)
    except (OSError, ValueError):
        pass


def frozen_counters(domain: snapfs.Domain, name: str) -> dict[str, int]:
    """N of each disk of snapshot `name` (crash-consistent, one boot tag), and the tag under ''."""
    paths = domain.snapshot_lookup_by_name(name).layer_paths()
    found = {t: this_boot(p, t) for t, p in paths.items()}
    assert len({c.tag for c in found.values()}) == 1
    return {"": next(iter(found.values())).tag, **{t: c.last for t, c in found.items()}}  # type: ignore[dict-item]


def this_boot(image: str, disk: str) -> Counter:
    """The counter of the boot whose blocks start the disk: 0..N in order (an earlier boot's
    higher blocks may follow, as on a disk a guest booted on again)."""
    blocks = read_counter(image, COUNTER_AREA)
    first = blocks[0] if blocks else None
    assert isinstance(first, Record) and first.n == 0 and first.disk == disk, f"{image}: block 0 is {first!r}"
    n = 0
    while n + 1 < len(blocks) and blocks[n + 1] == Record(first.tag, disk, n + 1):
        n += 1
    return Counter(first.tag, n)


def guest_write(vm: Vm, pattern: int) -> None:
    """A write of `pattern` on both disks through QEMU, as the guest would make it."""
    for target in TARGETS:
        command = f'qemu-io -d {target}/virtio-backend "write -P {pattern:#x} {PATTERN_AT} {CLUSTER}"'
        trio.run(hmp, vm.sock(), command)


def memory_files(vm: Vm) -> list[str]:
    place = Path(vm.root) / "domains" / DOM / "memory"
    return sorted(os.listdir(place)) if place.is_dir() else []


# ---- tests ------------------------------------------------------------------------------------
def test_memory_snapshot_and_revert_same_boot(vm: Vm) -> None:
    tag = vm.boots()[-1]
    vm.wait_counter(vm.counters()[-1] + 3)
    snap = vm.domain.snapshot_create_xml("<domainsnapshot><name>m1</name></domainsnapshot>")
    xml = snap.get_xml_desc()
    assert "<state>running</state>" in xml
    memory = Path(vm.root) / "domains" / DOM / "memory" / snap.id
    assert f'<memory snapshot="external" file="{memory}"/>' in xml
    assert memory.stat().st_size > 1 * MiB and memory_files(vm) == [snap.id]
    frozen = frozen_counters(vm.domain, "m1")
    assert frozen[""] == tag and frozen["vdb"] <= frozen["vda"] <= frozen["vdb"] + 1
    assert vm.state() == "running"
    vm.wait_counter(frozen["vda"] + 10)
    guest_write(vm, 0x77)  # after the snapshot: gone after the revert
    since = vm.mark()
    cli(vm.root, "snapshot-revert", DOM, "m1")
    assert vm.state() == "running"
    printed = vm.wait_printing(since)
    assert vm.boots(since) == [], "the revert booted the guest instead of loading its memory"
    assert printed[0] in (frozen["vdb"], frozen["vdb"] + 1), (printed[:3], frozen)
    vm.wait_counter(printed[0] + 5, since)
    after = vm.domain.snapshot_create_xml("<domainsnapshot><name>after1</name></domainsnapshot>", 16)
    now = frozen_counters(vm.domain, "after1")
    assert now[""] == tag and now["vda"] >= printed[0] + 5  # carried on over the snapshot's blocks
    assert now["vdb"] <= now["vda"] <= now["vdb"] + 1  # both disks from the same instant
    for target, path in after.layer_paths().items():
        assert not has_pattern(path, 0x77, PATTERN_AT), f"{target}: a write made after the snapshot survived"


def test_disk_only_revert_of_running_domain_shuts_off(vm: Vm) -> None:
    tag = vm.boots()[-1]
    vm.domain.snapshot_create_xml("<domainsnapshot><name>d1</name><memory snapshot='no'/></domainsnapshot>")
    d1 = vm.domain.snapshot_lookup_by_name("d1")
    assert '<memory snapshot="no"/>' in d1.get_xml_desc()
    frozen = frozen_counters(vm.domain, "d1")
    vm.wait_counter(vm.counters()[-1] + 3)
    vm.domain.create_with_snapshot(d1)
    assert vm.state() == "shut off"
    for target, path in vm.domain.live_paths().items():
        assert this_boot(path, target).last == frozen[target]
    since = vm.mark()
    vm.domain.create_with_snapshot(d1, snapfs.api.SNAPSHOT_REVERT_RUNNING)
    assert vm.state() == "running"
    vm.wait_printing(since)
    assert vm.boots(since) and vm.boots(since)[0] != tag


def test_revert_from_shut_off_to_memory_starts_it(vm: Vm) -> None:
    vm.wait_counter(vm.counters()[-1] + 3)
    vm.domain.snapshot_create_xml("<domainsnapshot><name>m2</name></domainsnapshot>")
    tag = frozen_counters(vm.domain, "m2")[""]
    vm.domain.destroy()
    assert vm.state() == "shut off"
    since = vm.mark()
    vm.domain.create_with_snapshot("m2")
    assert vm.state() == "running"
    vm.wait_printing(since, old_printing=False)
    assert vm.boots(since) == [] and vm.boots()[-1] == tag


def test_revert_paused_override(vm: Vm) -> None:
    vm.domain.create_with_snapshot("m2", snapfs.api.SNAPSHOT_REVERT_PAUSED)
    assert vm.state() == "paused"
    since = vm.mark()
    time.sleep(1)
    assert vm.counters(since) == []
    cli(vm.root, "snapshot-revert", DOM, "m2", "--running")
    assert vm.state() == "running"
    vm.wait_printing(since, old_printing=False)


async def _qmp(sock: Path, command: str) -> None:
    async with qmp.connect(sock) as q:
        await q.execute(command)


def test_memory_snapshot_of_paused_domain(vm: Vm) -> None:
    """A paused guest's snapshot says `paused`, the guest stays paused, and a revert to it
    leaves it paused (QEMU's background snapshot resumes a guest: snapfs pauses it again)."""
    trio.run(_qmp, vm.sock(), "stop")
    assert vm.state() == "paused"
    vm.domain.snapshot_create_xml("<domainsnapshot><name>p1</name></domainsnapshot>")
    assert "<state>paused</state>" in vm.domain.snapshot_lookup_by_name("p1").get_xml_desc()
    assert vm.state() == "paused"
    trio.run(_qmp, vm.sock(), "cont")
    vm.wait_counter(vm.counters()[-1] + 3)
    vm.domain.create_with_snapshot("p1")
    assert vm.state() == "paused"
    since = vm.mark()
    cli(vm.root, "snapshot-revert", DOM, "p1", "--running")
    assert vm.state() == "running"
    vm.wait_printing(since, old_printing=False)


def test_mount_memory_file_and_revert(vm: Vm, tmp_path: Path) -> None:
    vm.domain.snapshot_create_xml("<domainsnapshot><name>m3</name></domainsnapshot>")
    vm.domain.snapshot_create_xml("<domainsnapshot><name>d3</name><memory snapshot='no'/></domainsnapshot>", 16)
    m3 = vm.domain.snapshot_lookup_by_name("m3")
    saved = Path(vm.root) / "domains" / DOM / "memory" / m3.id
    mount = Mount(vm.root, str(tmp_path / "mnt")).start()
    try:
        snaps = Path(mount.path) / DOM / "snapshots"
        assert (snaps / "m3" / "memory").read_bytes() == saved.read_bytes()
        assert (snaps / "m3" / "state").read_text() == "running\n"
        assert not (snaps / "d3" / "memory").exists() and "memory" not in os.listdir(snaps / "d3")
        with pytest.raises(PermissionError):
            open(snaps / "m3" / "memory", "r+b")  # noqa: SIM115
        frozen = frozen_counters(vm.domain, "m3")
        (snaps / "m3" / "control").write_text("revert\n")
        assert vm.state() == "running"
        # Read on the disk, not the console: right after a restore, QEMU 7.2's serial port
        # (TCG) sometimes sends nothing more while the guest runs on (its disk counter rises).
        carried_on_from(vm, frozen)
    finally:
        mount.stop()


def carried_on_from(vm: Vm, frozen: dict[str, int], steps: int = 5, timeout: float = 90.0) -> None:
    """The guest runs on from the snapshot `frozen` describes, in the same boot: its counter
    on the live disk has the snapshot's boot tag and goes `steps` past the snapshot's N."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = this_boot(vm.domain.live_paths()["vda"], "vda")
        if now.tag == frozen[""] and now.last >= frozen["vda"] + steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"the guest did not carry on from N={frozen['vda']} of boot {frozen['']}: {now}")


def test_merge_and_discard_remove_memory(vm: Vm) -> None:
    for name in vm.domain.list_snapshot_names():
        vm.domain.snapshot_lookup_by_name(name).deactivate(snapfs.DeactivateFlags.MERGE)
    assert memory_files(vm) == []
    for round_ in range(20):
        snap = vm.domain.snapshot_create_xml(f"<domainsnapshot><name>r{round_}</name></domainsnapshot>")
        assert memory_files(vm) == [snap.id]
        snap.deactivate(snapfs.DeactivateFlags.MERGE)
        assert memory_files(vm) == []
    assert vm.domain.list_snapshot_names() == []
    assert vm.state() == "running"
    for target in TARGETS:
        layers = os.listdir(Path(vm.root) / "domains" / DOM / "layers" / target)
        assert len(layers) == 2, layers  # the live layer and its symlink
