"""snapfs benchmarks: each figure printed beside the bare qemu-img work it needs.

    .venv/bin/python bench/bench.py                 # everything (~10 minutes)
    .venv/bin/python bench/bench.py create merge    # some sections

Sections: create, scale, ls, merge, reads, concurrency, backup, cli, sparse, memory
(bench_memory.py: issue 14's `live` figures). Every figure is a median of several runs;
ratios are taken against bare qemu-img run by this same process, in the same run, on the
same disk. Nothing here asserts: the goals are printed beside the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import trio

import snapfs
from snapfs.catalog import StoreCore
from snapfs.durable import fsync_file, write_json
from snapfs.records import SnapshotRecord

PYTHON = sys.executable
SNAPFS = os.path.join(os.path.dirname(PYTHON), "snapfs")
GiB = 1 << 30
MiB = 1 << 20
ROWS: list[tuple[str, str, str, str]] = []


def report(figure: str, value: str, ratio: str = "", goal: str = "") -> None:
    ROWS.append((figure, value, ratio, goal))
    print(f"{figure:<58} {value:>12} {ratio:>9} {goal}", flush=True)


def median_ms(fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(runs):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_img_overlay(path: str, backing: str) -> None:
    """An empty 1 GiB qcow2 overlay on a qcow2 backing, without opening the chain."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", path, str(GiB))


def pair_ratio(times: list[float], bare_times: list[float]) -> float:
    """The median of the ratios of runs made one right after the other."""
    return statistics.median(t / max(b, 1e-6) for t, b in zip(times, bare_times, strict=True))


def qemu_io_write(path: str, pattern: int, offset: int, length: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", path], check=True, capture_output=True
    )


