"""Where a live create's and a live merge's wall time goes (issue 13's speed goals): the
bench_live.py set-up (real test guest under TCG, two disks) with timing wrappers around the
steps of an operation, printed as the median per step over the runs (ms) and, for the
merges, one line per step.

    .venv/bin/python bench/trace_live.py [creates]

Throwaway-grade instrumentation: it patches snapfs's functions in this process only.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import trio  # noqa: E402
from bench_live import DATA, DISK_ONLY, bench_domain, fill, offline_copy, real_layers  # noqa: E402
from guest.vm import running_guest  # noqa: E402

import snapfs  # noqa: E402
from snapfs import domain, durable, journal, qmp, store  # noqa: E402
from snapfs.engines import qemu_img  # noqa: E402
from snapfs.engines import qmp as qmp_engine  # noqa: E402

EVENTS: list[tuple[str, float, float, bool]] = []  # (name, start, end, in the main thread)
MAIN = threading.main_thread()


def record(name: str, start: float) -> None:
    EVENTS.append((name, start, time.perf_counter(), threading.current_thread() is MAIN))


def wrap(owner: object, attr: str, label: str | None = None, *, key=None) -> None:
    original = getattr(owner, attr)
    label = label or attr
    if inspect.isasyncgenfunction(original):
        return
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def timed_async(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                record(label if key is None else f"{label}:{key(*args, **kwargs)}", start)

        setattr(owner, attr, timed_async)
    else:

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record(label if key is None else f"{label}:{key(*args, **kwargs)}", start)

        setattr(owner, attr, timed)


def wrap_cm(owner: object, attr: str, label: str) -> None:
    """An async context manager: the time to enter it."""
    original = getattr(owner, attr)

    def entering(*args, **kwargs):
        cm = original(*args, **kwargs)
        enter, leave = cm.__aenter__, cm.__aexit__

        class Timed:
            async def __aenter__(self):
                start = time.perf_counter()
                try:
                    return await enter()
                finally:
                    record(label, start)

            async def __aexit__(self, *exc):
                return await leave(*exc)

        return Timed()

    setattr(owner, attr, entering)


def instrument() -> None:
    wrap(snapfs.api, "_run", "api._run (all)")
    wrap(domain.DomainCore, "_operate", "operate", key=lambda self, op, *a, **k: op)
    wrap(store.DomainFiles, "remove_temporaries")
    wrap(journal.Journal, "finish", "journal.finish")
    wrap(domain.DomainCore, "_carry_over")
    wrap(domain.DomainCore, "_engine", "engine choice (if_running)")
    wrap(domain.DomainCore, "tell_changed")
    wrap(journal.Journal, "refuse_unless_ready")
    wrap(journal.Journal, "refuse_without_space")
    wrap(store.DomainFiles, "write_journal")
    wrap(store.DomainFiles, "clear_journal")
    wrap(store.DomainFiles, "write_snapshot")
    wrap(store.DomainFiles, "write_state")
    wrap(store.DomainFiles, "view")
    wrap(durable.DirSyncs, "flush", "DirSyncs.flush")
    wrap(journal.Journal, "_run_step", "step", key=lambda self, engine, step, *a, **k: step["do"])
    wrap(qmp_engine.QmpEngine, "_start_stream")
    wrap(qmp_engine.QmpEngine, "_wait_job")
    wrap(qmp_engine.QmpEngine, "_rebase_offline")
    wrap(qmp_engine, "flush_devices")
    wrap(qmp_engine, "_add_nodes")
    wrap(qemu_img.QemuImgEngine, "run", "offline.run", key=lambda self, step, *a, **k: step["do"])
    wrap(qmp.QMP, "execute", "qmp", key=lambda self, command, *a, **k: command)
    wrap_cm(qmp, "connect", "qmp.connect (enter)")
    wrap(os, "fsync", "os.fsync")
    wrap(os, "unlink", "os.unlink")
    wrap(domain.prestage, "start", "prestage.start")
    wrap(domain.prestage, "wait_for", "prestage.wait_for")
    wrap_cm(store.DomainFiles, "locked", "lock (enter)")
    original = trio.to_thread.run_sync

    async def hop(fn, *args, **kwargs):
        called = time.perf_counter()
        began = []

        def inner():
            began.append(time.perf_counter())
            return fn(*args)

        try:
            return await original(inner, **kwargs)
        finally:
            now = time.perf_counter()
            if began:
                EVENTS.append(("thread hop: wait to start", called, began[0], True))
                EVENTS.append(("thread hop: back to trio", began[0], now, True))

    trio.to_thread.run_sync = hop


def summary(runs: list[list[tuple[str, float, float, bool]]], title: str) -> None:
    """Per name: median total ms per run, calls per run."""
    totals: dict[str, list[float]] = collections.defaultdict(list)
    counts: dict[str, list[int]] = collections.defaultdict(list)
    for events in runs:
        per: dict[str, float] = collections.defaultdict(float)
        n: dict[str, int] = collections.defaultdict(int)
        for name, start, end, main in events:
            label = name if main else name + " [thread]"
            per[label] += end - start
            n[label] += 1
        for label in per:
            totals[label].append(per[label] * 1000)
            counts[label].append(n[label])
    print(f"\n== {title}: median ms per run (calls), over {len(runs)} runs")
    for label in sorted(totals, key=lambda k: -statistics.median(totals[k])):
        values = totals[label] + [0.0] * (len(runs) - len(totals[label]))
        print(f"  {statistics.median(values):8.1f}  (x{statistics.median(counts[label]):g})  {label}")


def timeline(events: list[tuple[str, float, float, bool]], origin: float, title: str) -> None:
    print(f"\n== {title}: timeline (ms from start, duration)")
    for name, start, end, main in sorted(events, key=lambda e: e[1]):
        if name.startswith(("thread hop", "view")):
            continue
        where = "" if main else " [thread]"
        print(f"  {1000 * (start - origin):8.1f} {1000 * (end - start):8.1f}  {name}{where}")


def take() -> list[tuple[str, float, float, bool]]:
    taken = list(EVENTS)
    EVENTS.clear()
    return taken


def traced_merge(domain: snapfs.Domain, label: str) -> None:
    """Merge `big` (after the pre-staging of the create before it ends), its steps printed."""
    time.sleep(1.0)
    take()
    started = time.perf_counter()
    domain.snapshot_lookup_by_name("big").deactivate(snapfs.DeactivateFlags.MERGE)
    events = take()
    timeline(events, started, f"{label} ({1000 * (time.perf_counter() - started):.0f} ms)")
    summary([events], label)


def main(creates: int) -> None:
    instrument()
    with tempfile.TemporaryDirectory(prefix="snapfs-trace-live-") as tmp:
        directory = Path(tmp)
        root, dom = bench_domain(directory)
        with running_guest(directory, real_layers(dom), step_us=0) as guest:
            dom.attach(str(guest.sock))
            runs, walls = [], []
            for i in range(creates):
                guest.wait_counter(guest.last() + 50)
                take()
                started = time.perf_counter()
                dom.snapshot_create_xml(DISK_ONLY.format(f"s{i}"))
                walls.append(1000 * (time.perf_counter() - started))
                runs.append(take())
                if i == creates - 1:
                    timeline(runs[-1], started, f"create s{i} ({walls[-1]:.1f} ms)")
            summary(runs, f"live create (wall median {statistics.median(walls):.1f} ms, {walls})")
            for i in range(creates):
                dom.snapshot_lookup_by_name(f"s{i}").deactivate(snapfs.DeactivateFlags.MERGE)
            fill(guest, DATA)
            dom.snapshot_create_xml(DISK_ONLY.format("big"))
            guest.wait_counter(guest.last() + 20)
            traced_merge(dom, "live merge")
            dom.snapshot_create_xml(DISK_ONLY.format("big"))
            fill(guest, DATA)
            dom.detach()
        traced_merge(offline_copy(root, directory), "offline merge")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
