"""kill -9 of snapfs at every step of a memory snapshot and of a revert to one (issue 14).

The guest (tests/guest) runs under a QEMU snapfs started, as in tests/test_memory.py. Each
case's step points come from SNAPFS_TRACE_STEPS on a clean run; then at every point, both
sides, the operation runs through the CLI with SNAPFS_CRASH_AT (the process dies there,
its journal left behind), and opening the store must finish it:
- a memory snapshot: made, its memory saved (QEMU alive: the step is re-run whole), no
  partial memory file left, the guest writing on into the live layer; with QEMU killed at
  the point too: the snapshot is there, with its memory or disk-only, nothing half-made.
- a revert: the reverted guest runs (its boot, from the snapshot's counter), never the old
  one on a new disk, never a guest on a half-made disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from livehelpers import DOM, MiB, cli, layout_problems
from test_memory import Vm, frozen_counters, kill_qemu, memory_files, started_vm

import snapfs

pytestmark = pytest.mark.timeout(900)

CRASH_STATUS = 86


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    with started_vm(tmp_path_factory.mktemp("memcrash"), 40 * MiB) as machine:
        yield machine


def points(vm: Vm, args: list[str], trace_dir: Path) -> list[str]:
    trace = trace_dir / f"trace-{time.monotonic_ns()}"
    cli(vm.root, *args, env={"SNAPFS_TRACE_STEPS": str(trace)})
    steps = [line.strip() for line in trace.read_text().splitlines() if line.strip()]
    return [f"{step}:{side}" for step in steps for side in ("before", "after")]


def crash(vm: Vm, args: list[str], point: str) -> None:
    run = cli(vm.root, *args, check=False, env={"SNAPFS_CRASH_AT": point})
    assert run.returncode == CRASH_STATUS, f"{point}: {run.returncode} {run.stderr}"
    assert (Path(vm.root) / "domains" / DOM / "journal.json").exists()


def recover(vm: Vm) -> snapfs.Domain:
    domain = snapfs.open_store(vm.root).lookup_domain(DOM)
    assert not (Path(vm.root) / "domains" / DOM / "journal.json").exists(), domain.last_error()
    return domain


def no_partial_memory(vm: Vm) -> None:
    assert [name for name in memory_files(vm) if name.endswith(".part")] == []


def test_memory_create_crash_qemu_alive(vm: Vm, tmp_path: Path) -> None:
    found = points(vm, ["snapshot-create-as", DOM, "probe"], tmp_path)
    cli(vm.root, "snapshot-delete", DOM, "probe")
    assert any(":switch_memory:" in p for p in found)
    for index, point in enumerate(found):
        name = f"c{index}"
        crash(vm, ["snapshot-create-as", DOM, name], point)
        domain = recover(vm)
        snap = domain.snapshot_lookup_by_name(name)
        assert "<state>running</state>" in snap.get_xml_desc(), point
        assert memory_files(vm) == [snap.id], point
        frozen_counters(domain, name)  # crash-consistent, one boot
        assert layout_problems(domain) == [], point
        printed = vm.counters()[-1]
        vm.wait_counter(printed + 2)
        assert vm.state() == "running", point
        cli(vm.root, "snapshot-delete", DOM, name)
        no_partial_memory(vm)
        assert memory_files(vm) == []


@pytest.mark.parametrize("qemu", ["alive", "killed"])
def test_revert_crash(vm: Vm, tmp_path: Path, qemu: str) -> None:
    name = f"target-{qemu}"
    vm.domain.snapshot_create_xml(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
    frozen = frozen_counters(vm.domain, name)
    found = points(vm, ["snapshot-revert", DOM, name], tmp_path)
    assert any(":qmp_resume:" in p for p in found) and any(":qmp_quit:" in p for p in found)
    for point in found:
        vm.wait_counter(frozen["vda"] + 5)
        crash(vm, ["snapshot-revert", DOM, name], point)
        if qemu == "killed":
            kill_qemu(vm.root)  # the old QEMU, or the reverted one part-way through loading
            time.sleep(0.3)
        since = vm.mark()
        domain = recover(vm)
        assert vm.state() == "running", point
        deadline = time.monotonic() + 60
        while not [n for n in vm.counters(since) if n <= frozen["vda"] + 1] and time.monotonic() < deadline:
            time.sleep(0.05)  # the old guest was past the snapshot: only the reverted one prints this
        assert [n for n in vm.counters(since) if n <= frozen["vda"] + 1], (point, vm.lines()[-3:])
        assert vm.boots(since) == [], point
        assert layout_problems(domain) == [], point
        no_partial_memory(vm)


def test_memory_create_crash_qemu_killed(vm: Vm, tmp_path: Path) -> None:
    found = points(vm, ["snapshot-create-as", DOM, "probe2"], tmp_path)
    cli(vm.root, "snapshot-delete", DOM, "probe2")
    before = set(memory_files(vm))
    for index, point in enumerate(p for p in found if ":switch_memory:" in p or ":qmp_add:after" in p):
        name = f"k{index}"
        crash(vm, ["snapshot-create-as", DOM, name], point)
        kill_qemu(vm.root)
        time.sleep(0.5)
        domain = recover(vm)
        snap = domain.snapshot_lookup_by_name(name)
        xml = snap.get_xml_desc()
        with_memory = "<state>running</state>" in xml
        assert with_memory or "<state>disk-snapshot</state>" in xml, point
        assert (snap.id in memory_files(vm)) == with_memory, point
        no_partial_memory(vm)
        frozen_counters(domain, name)
        assert layout_problems(domain) == [], point
        assert vm.state() == "shut off"
        cli(vm.root, "snapshot-delete", DOM, name)
        assert set(memory_files(vm)) == before
        since = vm.mark()
        domain.create()
        vm.wait_printing(since, old_printing=False)
    assert os.path.isdir(vm.root)