def new_domain(root: str, disks: int = 2, size: int = GiB, name: str = "vm1") -> snapfs.Domain:
    store = snapfs.open_store(os.path.join(root, "store"), create=True)
    specs = []
    for i in range(disks):
        base = os.path.join(root, f"{name}-base{i}.qcow2" if name != "vm1" else f"base{i}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, str(size))
        specs.append((f"vd{chr(ord('a') + i)}", base, "qcow2"))
    return store.define(name, specs)


@contextlib.contextmanager
def mounted(store: str, mnt: str) -> Iterator[subprocess.Popen]:
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen([PYTHON, "-m", "snapfs.mount", store, mnt, "--foreground"])
    deadline = time.monotonic() + 60
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the mount did not come up")
        time.sleep(0.02)
    try:
        yield proc
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def bare_creator(root: str, disks: int) -> Callable[[], None]:
    """Bare qemu-img: one overlay per disk, one after the other (as a script would)."""
    base = os.path.join(root, "bare-base.qcow2")
    if not os.path.exists(base):
        qemu_img("create", "-q", "-f", "qcow2", base, str(GiB))
    targets = [os.path.join(root, f"bare{i}.qcow2") for i in range(disks)]

    def create() -> None:
        for t in targets:
            qemu_img_overlay(t, base)

    return create


def paired(
    runs: int, bare: Callable[[], object], *ways: Callable[[], object]
) -> tuple[float, list[tuple[float, float]]]:
    """Time `bare` and then each way, `runs` times over; the machine's speed drifts within
    a minute, so each way's ratio is the median of its ratios to the bare run just before.
    Returns the bare median (ms) and, per way, (median ms, median ratio)."""
    bare_times: list[float] = []
    times: list[list[float]] = [[] for _ in ways]
    ratios: list[list[float]] = [[] for _ in ways]
    for _ in range(runs):
        bare_times.append(median_ms(bare, 1))
        for index, way in enumerate(ways):
            times[index].append(median_ms(way, 1))
            ratios[index].append(times[index][-1] / bare_times[-1])
    figures = [(statistics.median(t), statistics.median(r)) for t, r in zip(times, ratios, strict=True)]
    return statistics.median(bare_times), figures


# ---- 1. create ------------------------------------------------------------------------
def section_create(root: str, runs: int = 15) -> None:
    """Create through the API and through mkdir against bare qemu-img creates of the same
    overlays, for one disk and for two (issue 16: <= 0.5x with pre-staged overlays)."""
    for disks in (1, 2):
        sub = os.path.join(root, f"{disks}disk")
        os.makedirs(sub)
        dom = new_domain(sub, disks)
        new_domain(sub, disks, name="vm2")  # mkdir's own: the two ways never wait for each other's lock
        counter = iter(range(10**6))
        with mounted(os.path.join(sub, "store"), os.path.join(sub, "mnt")):
            snaps = os.path.join(sub, "mnt", "vm2", "snapshots")
            bare, ((api, api_ratio), (fs, fs_ratio)) = paired(
                runs,
                bare_creator(sub, disks),
                lambda dom=dom, n=counter: dom.snapshot_create_xml(
                    f"<domainsnapshot><name>api{next(n)}</name></domainsnapshot>"
                ),
                lambda snaps=snaps, n=counter: os.mkdir(os.path.join(snaps, f"fs{next(n)}")),
            )
        report(f"bare qemu-img create x{disks} disks (ms)", f"{bare:.1f}")
        report(f"create through the API, {disks} disks (ms)", f"{api:.1f}", f"{api_ratio:.2f}x", "goal <= 0.5x")
        report(f"mkdir of a snapshot, {disks} disks (ms)", f"{fs:.1f}", f"{fs_ratio:.2f}x", "goal <= 0.5x")
    cli = median_ms(
        lambda: subprocess.run(
            [SNAPFS, "--store", os.path.join(sub, "store"), "snapshot-create-as", "vm1", f"cli{next(counter)}"],
            check=True,
            capture_output=True,
        ),
        5,
    )
    report("create through the CLI, incl. Python start-up (ms)", f"{cli:.1f}", f"{cli / bare:.2f}x", "(informative)")


# ---- 2. scale: create with 10 vs 10,000 existing -----------------------------------------
def synthesize(root: str, count: int, shape: str) -> tuple[str, str]:
    """A store whose domain already has `count` snapshots, written directly (no fsync) so
    the set-up takes seconds: a wide tree (every snapshot a child of the first) or a deep
    chain. Layer files are real qcow2 overlays with the right backing links."""
    store_root = os.path.join(root, f"store-{shape}-{count}")
    base = os.path.join(root, "scale-base.qcow2")
    if not os.path.exists(base):
        qemu_img("create", "-q", "-f", "qcow2", base, str(GiB))
    core = StoreCore(store_root)
    trio.run(core.define, "vm1", [("vda", base, "qcow2")])
    files = core.domain("vm1").files
    layers = files.layers_dir("vda")
    ids = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(count)]
    now = int(time.time()) - count
    template = os.path.join(root, "template.qcow2")
    for i, snap_id in enumerate(ids):
        parent = None if i == 0 else (ids[0] if shape == "wide" else ids[i - 1])
        record = SnapshotRecord(snap_id, f"s{i:05d}", parent, now + i)
        with open(os.path.join(files.snapshots_dir, f"{snap_id}.json"), "w") as f:
            json.dump(asdict(record), f)
        layer = os.path.join(layers, f"{snap_id}.qcow2")
        backing = base if parent is None else f"{parent}.qcow2"
        if shape == "wide" and i >= 2:
            shutil.copyfile(template, layer)
        else:
            qemu_img_overlay(layer, backing)
            if shape == "wide" and i == 1:
                shutil.copyfile(layer, template)
    last = ids[-1]
    # The live layer define made (live.qcow2 -> its real file) now sits on the last snapshot.
    live = json.load(open(files.file("state.json")))["live"]
    qemu_img_overlay(os.path.join(layers, live["vda"]), f"{last}.qcow2")
    write_json(files.file("state.json"), {"current": last, "generation": 1, "live": live})
    return store_root, os.path.join(root, f"mnt-{shape}-{count}")


