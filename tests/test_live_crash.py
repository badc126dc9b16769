"""kill -9 of snapfs at every step of a live create and a live merge (issue 13, DESIGN 5 and 8).

Each case's step points are found with SNAPFS_TRACE_STEPS on a clean run; then for every
point and both sides of it the operation runs through the CLI with SNAPFS_CRASH_AT (the
process dies there, status 86, its journal left behind), and opening the store (what every
next command does first; test_live.py's kill test goes through the CLI) must leave the
operation fully done.

Twice over:
- snapfs killed, QEMU left running: the real guest (tests/guest) writes its counter
  throughout, on one domain, point after point. After recovery: the snapshot made is
  crash-consistent on both disks from one instant, or the merged one is gone and every
  other snapshot reads as before; QEMU writes into the live layer the metadata names, and
  the guest's counter keeps rising there; every frozen layer the operation made or changed
  checks clean; the layout is right. (A branch off the running chain cannot be made while
  the guest runs, so the merge with an off-chain dependent is in the second matrix.)
- on a fresh copy of a small offline-built store per point, with a QEMU that holds the
  live layers but runs no guest (-S: nothing writes, so every content is known exactly):
  both killed (QEMU right after snapfs), and for the merge with an off-chain dependent
  snapfs killed with QEMU left running too. After
  recovery every snapshot and the live disk read exactly as the operation's result says,
  and the layout, the backing links and `qemu-img check` of every layer are right.

And both killed with the real guest writing (live create, merge-current, merge of a frozen
snapshot whose one dependent is on the running chain), on one store, a fresh guest booted on
it for every point: QEMU is killed right after snapfs (at once, or, after a point that
follows a step, once the guest printed two more steps), and the next command runs with QEMU
dead. The guest prints `C N` only once block N is fsynced on both disks, so every value it
printed is an acknowledged write: after recovery the live layers the metadata names hold
the counter of that boot as 0..N on both disks (from one instant), N at least the last value
printed, followed only by earlier boots' blocks or zeros, never garbage; a snapshot the
create made (listed or not, as recovery decides) is crash-consistent on both disks from one
instant, within what the guest printed; after a merge every other snapshot reads as before
and the merged one is gone or whole; the layout is right and `qemu-img check` finds no
error in any layer (leaked clusters allowed: see killed_check_problems); and a fresh QEMU on
the live layers the metadata names boots the guest again, whose counter (a new boot tag)
rises there: the domain is usable after both were killed. By default one point per step
name and side (SNAPFS_CRASH_ALL_POINTS=1: every point), which keeps it to about 4 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from factory import define_domain, make_bases
from guest.counter import Record, read_counter
from guest.vm import Guest, running_guest
from helpers import image_info, qemu_check_problems, write_pattern
from livehelpers import (
    COUNTER_AREA,
    DISK_ONLY,
    DOM,
    TARGETS,
    MiB,
    PausedQemu,
    active_files,
    counter,
    digest,
    layout_problems,
    operate,
    traced,
)

import snapfs
from snapfs import qmp
from snapfs.engines.qmp import block_nodes

pytestmark = pytest.mark.timeout(300)

CRASH_STATUS = 86
WORKERS = 2


Op = tuple[str, str]  # ("create" | "merge", snapshot name): livehelpers.operate


def crash_points(root: str, op: Op, trace_dir: Path) -> list[str]:
    """Run the operation cleanly with the trace on; its step points, both sides."""
    trace = str(trace_dir / f"trace-{time.monotonic_ns()}")
    assert operate(root, *op, {"SNAPFS_TRACE_STEPS": trace}) == 0
    with open(trace) as f:
        steps = [line.strip() for line in f if line.strip()]
    assert traced(trace, steps[0].split(":")[2])
    return [f"{step}:{side}" for step in steps for side in ("before", "after")]


def crash(root: str, op: Op, point: str) -> None:
    status = operate(root, *op, {"SNAPFS_CRASH_AT": point})
    assert status == CRASH_STATUS, f"{point}: status {status}, not {CRASH_STATUS}"
    assert os.path.exists(os.path.join(root, "domains", DOM, "journal.json")), f"{point}: no journal left"


def recover(root: str) -> None:
    """What the next command does first: open the store, which finishes the journal."""
    snapfs.open_store(root)
    assert not os.path.exists(os.path.join(root, "domains", DOM, "journal.json"))


def contents(domain: snapfs.Domain, size: int = 4 * MiB) -> dict[str, dict[str, str]]:
    """name -> {target: digest of the first `size` bytes} of every snapshot (4 MiB: the whole
    disk of the small store, the first 8192 counter steps of the guest's disks)."""
    found = {}
    for name in domain.list_snapshot_names():
        found[name] = {t: digest(p, size) for t, p in domain.snapshot_lookup_by_name(name).layer_paths().items()}
    return found


_CHECKED: set[tuple] = set()


def check_problems(paths: list[str]) -> list[str]:
    """qemu-img check of each layer, once per version of its file."""
    problems = []
    for path in paths:
        st = os.stat(path)
        key = (os.path.basename(path), st.st_mtime_ns, st.st_size)  # a copied store's untouched layers hit
        if key not in _CHECKED:
            found = qemu_check_problems(path)
            problems += found
            if not found:
                _CHECKED.add(key)
    return problems


def frozen_layers(domain: snapfs.Domain) -> list[str]:
    return [p for n in domain.list_snapshot_names() for p in domain.snapshot_lookup_by_name(n).layer_paths().values()]


# ---- 1: the real guest keeps running ------------------------------------------------------------
@dataclass
class Running:
    root: str
    domain: snapfs.Domain
    guest: Guest
    made: int = 0

    def new_name(self, prefix: str) -> str:
        self.made += 1
        return f"{prefix}{self.made}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("live-crash")
    bases = make_bases(str(directory / "images"), {}, sizes={t: 40 * MiB for t in TARGETS})
    root = str(directory / "store")
    domain = define_domain(root, DOM, bases)
    real = {t: Path(p) for t, p in domain.live_layer_paths().items()}
    with running_guest(directory, real) as guest:
        domain.attach(str(guest.sock))
        yield Running(root, domain, guest)


def running_problems(r: Running) -> list[str]:
    """What must hold after every recovery while the guest runs."""
    problems = layout_problems(r.domain) + check_problems(frozen_layers(r.domain))
    live = set(r.domain.live_layer_paths().values())
    if active_files(r.guest.sock) != live:
        problems.append(f"QEMU writes {active_files(r.guest.sock)}, the metadata says {live}")
    printed = r.guest.last()
    r.guest.wait_counter(printed + 3)
    for target, path in r.domain.live_paths().items():
        if counter(path, target).last < printed + 3:
            problems.append(f"the guest's counter does not rise in the live layer of {target}")
    return problems


@dataclass
class LiveCase:
    id: str
    prepare: Callable[[Running], Op]
    check: Callable[[Running, str, dict, int], None]  # (r, subject, contents before, counter before)


def _create_args(r: Running) -> Op:
    return "create", r.new_name("c")


def _check_created(r: Running, name: str, before: dict, printed: int) -> None:
    snap = r.domain.snapshot_lookup_by_name(name)
    assert "<state>disk-snapshot</state>" in snap.get_xml_desc()
    frozen = {t: counter(p, t) for t, p in snap.layer_paths().items()}
    assert frozen["vdb"].tag == frozen["vda"].tag == r.guest.boot_tag()
    assert printed <= frozen["vdb"].last <= frozen["vda"].last <= frozen["vdb"].last + 1
    assert {n: c for n, c in contents(r.domain).items() if n != name} == before


def _merge_current_args(r: Running) -> Op:
    name = r.new_name("m")
    r.domain.snapshot_create_xml(DISK_ONLY.format(name))
    return "merge", name


def _merge_frozen_args(r: Running) -> Op:
    name = r.new_name("f")
    r.domain.snapshot_create_xml(DISK_ONLY.format(name))
    r.domain.snapshot_create_xml(DISK_ONLY.format(name + "-child"))
    return "merge", name


def _check_merged(r: Running, name: str, before: dict, printed: int) -> None:
    assert name not in r.domain.list_snapshot_names()
    del before[name]
    assert contents(r.domain) == before


LIVE_CASES = [
    LiveCase("create", _create_args, _check_created),
    LiveCase("merge-current", _merge_current_args, _check_merged),
    LiveCase("merge-frozen-on-chain", _merge_frozen_args, _check_merged),
]


@pytest.mark.parametrize("case", LIVE_CASES, ids=[c.id for c in LIVE_CASES])
def test_crash_with_the_guest_running(running: Running, case: LiveCase, tmp_path: Path) -> None:
    points = crash_points(running.root, case.prepare(running), tmp_path)
    print(f"crash points of live {case.id}: {len(points)}")
    problems: list[str] = []
    for point in points:
        op = case.prepare(running)
        subject = op[1]
        before, printed = contents(running.domain), running.guest.last()
        crash(running.root, op, point)
        recover(running.root)
        try:
            case.check(running, subject, before, printed)
        except AssertionError as exc:
            problems.append(f"{point}: {exc}")
        problems += [f"{point}: {p}" for p in running_problems(running)]
    assert problems == [], "\n".join(problems)


# ---- 2: a guest-less QEMU on a fresh copy per point, left running or killed too -------------------
@dataclass
class Template:
    root: str
    contents: dict[str, dict[str, str]]  # name -> {target: digest}; "" -> the live disk


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """r ─┬─ p            (p: a branch off the running chain)
    └─ c ── live     (the live disk, with unsaved writes)"""
    directory = tmp_path_factory.mktemp("live-crash-template")
    bases = make_bases(str(directory / "images"), {"vda": {0: 0xA1}, "vdb": {0: 0xB1}})
    root = str(directory / "store")
    domain = define_domain(root, DOM, bases)

    def write(pattern: int, offset: int) -> None:
        for target in TARGETS:
            write_pattern(domain.live_paths()[target], pattern + (target == "vdb"), offset)

    write(0x10, 0)
    domain.snapshot_create_xml("<domainsnapshot><name>r</name></domainsnapshot>")
    write(0x20, 64 * 1024)
    domain.snapshot_create_xml("<domainsnapshot><name>p</name></domainsnapshot>")
    domain.create_with_snapshot(domain.snapshot_lookup_by_name("r"))
    write(0x30, 128 * 1024)
    domain.snapshot_create_xml("<domainsnapshot><name>c</name></domainsnapshot>")
    write(0x40, 0)
    return Template(root, all_contents(domain))


def all_contents(domain: snapfs.Domain) -> dict[str, dict[str, str]]:
    found = contents(domain)
    found[""] = {t: digest(p, 4 * MiB) for t, p in domain.live_paths().items()}
    return found


@dataclass
class CopyCase:
    id: str
    op: Op
    after: Callable[[dict], dict]  # contents before -> contents after
    alive_too: bool = False  # QEMU left running too (the guest matrix covers the other cases)
    through_links: bool = False  # QEMU given the live.qcow2 symlinks (the create re-points them)


def _created(before: dict) -> dict:
    return before | {"new": before[""]}


def _merged(name: str) -> Callable[[dict], dict]:
    return lambda before: {n: c for n, c in before.items() if n != name}


COPY_CASES = [
    CopyCase("create", ("create", "new"), _created),
    CopyCase("merge-current", ("merge", "c"), _merged("c")),
    CopyCase("merge-two-dependents-one-off-chain", ("merge", "r"), _merged("r"), alive_too=True),
    CopyCase("deactivate", ("deactivate", "c"), lambda before: before, alive_too=True),
    CopyCase("create-on-symlinks", ("create", "new"), _created, alive_too=True, through_links=True),
    CopyCase("merge-current-on-symlinks", ("merge", "c"), _merged("c"), alive_too=True, through_links=True),
]


async def _nodes_on_links(sock: Path, links: set[str]) -> list[str]:
    async with qmp.connect(sock) as q:
        return [n.name for n in await block_nodes(q) if n.path in links and n.drv != "file"]


def nodes_on_links(sock: Path, links: set[str]) -> list[str]:
    """QEMU's format nodes on a live.qcow2 symlink (after a create, none: re-pointed)."""
    return trio.run(_nodes_on_links, sock, links)


def copy_point(case: CopyCase, template: Template, point: str, directory: Path, qemu_alive: bool) -> list[str]:
    directory.mkdir()
    root = str(directory / "store")
    shutil.copytree(template.root, root, symlinks=True)
    shutil.rmtree(os.path.join(root, "run"), ignore_errors=True)
    qemu = PausedQemu(root, directory, through_links=case.through_links)
    try:
        crash(root, case.op, point)
        if not qemu_alive:
            qemu.kill()
        recover(root)
        domain = snapfs.open_store(root).lookup_domain(DOM)
        problems = layout_problems(domain) + check_problems(frozen_layers(domain))
        got, want = all_contents(domain), case.after(template.contents)
        if got != want:
            wrong = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
            problems.append(f"the content of {wrong} ('': the live disk) is not what the operation makes")
        active = {os.path.realpath(f) for f in active_files(qemu.sock)} if qemu_alive else set()
        if qemu_alive and active != set(domain.live_layer_paths().values()):
            problems.append("QEMU does not write the live layers the metadata names")
        if qemu_alive and case.op[0] == "create" and nodes_on_links(qemu.sock, set(domain.live_paths().values())):
            problems.append("QEMU still runs a frozen layer through a live.qcow2 symlink")
    except AssertionError as exc:
        problems = [str(exc)]
    finally:
        qemu.kill()
    if not problems:
        shutil.rmtree(directory)
    return [f"{point} (QEMU {'alive' if qemu_alive else 'killed'}): {p}" for p in problems]


@pytest.mark.parametrize("case", COPY_CASES, ids=[c.id for c in COPY_CASES])
def test_crash_with_a_paused_qemu_alive_or_killed(case: CopyCase, template: Template, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    root = str(clean / "store")
    shutil.copytree(template.root, root, symlinks=True)
    qemu = PausedQemu(root, clean, through_links=case.through_links)
    try:
        points = crash_points(root, case.op, tmp_path)
    finally:
        qemu.kill()
    conditions = (True, False) if case.alive_too else (False,)
    print(f"crash points of paused-QEMU {case.id}: {len(points)} x {len(conditions)}")
    runs = [(point, alive) for point in points for alive in conditions]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(
            lambda ir: copy_point(case, template, ir[1][0], tmp_path / f"p{ir[0]}", ir[1][1]), enumerate(runs)
        )
        problems = [p for result in results for p in result]
    assert problems == [], "\n".join(problems)


# ---- 3: the real guest writing, both killed --------------------------------------------------------
@dataclass
class Killed:
    """One store across the points; a fresh guest boots on its live layers for each point."""

    root: str
    directory: Path
    made: int = 0  # names made so far (Running.new_name)
    boots: int = 0
    tags: set[str] = field(default_factory=set)  # boot tags of every guest so far


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Killed:
    directory = tmp_path_factory.mktemp("live-crash-killed")
    bases = make_bases(str(directory / "images"), {}, sizes={t: 40 * MiB for t in TARGETS})
    root = str(directory / "store")
    define_domain(root, DOM, bases)
    return Killed(root, directory)


def killed_points(points: list[str]) -> list[str]:
    """The points run with both killed: all of them with SNAPFS_CRASH_ALL_POINTS=1, else one
    per step name and side (a step done per disk or per layer repeats its name): its first
    occurrence before it, its last after it, so every kind of step is cut on both sides."""
    if os.environ.get("SNAPFS_CRASH_ALL_POINTS") == "1":
        return points
    chosen: dict[tuple[str, str], str] = {}
    for point in points:
        _, _, kind, side = point.split(":")
        if side == "after" or (kind, side) not in chosen:
            chosen[kind, side] = point
    return [p for p in points if p in chosen.values()]


_LEAKY: dict[tuple, int] = {}


def killed_check_problems(paths: list[str]) -> list[str]:
    """check_problems, where leaked clusters are allowed (`qemu-img check` status 3: leaks, no
    corruption): QEMU killed while it writes a layer may leave clusters counted but unused
    (space only, never content; `qemu-img check -r leaks` frees them), and a later create
    freezes that layer with them."""
    problems = []
    for path in paths:
        st = os.stat(path)
        key = (os.path.basename(path), st.st_mtime_ns, st.st_size)
        if key in _CHECKED or key in _LEAKY:
            continue
        args = ["qemu-img", "check", "-U", "-f", "qcow2", "--output=json", path]
        run = subprocess.run(args, capture_output=True, text=True)
        if run.returncode == 3 and not image_problems(path):
            _LEAKY[key] = json.loads(run.stdout)["leaks"]
        else:
            problems += check_problems([path])
    return problems


def image_problems(path: str) -> list[str]:
    info = image_info(path)
    if info.get("dirty-flag") or info.get("format-specific", {}).get("data", {}).get("corrupt"):
        return [f"{path}: dirty or corrupt"]
    return []


def written(blocks: list, disk: str, tag: str) -> int:
    """N where blocks 0..N hold the counter of boot `tag` in order (-1: none): a fresh boot
    writes over an earlier boot's blocks from 0, so what follows is an earlier boot's record
    at its own index, or zeros, never garbage or this boot's (asserts it)."""
    last = -1
    while last + 1 < len(blocks) and blocks[last + 1] == Record(tag, disk, last + 1):
        last += 1
    for i, block in enumerate(blocks[last + 1 :], last + 1):
        stale = isinstance(block, Record) and block.tag != tag and block.disk == disk and block.n == i
        assert block is None or stale, f"{disk}: block {i} is {block!r} after the counter of {tag} up to {last}"
    return last


def written_both(paths: dict[str, str], tag: str) -> int:
    """written() of both disks, from one instant: vda is written first (vdb's N is vda's or
    one less); vdb's N."""
    got = {t: written(read_counter(p, COUNTER_AREA), t, tag) for t, p in paths.items()}
    assert got["vdb"] <= got["vda"] <= got["vdb"] + 1, f"the disks are not from one instant: {got}"
    return got["vdb"]


@contextmanager
def boot(k: Killed) -> Iterator[tuple[snapfs.Domain, Guest]]:
    """A fresh guest (a new boot tag) on the live layers the metadata names, attached, once it
    wrote a few steps there: the domain is usable (after the previous point's crash)."""
    k.boots += 1
    directory = k.directory / f"boot{k.boots}"
    directory.mkdir()
    domain = snapfs.open_store(k.root).lookup_domain(DOM)
    real = {t: Path(p) for t, p in domain.live_layer_paths().items()}
    with running_guest(directory, real) as guest:
        tag = guest.boot_tag()
        assert tag not in k.tags, "the boot tag is not new"
        k.tags.add(tag)
        domain.attach(str(guest.sock))
        guest.wait_counter(3)
        for target, path in domain.live_paths().items():  # one disk after the other: it still writes
            assert written(read_counter(path, COUNTER_AREA), target, tag) >= 3, f"no counter rising in {path}"
        yield domain, guest


def both_killed_point(k: Killed, case: LiveCase, point: str) -> tuple[str, list[str]]:
    """Boot, let the guest write, the operation killed at `point`, QEMU killed while the guest
    writes (at once after a point before a step; after a point after one, once the guest
    printed two more steps: so that acknowledged writes into whatever layer QEMU was on
    when snapfs died must be found again), the next command with QEMU dead; (what became of
    the subject, problems)."""
    with boot(k) as (domain, guest):
        r = Running(k.root, domain, guest, k.made)
        op = case.prepare(r)
        k.made = r.made
        subject = op[1]
        before, printed_before = contents(domain), guest.last()
        crash(k.root, op, point)
        if point.endswith(":after"):  # QEMU dies once the guest wrote on after snapfs did
            guest.wait_counter(guest.last() + 2)
        guest.proc.kill()
    printed, tag = guest.last(), guest.boot_tag()  # the console read to its end: every acknowledged step
    recover(k.root)
    domain = snapfs.open_store(k.root).lookup_domain(DOM)
    layers = frozen_layers(domain) + list(domain.live_layer_paths().values())
    problems = layout_problems(domain) + killed_check_problems(layers)
    try:
        live = written_both(domain.live_paths(), tag)
        assert live >= printed, f"the live disks hold the counter up to {live}, the guest printed {printed}"
        after = contents(domain)
        listed = subject in after
        if case.id == "create" and listed:
            made = written_both(domain.snapshot_lookup_by_name(subject).layer_paths(), tag)
            assert printed_before <= made <= live, f"{subject} holds {made}, not within [{printed_before}, {live}]"
            assert "<state>disk-snapshot</state>" in domain.snapshot_lookup_by_name(subject).get_xml_desc()
        if case.id != "create" and listed:
            assert after[subject] == before[subject], f"{subject} is listed, not whole"
        others = {n: c for n, c in after.items() if n != subject}
        assert others == {n: c for n, c in before.items() if n != subject}, "another snapshot changed"
    except (AssertionError, subprocess.CalledProcessError, snapfs.SnapfsError) as exc:
        problems.append(str(exc))
        listed = None
    fate = (
        {None: "?", True: "kept", False: "gone"}[listed]
        if case.id != "create"
        else {None: "?", True: "made", False: "not made"}[listed]
    )
    return fate, [f"{point}: {p}" for p in problems]


@pytest.mark.parametrize("case", LIVE_CASES, ids=[c.id for c in LIVE_CASES])
def test_crash_both_killed_with_the_guest_writing(killed: Killed, case: LiveCase, tmp_path: Path) -> None:
    with boot(killed) as (domain, guest):
        r = Running(killed.root, domain, guest, killed.made)
        points = crash_points(killed.root, case.prepare(r), tmp_path)
        killed.made = r.made
    chosen = killed_points(points)
    print(f"crash points of live {case.id}, both killed: {len(chosen)} of {len(points)}")
    problems: list[str] = []
    for point in chosen:
        fate, found = both_killed_point(killed, case, point)
        print(f"  {point}: {fate}")
        problems += found
    with boot(killed):
        pass  # usable after the last point
    print(f"layers with leaked clusters (QEMU killed while writing them): {len(_LEAKY)}")
    assert problems == [], "\n".join(problems)
