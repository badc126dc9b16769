"""The cost of holding layers (issue 12): layerlock.hold plus the chain checks, against the
old in-use test (open, F_OFD_GETLK on bytes 101 and 201, close), on a create and on a
merge of the current snapshot (API, 2 disks), the two alternating which goes first and
compared pair by pair; then the hold and a chain check alone.

    .venv/bin/python bench/bench_locks.py [runs]
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
from snapfs import DeactivateFlags, layerlock  # noqa: E402
from snapfs.engines.qemu_img import WRITES, QemuImgEngine  # noqa: E402

HELD = QemuImgEngine.hold_layers


def in_use_test_only(self, files, steps) -> contextlib.AbstractContextManager:
    """What the engine did before: test the lock bytes, hold nothing."""
    for path in dict.fromkeys(files.file(s[k]) for s in steps for k in WRITES.get(s["do"], ())):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            for byte in (101, 201):
                fcntl.fcntl(fd, layerlock.F_OFD_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        finally:
            os.close(fd)
    return contextlib.nullcontext()


def fill(paths: list[str], pattern: int) -> None:
    for path in paths:
        write = ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", path]
        subprocess.run(write, check=True, capture_output=True)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(runs: int) -> None:
    root = tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        dom = bench.new_domain(root, disks=2)
        live = [dom.core.live_path(t) for t in ("vda", "vdb")]
        names = iter(range(10**6))

        def create():
            return dom.snapshot_create_xml(f"<domainsnapshot><name>c{next(names)}</name></domainsnapshot>")

        def merge_current() -> float:
            fill(live, 7)
            snap = create()
            fill(live, 8)
            return seconds(lambda: snap.deactivate(DeactivateFlags.MERGE))

        for label, run in (("create", lambda: seconds(create)), ("merge of current, 1 MiB per disk", merge_current)):
            old, new, ratios = [], [], []
            for index in range(runs):
                took = {}
                for way in (in_use_test_only, HELD) if index % 2 else (HELD, in_use_test_only):
                    QemuImgEngine.hold_layers = way
                    took[way] = run()
                old.append(took[in_use_test_only])
                new.append(took[HELD])
                ratios.append(took[HELD] / took[in_use_test_only])
            quartiles = statistics.quantiles(ratios, n=4)
            print(
                f"{label}: in-use test {statistics.median(old) * 1000:.1f} ms, held {statistics.median(new) * 1000:.1f}"
                f" ms, paired ratio {statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})"
            )
        QemuImgEngine.hold_layers = HELD
        count = 2000
        hold = seconds(lambda: [layerlock.hold({p: "write" for p in live}).close() for _ in range(count)])
        chain = seconds(lambda: [layerlock.check_chain(p) for _ in range(count) for p in live])
        depth = len(layerlock.check_chain(live[0]))
        each = 1e6 / count
        print(f"hold of 2 layers: {hold * each:.0f} us; check of 2 chains {depth} deep: {chain * each:.0f} us")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