def create_in_one_process_ms(store_root: str, runs: int) -> tuple[float, float]:
    """Creates through one long-lived core, as the mount does (the metadata is loaded once):
    the median (ms) and the median ratio to a bare qemu-img create of one overlay just before."""
    bare_path = os.path.join(os.path.dirname(store_root), "scale-bare.qcow2")

    async def main() -> tuple[float, float]:
        dom = StoreCore(store_root).domain("vm1")
        dom.view()
        times, ratios = [], []
        for i in range(runs):
            await trio.sleep(0.3)  # a user's pace: the pre-staging after the last create is done
            start = time.perf_counter()
            qemu_img_overlay(bare_path, "scale-base.qcow2")
            bare = time.perf_counter() - start
            start = time.perf_counter()
            await dom.create(f"bench{i}")
            times.append((time.perf_counter() - start) * 1000)
            ratios.append(times[-1] / (bare * 1000))
        return statistics.median(times), statistics.median(ratios)

    return trio.run(main)


def section_scale(root: str, runs: int = 15) -> None:
    results = {}
    for shape, small, large in (("wide", 10, 10_000), ("deep", 10, 1_000)):
        for count in (small, large):
            started = time.perf_counter()
            store_root, mnt = synthesize(root, count, shape)
            print(f"  (synthesized {count} {shape} in {time.perf_counter() - started:.0f} s)", flush=True)
            results[shape, count], bare_ratio = create_in_one_process_ms(store_root, runs)
            report(
                f"create with {count} existing, {shape} (ms) / bare qemu-img create",
                f"{results[shape, count]:.1f}",
                f"{bare_ratio:.2f}x",
                "goal <= 1.2x" if count == large else "",
            )
            if shape == "wide" and count == large:
                section_ls(store_root, mnt)
        ratio = results[shape, large] / results[shape, small]
        report(f"create at {large} / at {small} snapshots, {shape}", "", f"{ratio:.2f}x", "goal <= 1.2x")


# ---- 3. ls -l of 10,000, mount start-up, memory -----------------------------------------------
def section_ls(store_root: str, mnt: str) -> None:
    """ls -l of 10,000 snapshots: once right after the mount starts (the daemon reads the
    metadata for the first time), then three times each right after a change made through
    the API (a description), which makes the kernel forget everything it held for the
    domain: the figure is what a user sees after any change, not a warm kernel cache."""
    os.makedirs(mnt, exist_ok=True)
    start = time.perf_counter()
    with mounted(store_root, mnt) as proc:
        report("mount start-up with 10,000 snapshots (ms)", f"{(time.perf_counter() - start) * 1000:.0f}")
        snaps = os.path.join(mnt, "vm1", "snapshots")
        dom = snapfs.open_store(store_root).lookup_domain("vm1")
        first = dom.snapshot_lookup_by_name("s00000")

        def ls_l() -> float:
            t = time.perf_counter()
            out = subprocess.run(["ls", "-l", snaps], check=True, capture_output=True).stdout
            assert out.count(b"\n") >= 10_000
            return time.perf_counter() - t

        report("ls -l of snapshots/ with 10,000, first after mounting (s)", f"{ls_l():.2f}")
        times = []
        for i in range(3):
            first.set_description(f"changed {i}")
            times.append(ls_l())
        report(
            "ls -l of snapshots/ with 10,000, after a change (s)", f"{statistics.median(times):.2f}", "", "goal < 1 s"
        )
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(line.split()[1] for line in f if line.startswith("VmRSS"))
        report("daemon resident memory at 10,000 snapshots (MiB)", f"{int(rss) / 1024:.0f}")


