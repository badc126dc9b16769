"""What the running-VM tests share (tests/test_live.py, tests/test_live_crash.py): the CLI,
the guest's counter and content read out of images QEMU holds (no locks taken), QEMU's
active files, the step trace."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from factory import define_domain, make_bases
from guest.counter import Counter, check_consistent, read_counter
from guest.vm import Guest, qemu_command
from helpers import SNAPFS, write_pattern

import snapfs
from snapfs import layerlock, qmp

DOM = "vm1"
TARGETS = ("vda", "vdb")
MiB = 1 << 20
COUNTER_AREA = 8 * MiB  # the counter's blocks (16384 steps: about 14 minutes of guest writes)
PATTERN_AT = 16 * MiB  # patterns the tests write, above the counter
DATA_AREA = 32 * MiB  # where the guest and the tests write
CLUSTER = 64 * 1024
DISK_ONLY = "<domainsnapshot><name>{}</name><memory snapshot='no'/></domainsnapshot>"


def cli(root: str, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")} | (env or {})
    run = subprocess.run([SNAPFS, "--store", root, *args], capture_output=True, text=True, timeout=120, env=environment)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def counter(image: str, disk: str) -> Counter:
    """(boot tag, N) of a crash-consistent counter in `image` (asserts it)."""
    return check_consistent(read_counter(image, COUNTER_AREA), disk)


def digest(image: str, size: int = DATA_AREA) -> str:
    """The content of a frozen image (with its chain) where the tests write (its first `size` bytes),
    remembered while no file of its chain changes (a stream rewrites the file it goes into)."""
    key = (size, *_chain_stats(image))
    if key not in _DIGESTS:
        with tempfile.TemporaryDirectory(prefix="snapfs-digest-") as tmp:
            raw = os.path.join(tmp, "disk.raw")
            count = f"count={size // MiB}"
            subprocess.run(
                ["qemu-img", "dd", "-U", "-O", "raw", "bs=1M", count, f"if={image}", f"of={raw}"], check=True
            )
            with open(raw, "rb") as f:
                _DIGESTS[key] = hashlib.sha256(f.read()).hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


def _chain_stats(image: str) -> Iterator[tuple]:
    path: str | None = image
    while path:
        st = os.stat(path)
        yield os.path.basename(path), st.st_mtime_ns, st.st_size  # a copied store hits too
        fd = layerlock.open_regular(path, follow=True)
        try:
            header = layerlock.read_header(fd)
        finally:
            os.close(fd)
        backing = header.backing if header else None
        path = os.path.join(os.path.dirname(path), backing) if backing else None


def has_pattern(image: str, pattern: int, offset: int, length: int = CLUSTER) -> bool:
    """Whether the image reads `pattern` there (read without locks: QEMU holds it)."""
    command = f"read -P {pattern:#x} {offset} {length}"
    done = subprocess.run(["qemu-io", "-U", "-r", "-c", command, image], capture_output=True, text=True)
    return done.returncode == 0 and f"read {length}/{length}" in done.stdout and "fail" not in done.stdout


async def _active_files(sock: Path) -> set[str]:
    """Each device's active node's protocol child (its `file` edge in QEMU's block graph)
    names the file plainly; the node's own name may be a json:{...} QEMU cuts at 4 KiB."""
    async with qmp.connect(sock) as q:
        nodes = {n["node-name"]: n for n in await q.execute("query-named-block-nodes", flat=True)}
        graph = await q.execute("x-debug-query-block-graph")
        ids = {node["name"]: node["id"] for node in graph["nodes"]}
        names = {node["id"]: node["name"] for node in graph["nodes"]}
        files = set()
        for block in await q.execute("query-block"):
            active = ids[block["inserted"]["node-name"]]
            child = next(e["child"] for e in graph["edges"] if e["parent"] == active and e["name"] == "file")
            files.add(nodes[names[child]]["file"])
        return files


def active_files(sock: str | Path) -> set[str]:
    """The real files QEMU's devices write now."""
    return trio.run(_active_files, Path(sock))


def traced(trace: str, kind: str) -> bool:
    try:
        with open(trace) as f:
            return any(line.strip().split(":")[2] == kind for line in f if line.count(":") >= 2)
    except FileNotFoundError:
        return False


async def hmp(sock: Path, command: str) -> None:
    async with qmp.connect(sock) as q:
        out = await q.hmp(command, timeout=120)
        assert "error" not in out.lower(), out


async def _jobs(sock: Path) -> list[dict]:
    async with qmp.connect(sock, timeout=5) as q:
        return await q.execute("query-block-jobs")


def block_jobs(sock: str | Path) -> list[dict]:
    """QEMU's block jobs now (snapfs must not hold the socket: QEMU serves one client)."""
    return trio.run(_jobs, Path(sock))


def header_backing(path: str) -> str | None:
    """The backing link in a qcow2 header, read in-process (no qemu-img, no lock)."""
    return layerlock.header_backing(path, follow=True)


@dataclass
class LiveDomain:
    """A domain whose guest runs (test_live.py, test_live_attached.py)."""

    root: str
    domain: snapfs.Domain
    guest: Guest
    patterns: dict[str, int]  # name -> the pattern its layer holds (at PATTERN_AT + index * CLUSTER)

    def snap(self, name: str) -> snapfs.Snapshot:
        return self.domain.snapshot_lookup_by_name(name)


def define_with_snapshots(
    directory: Path,
    disk_size: int,
    names: tuple[str, ...],
    first_pattern: int,
    branch_from: dict[str, str] | None = None,
) -> tuple[str, snapfs.Domain, dict[str, int]]:
    """A two-disk domain in `directory` with a snapshot per name, each over a distinct
    pattern at PATTERN_AT + index * CLUSTER on both disks (a name in `branch_from` is made
    after a revert to the snapshot it names): (store root, domain, name -> pattern)."""
    bases = make_bases(str(directory / "images"), {}, sizes={t: disk_size for t in TARGETS})
    root = str(directory / "store")
    domain = define_domain(root, DOM, bases)
    patterns: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in (branch_from or {}):
            domain.create_with_snapshot(domain.snapshot_lookup_by_name(branch_from[name]))
        patterns[name] = first_pattern + index
        for target in TARGETS:
            write_pattern(domain.live_paths()[target], patterns[name], PATTERN_AT + index * CLUSTER)
        domain.snapshot_create_xml(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
    return root, domain, patterns


def frozen_state(live: LiveDomain) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """name -> (layer paths, content digests) of every snapshot."""
    found = {}
    for name in live.domain.list_snapshot_names():
        paths = live.snap(name).layer_paths()
        found[name] = (paths, {t: digest(p) for t, p in paths.items()})
    return found


def assert_guest_writes_live(live: LiveDomain) -> None:
    """The guest goes on writing its counter into every live layer (read through the symlink)."""
    printed = live.guest.last()
    live.guest.wait_counter(printed + 3)
    for target, path in live.domain.live_paths().items():
        now = counter(path, target)
        assert now.tag == live.guest.boot_tag() and now.last >= printed + 3


def check_snapshot(live: LiveDomain, name: str, before: int) -> Counter:
    """A disk-only snapshot made while the guest printed `before` or later: both disks
    crash-consistent from one instant (vda is written first, so vdb's N is vda's or one less)."""
    snap = live.snap(name)
    assert "<state>disk-snapshot</state>" in snap.get_xml_desc()
    frozen = {t: counter(p, t) for t, p in snap.layer_paths().items()}
    assert {c.tag for c in frozen.values()} == {live.guest.boot_tag()}
    assert before <= frozen["vdb"].last <= frozen["vda"].last <= frozen["vdb"].last + 1
    return frozen["vda"]


def layout_problems(domain) -> list[str]:
    """helpers.layout_problems without a qemu-img per layer (these tests check a store after
    every crash point): per disk, live.qcow2 a symlink to the live layer's real file, the
    directory holding exactly the layers the metadata names, every backing link as the
    snapshot tree says."""
    snaps = [domain.snapshot_lookup_by_name(name) for name in domain.list_snapshot_names()]
    layers = {s.name: s.layer_paths() for s in snaps}
    parents = {s.name: (p.name if (p := s.get_parent()) else None) for s in snaps}
    current = domain.current_snapshot()
    problems = []
    for target, link in domain.live_paths().items():
        real = domain.live_layer_paths()[target]
        if os.readlink(link) != os.path.basename(real):
            problems.append(f"{target}: {link} does not lead to {real}")
        want = {"live.qcow2", os.path.basename(real), *(os.path.basename(p[target]) for p in layers.values())}
        have = set(os.listdir(os.path.dirname(link)))
        if have != want:
            problems.append(f"{target}: orphan {sorted(have - want)} missing {sorted(want - have)}")
        base = domain.base_paths()[target]

        def link_to(name: str | None, base: str = base, target: str = target) -> str:
            return base if name is None else os.path.basename(layers[name][target])

        for name, paths in layers.items():
            if os.path.exists(paths[target]) and header_backing(paths[target]) != link_to(parents[name]):
                problems.append(f"{target}: the layer of {name!r} is not on {link_to(parents[name])}")
        if header_backing(real) != link_to(current.name if current else None):
            problems.append(f"{target}: the live layer is not on the current snapshot's layer")
    return problems


# ---- an operation in a process of its own, quickly -------------------------------------------
# The crash matrices kill snapfs at hundreds of points: a fresh CLI costs a second of imports
# each time, a child forked from a server that imported snapfs once costs milliseconds, and
# runs the same API code (the CLI is a front end over it).
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["snapfs.api", "snapfs.engines.qmp", "livehelpers"])


def _operate(root: str, operation: str, name: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    domain = snapfs.open_store(root).lookup_domain(DOM)
    if operation == "create":
        domain.snapshot_create_xml(DISK_ONLY.format(name))
    elif operation == "deactivate":
        domain.snapshot_lookup_by_name(name).deactivate(snapfs.DeactivateFlags.NONE)
    else:
        domain.snapshot_lookup_by_name(name).deactivate(snapfs.DeactivateFlags.MERGE)


def operate(root: str, operation: str, name: str, env: dict[str, str] | None = None) -> int:
    """Run `create` (a disk-only snapshot `name`), `merge` or `deactivate` (of `name`) through
    the API in a child process; its exit status (0: done)."""
    child = _FORKS.Process(target=_operate, args=(root, operation, name, env or {}))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
        child.join()
    return child.exitcode if child.exitcode is not None else -9


class PausedQemu:
    """QEMU on a store's live layers, its guest never started (-S): it holds the files, answers
    QMP, runs jobs, and writes nothing."""

    def __init__(self, root: str, directory: Path, through_links: bool = False) -> None:
        domain = snapfs.open_store(root).lookup_domain(DOM)
        self.sock = directory / "qmp.sock"
        paths = domain.live_paths() if through_links else domain.live_layer_paths()
        disks = {t: Path(p) for t, p in paths.items()}
        self.proc = subprocess.Popen([*qemu_command(self.sock, disks), "-S"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (self.sock.exists() and _answers(self.sock)):
            assert self.proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.05)
        domain.attach(str(self.sock))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _answers(sock: Path) -> bool:
    return trio.run(qmp.answers, sock)
