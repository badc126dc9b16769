"""Crash at every step of every journalled operation, then reopen: DESIGN section 5.

One template store is built once (vm1: vda on a qcow2 base, vdb on a raw base, 4 MiB,
64 KiB clusters) with this snapshot tree, every layer holding distinct qemu-io patterns
(some of them zero clusters hiding base data):

    r ─┬─ p ── q
       ├─ k ─┬─ k1
       │     └─ k2
       └─ c ── c2 ── (live, with unsaved writes)

For each case (an operation on that tree, through the CLI) the step list is discovered
with SNAPFS_TRACE_STEPS on a clean run, which must itself give the expected result. Then,
for every step point and both sides of it (before/after), a fresh copy of the template
runs the operation with SNAPFS_CRASH_AT=<point>, which must die with status 86 leaving
its journal behind. The store is reopened through the CLI (and, for one point per
case, through a fresh mount first) and must show the operation fully done: the journal
is written before the first step, so every crash is rolled forward. Checked each time:
the snapshots, their parents, current, descriptions and compression as the user sees
them; every snapshot's and the live disk's content byte for byte; no journal, no
temporary, orphan or missing file; every backing link as the metadata says; `qemu-img
check` clean on every layer; the base images never written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from conftest import BASE_WRITES
from factory import define_domain, make_bases
from fsfixtures import Mount
from helpers import (
    CLUSTER,
    DISK_SIZE,
    SNAPFS,
    MiB,
    expected_content,
    file_digest,
    has_pattern,
    image_info,
    read_raw,
    store_integrity_problems,
    write_pattern,
    write_zeros,
)
from model import Model

import snapfs

pytestmark = pytest.mark.timeout(400)

TARGETS = ("vda", "vdb")
DOM = "vm1"
CRASH_STATUS = 86
WORKERS = 3

Content = tuple  # sorted ((offset, pattern), ...) cluster writes over zeros; pattern 0 = zeros


def content_of(writes: dict[int, int]) -> Content:
    return tuple(sorted(writes.items()))


@functools.cache
def content_digest(content: Content) -> str:
    return hashlib.sha256(expected_content(dict(content), DISK_SIZE)).hexdigest()


BASE = {t: content_of(BASE_WRITES[t]) for t in TARGETS}


# ---- building the template ----------------------------------------------------------------
class Builder:
    """Drives the API in-process and keeps the model in step."""

    def __init__(self, domain: snapfs.Domain) -> None:
        self.domain = domain
        self.model = Model(BASE)
        self.live_writes = {t: dict(BASE_WRITES[t]) for t in TARGETS}
        self.pattern = 0x20

    def write(self, *offsets: int, zeros: bool = False) -> None:
        for target in TARGETS:
            live = self.domain.live_paths()[target]
            for offset in offsets:
                if zeros:
                    write_zeros(live, offset)
                    self.live_writes[target][offset] = 0
                else:
                    write_pattern(live, self.pattern, offset)
                    self.live_writes[target][offset] = self.pattern
                    self.pattern += 1
            self.model.live[target] = content_of(self.live_writes[target])

    def create(self, name: str) -> None:
        self.domain.snapshot_create_xml(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
        self.model = self.model.create(name)

    def revert(self, name: str) -> None:
        self.domain.create_with_snapshot(self.domain.snapshot_lookup_by_name(name))
        self.model = self.model.revert(name)
        self.live_writes = {t: dict(self.model.live[t]) for t in TARGETS}


def build_tree(b: Builder) -> None:
    b.write(0, 5 * CLUSTER)
    b.create("r")
    b.write(0, 1 * MiB + CLUSTER)
    b.write(2 * MiB, zeros=True)  # hides base data on vdb
    b.create("p")
    b.write(5 * CLUSTER, 3 * MiB)
    b.create("q")
    b.revert("r")
    b.write(1 * MiB, zeros=True)  # hides base data on vda
    b.write(CLUSTER, 2 * CLUSTER)
    b.create("k")
    b.write(CLUSTER, 7 * CLUSTER)
    b.create("k1")
    b.revert("k")
    b.write(2 * CLUSTER, 8 * CLUSTER)
    b.create("k2")
    b.revert("r")
    b.write(0, 9 * CLUSTER, 3 * MiB + CLUSTER)
    b.create("c")
    b.write(9 * CLUSTER, 10 * CLUSTER)
    b.create("c2")
    b.write(0, 11 * CLUSTER)  # unsaved live changes


@dataclass
class Template:
    root: str  # the store
    model: Model
    base_digests: dict[str, str]
    xml_dir: str


def make_template(directory: str, prepare=None) -> Template:
    os.makedirs(directory)
    bases = make_bases(directory, BASE_WRITES, prefix="base-")
    domain = define_domain(os.path.join(directory, "store"), DOM, bases)
    b = Builder(domain)
    build_tree(b)
    if prepare:
        prepare(b)
    template = Template(
        os.path.join(directory, "store"), b.model, {p: file_digest(p) for p, _ in bases.values()}, directory
    )
    with open(os.path.join(directory, "newz.xml"), "w") as f:
        f.write(
            "<domainsnapshot><name>newz</name><description>zstd, made in a crash test</description>"
            "<compression>zstd</compression></domainsnapshot>"
        )
    problems = check_store(template.root, template.model, template)
    assert problems == [], problems
    return template


def grow_dependents(b: Builder) -> None:
    """q gets a child over four times its size (qbig: 30 clusters, one of them zeros over
    q's data) and the live disk, back on c2, the same over c2: a merge of q or c2 then
    has its one dependent pull S's data (pull steps) instead of the commit."""
    b.revert("q")
    b.write(*(i * CLUSTER for i in range(12, 41)))
    b.write(5 * CLUSTER, zeros=True)
    b.create("qbig")
    b.revert("c2")
    b.write(*(i * CLUSTER for i in range(20, 49)))
    b.write(9 * CLUSTER, zeros=True)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Two templates: the tree above, and the same with the live disk moved onto k."""
    made: dict[str, Template] = {}

    def get(kind: str) -> Template:
        if kind not in made:
            directory = str(tmp_path_factory.mktemp("crash-template") / kind)
            prepare = None
            if kind == "live-on-k":

                def prepare(b: Builder) -> None:
                    b.revert("k")
                    b.write(CLUSTER, 12 * CLUSTER)

            elif kind == "big-dependents":
                prepare = grow_dependents

            made[kind] = make_template(directory, prepare)
        return made[kind]

    return get


# ---- the cases --------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    operation: str  # the journal's name for it
    args: list  # CLI words after --store S ('{xml}' is replaced by the template's XML dir)
    after: object  # Model -> Model
    kinds: set  # step kinds the plan must contain (proves the intended branch was taken)
    template: str = "tree"
    compressed: tuple | None = None  # (snapshot, kind) whose layers must now be compressed
    absent: frozenset = frozenset()  # step kinds the plan must not contain (the other branch)


CASES = [
    Case(
        "create",
        "create",
        ["snapshot-create-as", DOM, "new", "made in a crash test"],
        lambda m: m.create("new", "made in a crash test"),
        {"meta_write", "overlay", "link", "state"},
    ),
    Case(
        "create-zstd",
        "create",
        ["snapshot-create", DOM, "{xml}/newz.xml"],
        lambda m: m.create("newz", "zstd, made in a crash test", "zstd"),
        {"recompress", "overlay"},
        compressed=("newz", "zstd"),
    ),
    Case(
        "revert",
        "revert",
        ["create-with-snapshot", DOM, "q"],
        lambda m: m.revert("q"),
        {"overlay", "link", "state", "delete"},
    ),
    Case(
        "merge-0-dependents",
        "merge",
        ["snapshot-deactivate", DOM, "q", "--merge"],
        lambda m: m.merge("q"),
        {"meta_delete", "delete"},
    ),
    Case(
        "merge-1-child",
        "merge",
        ["snapshot-deactivate", DOM, "p", "--merge"],
        lambda m: m.merge("p"),
        {"commit", "rename", "meta_write", "meta_delete"},
        absent=frozenset({"pull"}),
    ),
    Case(
        "merge-1-live",
        "merge",
        ["snapshot-delete", DOM, "c2"],
        lambda m: m.merge("c2"),
        {"commit", "rename"},
        absent=frozenset({"pull"}),
    ),
    Case(
        "merge-1-child-pulls",
        "merge",
        ["snapshot-deactivate", DOM, "q", "--merge"],
        lambda m: m.merge("q"),
        {"pull", "delete", "meta_write", "meta_delete"},
        template="big-dependents",
        absent=frozenset({"commit", "rename"}),
    ),
    Case(
        "merge-1-live-pulls",
        "merge",
        ["snapshot-delete", DOM, "c2"],
        lambda m: m.merge("c2"),
        {"pull", "delete", "meta_delete"},
        template="big-dependents",
        absent=frozenset({"commit", "rename"}),
    ),
    Case(
        "merge-2-children",
        "merge",
        ["snapshot-deactivate", DOM, "k", "--mergeforce"],
        lambda m: m.merge("k"),
        {"rebase", "delete", "meta_write"},
    ),
    Case(
        "merge-2-children-and-live",
        "merge",
        ["snapshot-deactivate", DOM, "k", "--merge"],
        lambda m: m.merge("k"),
        {"rebase", "delete", "meta_write"},
        template="live-on-k",
    ),
    Case(
        "discard",
        "discard",
        ["snapshot-deactivate", DOM, "k1", "--delete"],
        lambda m: m.discard("k1"),
        {"meta_delete", "delete"},
    ),
    Case(
        "discard-force-live-outside",
        "discard-force",
        ["snapshot-deactivate", DOM, "k", "--deleteforce"],
        lambda m: m.discard_force("k"),
        {"meta_delete", "delete"},
    ),
    Case(
        "discard-force-live-inside",
        "discard-force",
        ["snapshot-deactivate", DOM, "c", "--deleteforce"],
        lambda m: m.discard_force("c"),
        {"overlay", "link", "meta_delete", "delete"},
    ),
    Case("deactivate", "deactivate", ["snapshot-deactivate", DOM, "c"], lambda m: m.deactivate("c"), {"rebase"}),
    Case("rename", "rename", ["snapshot-rename", DOM, "k", "kk"], lambda m: m.rename("k", "kk"), {"meta_write"}),
    Case(
        "description",
        "description",
        ["snapshot-desc", DOM, "k", "new words"],
        lambda m: m.describe("k", "new words"),
        {"meta_write"},
    ),
    Case(
        "compress-gzip",
        "compression",
        ["snapshot-compress", DOM, "p", "gzip"],
        lambda m: m.compress("p", "gzip"),
        {"recompress", "meta_write"},
        compressed=("p", "gzip"),
    ),
    Case(
        "compress-zstd",
        "compression",
        ["snapshot-compress", DOM, "c2", "zstd"],
        lambda m: m.compress("c2", "zstd"),
        {"recompress", "meta_write"},
        compressed=("c2", "zstd"),
    ),
]


# ---- running and checking ---------------------------------------------------------------
def cli(root: str, args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    env.update(env_extra or {})
    return subprocess.run([SNAPFS, "--store", root, *args], capture_output=True, text=True, env=env, timeout=120)


def case_args(case: Case, template: Template) -> list[str]:
    return [a.replace("{xml}", template.xml_dir) for a in case.args]


def fresh_copy(template: Template, directory: str) -> str:
    root = os.path.join(directory, "store")
    shutil.copytree(template.root, root, symlinks=True)
    return root


def user_view_problems(root: str, model: Model) -> list[str]:
    """What `snapfs list` shows (this is also the reopen that recovers the store); the
    names and parents are read from the metadata the CLI reads, in check_store."""
    listed = cli(root, ["list"])
    if listed.returncode != 0:
        return [f"snapfs list failed: {listed.stderr}"]
    rows = [line.split() for line in listed.stdout.splitlines()[2:] if line]
    want = [DOM, str(len(model.snaps)), model.current or "-"]
    if rows != [want]:
        return [f"snapfs list shows {rows}, want {[want]}"]
    return []


def check_store(root: str, model: Model, template: Template, compressed: tuple | None = None) -> list[str]:
    """Everything about the store against the model (the store must already be recovered)."""
    problems = store_integrity_problems(root, DOM)
    domain = snapfs.Store(snapfs.api.open_store_core(root)).lookup_domain(DOM)
    snaps = {name: domain.snapshot_lookup_by_name(name) for name in domain.list_snapshot_names()}
    if sorted(snaps) != sorted(model.snaps):
        return problems + [f"metadata has snapshots {sorted(snaps)}, want {sorted(model.snaps)}"]
    current = domain.current_snapshot()
    cur = current.name if current else None
    if cur != model.current:
        problems.append(f"current is {cur!r}, want {model.current!r}")
    for name, want in model.snaps.items():
        snap = snaps[name]
        parent = snap.get_parent()
        parent = parent.name if parent else None
        if parent != want.parent:
            problems.append(f"parent of {name!r} is {parent!r}, want {want.parent!r}")
        if (snap.get_description(), snap.get_compression()) != (want.description, want.compression):
            problems.append(f"{name!r}: description/compression {snap.get_description()!r}/{snap.get_compression()}")
        for target, layer in snap.layer_paths().items():
            if os.path.exists(layer) and content_digest(want.content[target]) != _digest(layer):
                problems.append(f"content of snapshot {name!r} disk {target} is wrong")
    for target, live in domain.live_paths().items():
        if os.path.exists(live) and content_digest(model.live[target]) != _digest(live):
            problems.append(f"content of the live disk {target} is wrong")
    for path, digest in template.base_digests.items():
        if file_digest(path) != digest:
            problems.append(f"base image {path} was written")
    if compressed and compressed[0] in snaps:
        name, kind = compressed
        for target in TARGETS:
            problems += _compression_problems(snaps[name].layer_paths()[target], kind)
    return problems


def _digest(path: str) -> str:
    return hashlib.sha256(read_raw(path)).hexdigest()


def _compression_problems(layer: str, kind: str) -> list[str]:
    header = image_info(layer)["format-specific"]["data"].get("compression-type")
    if header != {"gzip": "zlib", "zstd": "zstd"}[kind]:
        return [f"{layer}: compression type {header}, want {kind}"]
    run = subprocess.run(["qemu-img", "check", "-U", "--output=json", layer], capture_output=True, text=True)
    stats = json.loads(run.stdout)
    if not stats.get("allocated-clusters") or stats.get("compressed-clusters") != stats.get("allocated-clusters"):
        return [f"{layer}: not all clusters compressed: {stats}"]
    return []


def discover(case: Case, template: Template, directory: str) -> list[str]:
    """The step points of a clean run, which must itself give the expected result."""
    os.makedirs(directory)
    root = fresh_copy(template, directory)
    trace = os.path.join(directory, "trace")
    run = cli(root, case_args(case, template), {"SNAPFS_TRACE_STEPS": trace})
    assert run.returncode == 0, run.stderr
    with open(trace) as f:
        points = [line.strip() for line in f if line.strip()]
    assert points and all(p.startswith(case.operation + ":") for p in points), points
    # every step once; overlays that need no record between them run side by side, so
    # their points may come in either order
    assert sorted(int(p.split(":")[1]) for p in points) == list(range(len(points))), points
    kinds = {p.split(":")[2] for p in points}
    assert case.kinds <= kinds, f"the plan has steps {kinds}, not the expected {case.kinds}"
    assert not case.absent & kinds, f"the plan has steps {kinds}, none of {case.absent} expected"
    want = case.after(template.model)
    problems = user_view_problems(root, want) + check_store(root, want, template, case.compressed)
    assert problems == [], problems
    shutil.rmtree(directory)
    return points


def mount_view_problems(root: str, mnt: str, model: Model) -> list[str]:
    """Reopen through a fresh mount (which recovers the store before serving)."""

    mount = Mount(root, mnt)
    problems = []
    try:
        mount.start()
        snaps = os.path.join(mnt, DOM, "snapshots")
        names = sorted(os.listdir(snaps))
        if names != sorted(model.snaps):
            problems.append(f"the mount shows {names}, want {sorted(model.snaps)}")
        link = os.path.join(mnt, DOM, "current")
        shown = os.readlink(link) if os.path.lexists(link) else None
        want = f"snapshots/{model.current}" if model.current else None
        if shown != want:
            problems.append(f"the mount's current -> {shown!r}, want {want!r}")
        for name in set(names) & set(model.snaps):
            link = os.path.join(snaps, name, "parent")
            shown = os.readlink(link) if os.path.lexists(link) else None
            parent = model.snaps[name].parent
            if shown != (f"../{parent}" if parent else None):
                problems.append(f"the mount's {name}/parent -> {shown!r}, want {parent!r}")
            with open(os.path.join(snaps, name, "description")) as f:
                text = f.read()
            if text.rstrip("\n") != model.snaps[name].description:
                problems.append(f"the mount's {name}/description is {text!r}")
    except BaseException as exc:  # pytest.fail from Mount.start, OSError from the mount
        problems.append(f"mount: {type(exc).__name__}: {exc}")
    finally:
        problems += stop_mount(mount)
    return problems


def stop_mount(mount) -> list[str]:
    """Unmount; a daemon that did not end cleanly, or a dead mount left behind (which
    os.path.ismount does not see), is a problem, and is cleared."""
    code = mount.stop()
    problems = [] if code == 0 else [f"the mount daemon ended with status {code}: {mount.log()[-2000:]}"]
    if code != 0 and mount.unmount_errors:
        problems.append(f"fusermount3 -u said: {mount.unmount_errors[-1]}")
    try:
        os.stat(mount.path)
    except OSError as exc:
        subprocess.run(["fusermount3", "-u", "-z", mount.path], capture_output=True)
        problems.append(f"a dead mount was left behind ({exc}): {mount.log()[-2000:]}")
    return problems


def crash_point(case: Case, template: Template, point: str, directory: str, via_mount: bool) -> list[str]:
    os.makedirs(directory)
    root = fresh_copy(template, directory)
    run = cli(root, case_args(case, template), {"SNAPFS_CRASH_AT": point})
    if run.returncode != CRASH_STATUS:
        return [f"{point}: exit status {run.returncode}, not {CRASH_STATUS}: {run.stderr.strip()}"]
    if not os.path.exists(os.path.join(root, "domains", DOM, "journal.json")):
        return [f"{point}: the crash left no journal"]
    want = case.after(template.model)
    problems = []
    if via_mount:
        problems += mount_view_problems(root, os.path.join(directory, "mnt"), want)
    problems += user_view_problems(root, want)
    problems += check_store(root, want, template, case.compressed)
    if not problems:
        shutil.rmtree(directory)
    return [f"{point}: {p}" for p in problems]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crash_at_every_step(case: Case, templates, tmp_path):
    template = templates(case.template)
    steps = discover(case, template, str(tmp_path / "clean"))
    points = [f"{s}:{when}" for s in steps for when in ("before", "after")]
    print(f"crash points of {case.id}: {len(points)}")  # the matrix's size, summed in the report
    sample = points[len(points) // 2]  # reopened through a fresh mount too
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(
            lambda ip: crash_point(case, template, ip[1], str(tmp_path / f"p{ip[0]}"), ip[1] == sample),
            enumerate(points),
        )
        problems = [p for result in results for p in result]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("case_id", ["merge-1-child-pulls", "merge-1-live-pulls"])
def test_pull_recovers_a_header_written_before_its_copies(case_id, templates, tmp_path):
    """The worst a kill of an in-place rebase can leave (seen with qemu-img's default
    write-back cache: the header is written before the links of the copied clusters, which
    wait for the close): the dependent already on S's parent, none of S's data in it, S
    still there. Made by hand after a crash before the pull, with `rebase -u` on both
    disks; the reopen must put it back on S and pull again, so that every snapshot and the
    live disk read as the model says."""
    case = next(c for c in CASES if c.id == case_id)
    template = templates(case.template)
    root = fresh_copy(template, str(tmp_path))
    run = cli(root, case_args(case, template), {"SNAPFS_CRASH_AT": f"{case.operation}:0:pull:before"})
    assert run.returncode == CRASH_STATUS, run.stderr
    with open(os.path.join(root, "domains", DOM, "journal.json")) as f:
        pulls = [s for s in json.load(f)["steps"] if s["do"] == "pull"]
    assert {os.path.basename(os.path.dirname(s["layer"])) for s in pulls} == set(TARGETS)
    for step in pulls:
        layer = os.path.join(root, "domains", DOM, step["layer"])
        subprocess.run(
            ["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", step["backing"], "-F", step["fmt"], layer],
            check=True,
        )
    want = case.after(template.model)
    problems = user_view_problems(root, want) + check_store(root, want, template)
    assert problems == [], problems


# ---- a killed daemon ------------------------------------------------------------------------
BIG_SIZE = 256 * MiB
BIG_DATA = 192 * MiB


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of pid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append((int(entry), f.read().replace(b"\0", b" ").decode()))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return found


def _wait_for_written(pid: int, size: int, deadline: float) -> None:
    """Until process `pid` has written `size` bytes (/proc/PID/io wchar), ends, or the deadline."""
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/io") as f:
                wchar = int(next(line for line in f if line.startswith("wchar:")).split()[1])
        except (OSError, StopIteration):
            return
        if wchar >= size:
            return
        time.sleep(0.001)


def daemon(root: str, mnt: str) -> Mount:
    """The mount daemon in its own session, so that kill_all() takes it and its qemu-img
    children at once."""
    return Mount(root, mnt, own_session=True).start()


def _lazy_unmount(mnt: str) -> None:
    try:
        os.stat(mnt)
        mounted = os.path.ismount(mnt)
    except OSError:
        mounted = True
    if mounted:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


# What L(s1) holds on vda beyond the live disk's 192 MiB, by the way the merge moves data
# there: a commit of the live disk into it (over a quarter of the live disk's size), or the
# live disk pulling it in place (well under), killed at a few moments of the pull.
S1_DATA = {"commit": 56 * MiB, "pull-early": 40 * MiB, "pull-mid": 40 * MiB, "pull-late": 40 * MiB}
KILL_AT_PERCENT = {"pull-early": 0, "pull-mid": 40, "pull-late": 80}  # of the bytes the pull writes
S1_AT = 200 * MiB


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", list(S1_DATA))
def test_daemon_killed_mid_merge_then_remount(tmp_path, how):
    """kill -9 of the mount daemon (and its qemu-img) while `echo merge > control` commits
    192 MiB into L(s1), or has the live disk pull L(s1)'s 24 MiB in place, fusermount3 -u,
    remount: the merge is finished by the new mount's recovery and every snapshot and the
    live disk hold exactly what they held."""
    bases = make_bases(str(tmp_path / "images"), sizes={"vda": BIG_SIZE})
    digests = {p: file_digest(p) for p, _ in bases.values()}
    root = str(tmp_path / "store")
    domain = define_domain(root, DOM, bases)
    live = domain.live_paths()
    write_pattern(live["vda"], 0x11, CLUSTER)
    write_pattern(live["vdb"], 0x12, CLUSTER, fmt="qcow2")
    domain.snapshot_create_xml("<domainsnapshot><name>s0</name></domainsnapshot>")
    write_pattern(live["vda"], 0x21, 2 * CLUSTER)
    write_pattern(live["vda"], 0x4C, S1_AT, S1_DATA[how])
    write_pattern(live["vdb"], 0x22, 2 * CLUSTER)
    domain.snapshot_create_xml("<domainsnapshot><name>s1</name></domainsnapshot>")
    write_pattern(live["vda"], 0x5A, 0, BIG_DATA)  # the live disk: 192 MiB to commit into L(s1)
    write_pattern(live["vdb"], 0x33, 3 * CLUSTER)
    s0_layers = domain.snapshot_lookup_by_name("s0").layer_paths()

    mnt = str(tmp_path / "mnt")
    mount = daemon(root, mnt)
    try:
        control = os.path.join(mnt, DOM, "snapshots", "s1", "control")
        echo = subprocess.Popen(["bash", "-c", f"echo merge > {control}"], stderr=subprocess.PIPE)
        committing = None
        verb = " commit " if how == "commit" else " rebase "  # the pull: in place, -t writethrough
        deadline = time.monotonic() + 30
        while committing is None and time.monotonic() < deadline and echo.poll() is None:
            committing = next((c for c in _children(mount.proc.pid) if verb in c[1] and "/vda/" in c[1]), None)
        assert committing is not None, f"no qemu-img{verb}was seen; echo: {echo.poll()} {mount.log()[-3000:]}"
        if how == "commit":
            time.sleep(0.05)
        else:
            _wait_for_written(committing[0], S1_DATA[how] * KILL_AT_PERCENT[how] // 100, deadline)
        alive = os.path.exists(f"/proc/{committing[0]}")
        mount.kill_all()
        echo.wait(timeout=20)
        assert echo.returncode != 0, "the merge was reported done although the daemon was killed"
        assert alive, "the commit ended before the kill; the test proved nothing"
        assert os.path.exists(os.path.join(root, "domains", DOM, "journal.json"))
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        _lazy_unmount(mnt)

        mount = daemon(root, mnt)  # recovers before serving
        assert sorted(os.listdir(os.path.join(mnt, DOM, "snapshots"))) == ["s0"]
        assert os.readlink(os.path.join(mnt, DOM, "current")) == "snapshots/s0"
        assert mount.stop() == 0, mount.log()[-3000:]
    finally:
        _lazy_unmount(mnt)
        if mount.proc.poll() is None:
            mount.kill_all()

    assert store_integrity_problems(root, DOM) == []
    domain = snapfs.open_store(root).lookup_domain(DOM)
    assert domain.list_snapshot_names() == ["s0"]
    assert domain.snapshot_lookup_by_name("s0").layer_paths() == s0_layers
    want = {  # (image, {offset: (pattern, length)})
        "s0 vda": (s0_layers["vda"], {0: (0xA1, CLUSTER), CLUSTER: (0x11, CLUSTER), 2 * CLUSTER: (0, CLUSTER)}),
        "s0 vdb": (s0_layers["vdb"], {0: (0xB1, CLUSTER), CLUSTER: (0x12, CLUSTER), 2 * CLUSTER: (0, CLUSTER)}),
        "live vda": (
            live["vda"],
            {
                0: (0x5A, BIG_DATA),
                BIG_DATA: (0, S1_AT - BIG_DATA),
                S1_AT: (0x4C, S1_DATA[how]),
                S1_AT + S1_DATA[how]: (0, BIG_SIZE - S1_AT - S1_DATA[how]),
            },
        ),
        "live vdb": (
            live["vdb"],
            {
                0: (0xB1, CLUSTER),
                CLUSTER: (0x12, CLUSTER),
                2 * CLUSTER: (0x22, CLUSTER),
                3 * CLUSTER: (0x33, CLUSTER),
                4 * CLUSTER: (0, DISK_SIZE - 4 * CLUSTER),
            },
        ),
    }
    for what, (image, regions) in want.items():
        for offset, (pattern, length) in regions.items():
            assert has_pattern(image, pattern, offset, length), f"{what} at {offset}: not {pattern:#x}"
    for path, digest in digests.items():
        assert file_digest(path) == digest, f"base image {path} was written"