# ---- 4. merge / discard / revert against bare qemu-img ----------------------------------------
def snapshot_with_dependent(sub: str, s_at: int, s_bytes: int, dependent_bytes: int):
    """A one-disk domain in `sub` whose snapshot S holds `s_bytes` at `s_at` and whose live
    disk (S's one dependent) holds `dependent_bytes` at 0, plus copies of the two files in
    `sub/bare` for the bare twin: (domain, S, L(S)'s path, the copy of L(S), the copied top)."""
    os.makedirs(sub)
    dom = new_domain(sub, disks=1)
    live = dom.core.live_path("vda")
    qemu_io_write(live, 0x11, s_at, s_bytes)
    snap = dom.snapshot_create_xml("<domainsnapshot><name>s</name></domainsnapshot>")
    qemu_io_write(live, 0x22, 0, dependent_bytes)
    layer = snap.layer_paths()["vda"]
    bare_dir = os.path.join(sub, "bare")
    os.makedirs(bare_dir)
    bare_layer = os.path.join(bare_dir, os.path.basename(layer))
    shutil.copy(layer, bare_layer)
    bare_top = os.path.join(bare_dir, "live.qcow2")
    shutil.copy(os.path.realpath(live), bare_top)
    return dom, snap, bare_layer, bare_top


def section_merge(root: str, size: int = 256 * MiB, runs: int = 5) -> None:
    """Merge of S whose dependent (the live disk) holds `size` bytes: snapfs commits the
    dependent into L(S) and renames; bare: `qemu-img commit -d` of the same pair. Every
    timed call starts after a sync, so neither side is paying for the other's writeback
    (or skipping it: deleting a file whose data was never written out frees nothing)."""
    merge_times, bare_times, discard_times, rm_times, revert_times, create_times = [], [], [], [], [], []
    durable_times: list[float] = []
    same_end_times: list[float] = []
    for run in range(runs):
        sub = os.path.join(root, f"merge{run}")
        dom, snap, bare_layer, bare_top = snapshot_with_dependent(sub, 0, size, size)
        live = dom.core.live_path("vda")
        bare_dir = os.path.dirname(bare_top)
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        qemu_img("commit", "-q", "-f", "qcow2", "-d", bare_top)
        bare_times.append(time.perf_counter() - t)
        fsync_file(bare_layer)  # what a merge must also do
        durable_times.append(time.perf_counter() - t)
        os.unlink(bare_top)  # the merge leaves one file: the committed top's space is freed
        same_end_times.append(time.perf_counter() - t)
        os.sync()
        t = time.perf_counter()
        snap.deactivate(snapfs.DeactivateFlags.MERGE)
        merge_times.append(time.perf_counter() - t)
        # discard of a leaf holding `size` bytes vs rm
        snap2 = dom.snapshot_create_xml("<domainsnapshot><name>t</name></domainsnapshot>")
        dom.create_with_snapshot(snap2)
        qemu_io_write(live, 0x33, 0, size)
        leaf = dom.snapshot_create_xml("<domainsnapshot><name>leaf</name></domainsnapshot>")
        os.sync()
        t = time.perf_counter()
        dom.create_with_snapshot(snap2)
        revert_times.append(time.perf_counter() - t)
        os.sync()
        t = time.perf_counter()
        qemu_img_overlay(os.path.join(bare_dir, "revert.qcow2"), os.path.basename(bare_layer))
        create_times.append(time.perf_counter() - t)
        copy = os.path.join(bare_dir, "leafcopy.qcow2")
        shutil.copy(leaf.layer_paths()["vda"], copy)
        os.sync()
        t = time.perf_counter()
        leaf.deactivate(snapfs.DeactivateFlags.DISCARD)
        discard_times.append(time.perf_counter() - t)
        os.sync()
        t = time.perf_counter()
        os.unlink(copy)
        rm_times.append(time.perf_counter() - t)
        shutil.rmtree(sub)
    merge, bare = statistics.median(merge_times), statistics.median(bare_times)
    report(f"bare qemu-img commit -d of {size // MiB} MiB (s)", f"{bare:.2f}")
    report(
        f"merge (one dependent, {size // MiB} MiB) through the API (s)",
        f"{merge:.2f}",
        f"{pair_ratio(merge_times, bare_times):.2f}x",
        "goal <= 1.2x",
    )
    durable = statistics.median(durable_times)
    report(
        "  the same against commit -d + fsync of the layer it wrote",
        f"{durable:.2f}",
        f"{pair_ratio(merge_times, durable_times):.2f}x",
        "(the merge must fsync before it renames)",
    )
    same_end = statistics.median(same_end_times)
    report(
        "  ... + rm of the committed top (the merge's end state)",
        f"{same_end:.2f}",
        f"{pair_ratio(merge_times, same_end_times):.2f}x",
        "goal <= 1.2x",
    )
    rev, cr = statistics.median(revert_times) * 1000, statistics.median(create_times) * 1000
    report(
        "revert through the API (ms) / bare qemu-img create",
        f"{rev:.1f}",
        f"{pair_ratio(revert_times, create_times):.2f}x",
        f"goal <= 1.2x (bare {cr:.1f} ms)",
    )
    dis = statistics.median(discard_times) * 1000
    report(
        f"discard of a {size // MiB} MiB leaf (ms) / bare rm",
        f"{dis:.1f}",
        f"{pair_ratio(discard_times, rm_times):.2f}x",
        "goal <= 1.2x",
    )
    merge_small_snapshot(root, size, runs)


def merge_small_snapshot(root: str, size: int, runs: int, small: int = MiB) -> None:
    """Merge of S holding `small` bytes whose one dependent (the live disk) holds `size`
    bytes elsewhere on the disk: the live disk pulls S's data in place (the cheaper way);
    bare: `qemu-img commit -d` of copies of the same two files, which moves the dependent's
    `size` bytes. Each timed call starts after a sync."""
    merge_times, bare_times = [], []
    for run in range(runs):
        sub = os.path.join(root, f"small{run}")
        dom, snap, _, bare_top = snapshot_with_dependent(sub, 512 * MiB, small, size)
        os.sync()
        t = time.perf_counter()
        qemu_img("commit", "-q", "-f", "qcow2", "-d", bare_top)
        bare_times.append(time.perf_counter() - t)
        os.sync()
        t = time.perf_counter()
        snap.deactivate(snapfs.DeactivateFlags.MERGE)
        merge_times.append(time.perf_counter() - t)
        shutil.rmtree(sub)
    report(
        f"merge of a {small // MiB} MiB snapshot, {size // MiB} MiB dependent (s) / commit -d",
        f"{statistics.median(merge_times):.3f}",
        f"{pair_ratio(merge_times, bare_times):.2f}x",
        f"goal <= 0.2x (bare {statistics.median(bare_times):.2f} s)",
    )


# ---- 5. 1,000 x cat xml and stat through the mount -----------------------------------------------
def section_reads(root: str) -> None:
    dom = new_domain(root)
    for i in range(20):
        dom.snapshot_create_xml(f"<domainsnapshot><name>s{i}</name></domainsnapshot>")
    mnt = os.path.join(root, "mnt")
    with mounted(os.path.join(root, "store"), mnt):
        snaps = os.path.join(mnt, "vm1", "snapshots")
        paths = [os.path.join(snaps, f"s{i % 20}", "xml") for i in range(1000)]
        bare = os.path.join(root, "bare-xml")
        os.makedirs(bare)
        bare_paths = [shutil.copyfile(p, os.path.join(bare, f"s{i}.xml")) for i, p in enumerate(paths[:20])] * 50
        mount_s, bare_s, ratios = [], [], []
        for _ in range(5):  # pairs: the machine's speed drifts
            bare_s.append(_read_all(bare_paths))
            mount_s.append(_read_all(paths))
            ratios.append(mount_s[-1] / bare_s[-1])
        report("1,000 x cat xml of a local file (s)", f"{statistics.median(bare_s):.3f}")
        report(
            "1,000 x cat xml through the mount (s)",
            f"{statistics.median(mount_s):.3f}",
            f"{statistics.median(ratios):.1f}x",
            "goal < 1 s",
        )
        t = time.perf_counter()
        for p in paths:  # a real cat: a process per read, as a user's loop would
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
        mount_cat = time.perf_counter() - t
        t = time.perf_counter()
        for p in bare_paths:
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
        bare_cat = time.perf_counter() - t
        report("1,000 x `cat` (a process each), local file (s)", f"{bare_cat:.2f}")
        report("1,000 x `cat` (a process each), mount (s)", f"{mount_cat:.2f}", f"{mount_cat / bare_cat:.2f}x")
        t = time.perf_counter()
        for p in paths:
            os.stat(p)
        report("1,000 x stat through the mount (s)", f"{time.perf_counter() - t:.2f}", "", "goal < 1 s")


def _read_all(paths: list[str]) -> float:
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    return time.perf_counter() - t


# ---- 6. concurrency: ls of one domain during a merge on another --------------------------------
def section_concurrency(root: str, size: int = 512 * MiB) -> None:
    store = snapfs.open_store(os.path.join(root, "store"), create=True)
    bases = []
    for name in ("busy", "idle"):
        base = os.path.join(root, f"{name}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, str(GiB))
        bases.append(store.define(name, [("vda", base, "qcow2")]))
    busy, idle = bases
    for i in range(20):
        idle.snapshot_create_xml(f"<domainsnapshot><name>s{i}</name></domainsnapshot>")
    live = busy.core.live_path("vda")
    qemu_io_write(live, 0x11, 0, size)
    busy.snapshot_create_xml("<domainsnapshot><name>big</name></domainsnapshot>")
    qemu_io_write(live, 0x22, 0, size)
    mnt = os.path.join(root, "mnt")
    with mounted(os.path.join(root, "store"), mnt):
        idle_snaps = os.path.join(mnt, "idle", "snapshots")

        def ls_ms() -> float:
            return median_ms(lambda: subprocess.run(["ls", "-l", idle_snaps], check=True, capture_output=True), 15)

        quiet = ls_ms()
        merger = threading.Thread(
            target=lambda: subprocess.run(["bash", "-c", f"echo merge > {mnt}/busy/snapshots/big/control"], check=False)
        )
        merger.start()
        time.sleep(0.2)
        during = ls_ms()
        still_merging = merger.is_alive()
        merger.join()
    report("ls -l of another domain, quiet (ms)", f"{quiet:.1f}")
    report(
        "ls -l of another domain during a merge (ms)",
        f"{during:.1f}",
        f"{during / quiet:.2f}x",
        "goal <= 2x" + ("" if still_merging else " (merge ended before the runs did)"),
    )


# ---- 7. backup: a snapshot's disk read through the mount vs qemu-img convert ----------------
def read_through(path: str, buffer_size: int = 4 * MiB) -> int:
    """Read a file to its end with one large, page-aligned buffer (as dd or a backup agent
    would); the file's cached pages are dropped first so every run goes through FUSE."""
    import mmap

    buffer = mmap.mmap(-1, buffer_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total = 0
        while count := os.readv(fd, [buffer]):
            total += count
        return total
    finally:
        os.close(fd)
        buffer.close()


def section_backup(root: str, size: int = GiB, runs: int = 7) -> None:
    """A 1 GiB snapshot read whole through the mount's .raw, against `qemu-img convert -O
    raw` of its layer to a file in the same directory (qemu-img's default cache mode: no
    fsync; the read through the mount writes nothing either), for two images: half data
    (16 x 32 MiB, one every 64 MiB: convert skips the holes, the mount must hand every
    byte to the reader) and all data. Both read the layer from the page cache. The machine's
    speed drifts by 2x within a minute, so each read is timed right after a convert and
    the ratio is the median of those pairs; throughput is virtual bytes per second."""
    for label, written in (("half data", 32 * MiB), ("all data", 64 * MiB)):
        _backup_pairs(os.path.join(root, label.replace(" ", "-")), label, size, written, runs)


def _backup_pairs(root: str, label: str, size: int, written: int, runs: int) -> None:
    os.makedirs(root)
    dom = new_domain(root, disks=1, size=size)
    live = dom.core.live_path("vda")
    for i in range(size // (64 * MiB)):
        qemu_io_write(live, i % 250 + 1, i * 64 * MiB, written)
    layer = dom.snapshot_create_xml("<domainsnapshot><name>big</name></domainsnapshot>").layer_paths()["vda"]
    out = os.path.join(root, "convert.raw")

    def convert() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        qemu_img("convert", "-f", "qcow2", "-O", "raw", layer, out)

    os.sync()  # the layer was just written: let its writeback end before anything is timed
    mnt = os.path.join(root, "mnt")
    convert_times, read_times, ratios = [], [], []
    with mounted(os.path.join(root, "store"), mnt):
        raw = os.path.join(mnt, "vm1", "snapshots", "big", "disks", "vda.raw")
        convert()  # warm-ups
        assert read_through(raw) == size
        for _ in range(runs):
            convert_times.append(median_ms(convert, 1))
            read_times.append(median_ms(lambda: read_through(raw), 1))
            ratios.append(convert_times[-1] / read_times[-1])
    os.unlink(out)
    convert_rate = size / MiB / (statistics.median(convert_times) / 1000)
    read_rate = size / MiB / (statistics.median(read_times) / 1000)
    report(f"qemu-img convert -O raw, 1 GiB snapshot, {label} (MiB/s)", f"{convert_rate:.0f}")
    report(
        f"read of its disks/vda.raw through the mount, {label} (MiB/s)",
        f"{read_rate:.0f}",
        f"{statistics.median(ratios):.2f}x",
        "goal >= 0.8x",
    )


# ---- 8. the command line's start-up beside virsh's ------------------------------------------
# (what snapfs runs, what virsh runs): the same verb; virsh on libvirt's test driver (no daemon).
CLI_VERBS = (
    (["snapshot-list", "vm1"], ["snapshot-list", "test"]),
    (["list"], ["list"]),
    (["--help"], ["--help"]),
)


def section_cli(root: str, runs: int = 20) -> None:
    """`snapfs VERB` beside `virsh -c test:///default VERB`: each ratio is the median of
    `runs` interleaved pairs (virsh comes with libvirt-clients, see contrib/setup.sh). The
    snapfs runs may write bytecode, as an installed package has it (pip compiles it). The
    CPU time (user + system) of the same runs is reported too: on a busy machine the wall
    clock measures the wait for a core as much as the command."""
    if shutil.which("virsh") is None:
        report("snapfs VERB / virsh VERB", "skipped", "", "virsh is missing: apt-get install libvirt-clients")
        return
    dom = new_domain(root, disks=1)
    for i in range(5):
        dom.snapshot_create_xml(f"<domainsnapshot><name>s{i}</name></domainsnapshot>")
    store = os.path.join(root, "store")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    cpu: dict[str, list[float]] = {}

    def timed(key: str, argv: list[str], run_env: dict[str, str] | None = None) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, check=True, capture_output=True, env=run_env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        cpu.setdefault(key, []).append(used * 1000)

    def bare_python() -> None:
        timed("bare", [PYTHON, "-c", "pass"], env)

    for ours, theirs in CLI_VERBS:
        cpu.clear()

        def snapfs_verb(ours: list[str] = ours) -> None:
            timed("snapfs", [SNAPFS, "--store", store, *ours], env)

        def virsh_verb(theirs: list[str] = theirs) -> None:
            timed("virsh", ["virsh", "-c", "test:///default", *theirs])

        snapfs_verb()  # writes the bytecode
        cpu.clear()
        virsh, ((snap, ratio), (bare, bare_ratio)) = paired(runs, virsh_verb, snapfs_verb, bare_python)
        report(f"virsh -c test:///default {' '.join(theirs)} (ms)", f"{virsh:.1f}")
        report(f"snapfs {' '.join(ours)}, Python start-up included (ms)", f"{snap:.1f}", f"{ratio:.2f}x", "goal <= 3x")
        report("  python -c pass in the same pairs: the floor (ms)", f"{bare:.1f}", f"{bare_ratio:.2f}x")
        cpu_ratio = pair_ratio(cpu["snapfs"], cpu["virsh"])
        cpu_snap = statistics.median(cpu["snapfs"])
        report("  the same snapfs runs' CPU time (ms), ratio to virsh's", f"{cpu_snap:.1f}", f"{cpu_ratio:.2f}x")


# ---- 9. sparse: a full backup with contrib/snapfs-backup (reads the .map's data only) ----------
def section_sparse(root: str, size: int = GiB, runs: int = 5) -> None:
    """The half-data 1 GiB image of section 7 (16 x 32 MiB, one every 64 MiB): a full backup
    of its snapshot with contrib/snapfs-backup through the mount, against `qemu-img convert
    -O raw` of the snapshot's layer (both write a sparse 1 GiB file in the same directory);
    ratio = convert / backup, the median of interleaved pairs. And `du` of the .raw."""
    dom = new_domain(root, disks=1, size=size)
    live = dom.core.live_path("vda")
    for i in range(size // (64 * MiB)):
        qemu_io_write(live, i % 250 + 1, i * 64 * MiB, 32 * MiB)
    layer = dom.snapshot_create_xml("<domainsnapshot><name>big</name></domainsnapshot>").layer_paths()["vda"]
    out, dest = os.path.join(root, "convert.raw"), os.path.join(root, "backups")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "snapfs-backup")
    mnt = os.path.join(root, "mnt")

    def clean() -> None:  # outside the timed runs: freeing 512 MiB of written pages is not the copy's cost
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()

    def convert() -> None:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", layer, out)

    def backup() -> None:
        subprocess.run([PYTHON, script, "full", mnt, "vm1", "big", dest], check=True)

    os.sync()
    with mounted(os.path.join(root, "store"), mnt):
        raw = os.path.join(mnt, "vm1", "snapshots", "big", "disks", "vda.raw")
        clean()
        convert()  # warm-ups
        backup()
        convert_times, backup_times = [], []
        for _ in range(runs):
            convert_times.append(median_ms(convert, 1, clean))
            backup_times.append(median_ms(backup, 1, clean))
        du = int(subprocess.run(["du", "-B1", raw], capture_output=True, text=True, check=True).stdout.split()[0])
        with open(raw.removesuffix(".raw") + ".map") as f:
            data = sum(json.loads(line)["length"] for line in f)
    restored = os.stat(os.path.join(dest, "big", "vda.raw")).st_blocks * 512
    report("qemu-img convert -O raw, 1 GiB half data (ms)", f"{statistics.median(convert_times):.0f}")
    report(
        "snapfs-backup full of the same snapshot (ms)",
        f"{statistics.median(backup_times):.0f}",
        f"{pair_ratio(convert_times, backup_times):.2f}x",
        "goal >= 1.0x (speed against convert)",
    )
    report("du of its .raw through the mount (MiB)", f"{du / MiB:.0f}", f"{du / data:.2f}x", "goal = data")
    report("data in its .map (MiB)", f"{data / MiB:.0f}")
    report("du of the backup's vda.raw (MiB)", f"{restored / MiB:.0f}", f"{restored / data:.2f}x")


SECTIONS = {
    "create": section_create,
    "scale": section_scale,
    "merge": section_merge,
    "reads": section_reads,
    "concurrency": section_concurrency,
    "backup": section_backup,
    "cli": section_cli,
    "sparse": section_sparse,
    "memory": lambda root: __import__("bench_memory").section_live(root, report=report),
}


def main(argv: list[str]) -> None:
    chosen = argv or list(SECTIONS)
    unknown = [c for c in chosen if c not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    print(f"{'figure':<58} {'value':>12} {'ratio':>9} goal")
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix=f"snapfs-bench-{name}-", dir=os.environ.get("BENCH_DIR")) as root:
            SECTIONS[name](root)


if __name__ == "__main__":
    main(sys.argv[1:])
