"""The running-VM recipe of DESIGN section 8, proven on a real guest with snapfs.qmp.

One tiny Linux guest (tests/guest) boots per module under TCG with two qcow2 disks and writes
its sequence counter to both; the tests drive it over QMP by hand: queries, a disk-only
snapshot of both disks in one `transaction`, a live `block-stream` with an explicit base,
and a QEMU killed under the client; a guest of its own runs the I/O probe against a forced
stall. Figures (boot, snapshot wall time, counter stall) go to the JSON file named by
$SNAPFS_GUEST_FIGURES when it is set.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from guest.counter import Counter, check_consistent, parse_blocks, read_counter
from guest.vm import QEMU, Guest, Probe, make_disks, running_guest

from snapfs import qmp
from snapfs.errors import SnapfsError

pytestmark = pytest.mark.timeout(180)

DISKS = ("vda", "vdb")
DISK_SIZE = "64M"
BOOT_TIMEOUT = 90.0
MiB = 1 << 20
# The counter lives in the first COUNTER_AREA bytes (about 65000 steps, hours); the stream test
# writes its pattern above it. The stream is slowed so that the guest writes while it runs.
COUNTER_AREA = 32 * MiB
PATTERN, PATTERN_AT, PATTERN_LEN = 0x5A, 48 * MiB, 2 * MiB
STREAM_SPEED = 1 * MiB


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    guest_dir = tmp_path_factory.mktemp("guest")
    disks = make_disks(guest_dir, DISKS, DISK_SIZE)
    with running_guest(guest_dir, disks, boot_timeout=BOOT_TIMEOUT) as g:
        try:
            yield g
        finally:
            _report(g)


def _report(guest: Guest) -> None:
    path = os.environ.get("SNAPFS_GUEST_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), **guest.figures}) + "\n")


def _counter(path: Path, disk: str) -> Counter:
    """The (boot tag, N) of a crash-consistent counter on `disk`'s image `path` (asserts it)."""
    return check_consistent(read_counter(path, COUNTER_AREA), disk)


def _run(coro_fn, *args):
    return trio.run(coro_fn, *args)


async def _backing_of(path: Path) -> str | None:
    done = await trio.run_process(["qemu-img", "info", "-U", "--output=json", str(path)], capture_stdout=True)
    return json.loads(done.stdout).get("backing-filename")


async def _snapshot(q: qmp.QMP, guest: Guest) -> tuple[float, float]:
    """DESIGN section 8's disk-only snapshot of both disks; when the transaction started and ended."""
    actions = []
    news = {}
    for disk in DISKS:
        old = guest.layers[disk][-1]
        new = news[disk] = guest.dir / f"{disk}-{guest.made}.qcow2"
        await trio.run_process(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", old.name, "-F", "qcow2", str(new), DISK_SIZE]
        )
        await q.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": new.stem, "file": {"driver": "file", "filename": str(new)}},
            backing=None,
        )
        actions.append({"type": "blockdev-snapshot", "data": {"node": old.stem, "overlay": new.stem}})
    started = time.monotonic()
    await q.execute("transaction", actions=actions)
    ended = time.monotonic()
    guest.made += 1
    for disk in DISKS:
        guest.layers[disk].append(news[disk])
    return started, ended


def _stall(guest: Guest, start: float, end: float) -> tuple[float, float]:
    """(longest gap between counter steps around [start, end], median gap before it)."""
    times = [t for t, _ in guest.counter_times()]
    gaps = [(b - a, a, b) for a, b in zip(times, times[1:], strict=False)]
    around = [g for g, a, b in gaps if b >= start and a <= end]
    before = [g for g, _, b in gaps if b < start][-50:]
    return max(around), statistics.median(before)


def test_counter_rises_on_both_disks(guest: Guest) -> None:
    first = {disk: _counter(guest.layers[disk][0], disk) for disk in DISKS}
    guest.wait_counter(guest.last() + 5)
    for disk in DISKS:
        again = _counter(guest.layers[disk][0], disk)
        assert again.tag == first[disk].tag == guest.boot_tag()
        assert again.last >= first[disk].last + 4


def test_qmp_queries(guest: Guest) -> None:
    async def main():
        async with qmp.connect(guest.sock) as q:
            assert q.version[:2] == (7, 2)
            status = await q.execute("query-status")
            assert status["status"] == "running" and status["running"] is True
            devices = {b["qdev"].split("/")[3]: b for b in await q.execute("query-block")}
            assert set(devices) == set(DISKS)
            assert devices["vda"]["inserted"]["node-name"] == guest.node("vda")
            nodes = {n["node-name"]: n for n in await q.execute("query-named-block-nodes", flat=True)}
            for disk in DISKS:
                assert nodes[guest.node(disk)]["file"] == str(guest.layers[disk][-1])
            with pytest.raises(qmp.QMPCommandError) as refused:
                await q.execute("blockdev-del", node_name="no-such-node")
            assert refused.value.errno == 5
            assert str(refused.value).startswith("QEMU refused blockdev-del: ")
            # concurrent callers get their own replies
            results = {}

            async def ask(i: int) -> None:
                results[i] = await q.execute("query-name" if i % 2 else "query-status")

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(ask, i)
            assert all(("status" in r) == (i % 2 == 0) for i, r in results.items())

    _run(main)


def test_disk_snapshot_is_crash_consistent_and_guest_keeps_writing(guest: Guest) -> None:
    guest.wait_counter(guest.last() + 3)
    before = guest.last()

    async def main():
        async with qmp.connect(guest.sock) as q:
            return await _snapshot(q, guest)

    called = time.monotonic()
    started, ended = _run(main)
    total = time.monotonic() - called
    after = guest.last()
    guest.wait_counter(after + 10)
    tag = guest.boot_tag()
    frozen = {disk: _counter(guest.layers[disk][-2], disk) for disk in DISKS}
    assert {c.tag for c in frozen.values()} == {tag}
    assert before <= frozen["vdb"].last <= frozen["vda"].last <= frozen["vdb"].last + 1 <= after + 2
    for disk in DISKS:
        live = _counter(guest.layers[disk][-1], disk)
        assert live.tag == tag and live.last >= after + 10
        assert trio.run(_backing_of, guest.layers[disk][-1]) == guest.layers[disk][-2].name
    # the frozen layers stay frozen while the guest goes on writing
    guest.wait_counter(guest.last() + 5)
    for disk in DISKS:
        assert _counter(guest.layers[disk][-2], disk) == frozen[disk]
    stall, step = _stall(guest, started, ended)
    guest.figures.update(snapshot_transaction_s=ended - started, snapshot_total_s=total, counter_max_gap_s=stall)
    guest.figures["counter_median_step_s"] = step
    assert stall < step + 2.0  # the guest was never stopped


async def _pattern_ok(path: Path, pattern: int, offset: int, length: int) -> bool:
    command = f"read -P {pattern:#x} {offset} {length}"
    done = await trio.run_process(["qemu-io", "-U", "-r", "-c", command, str(path)], capture_stdout=True, check=False)
    out = done.stdout.decode()
    return done.returncode == 0 and f"read {length}/{length}" in out and "verification failed" not in out


def test_live_block_stream_with_explicit_base(guest: Guest) -> None:
    """A middle layer given data of its own (a guest write made from outside, DESIGN's HMP
    qemu-io recipe) is streamed into the live layer with base-node and backing-file explicit,
    slowed down so that the guest writes while the job runs."""

    async def stream(q: qmp.QMP, disk: str) -> None:
        await q.run_job(
            "block-stream",
            job_id=f"stream-{disk}",
            device=guest.node(disk),
            base_node=guest.node(disk, -3),
            backing_file=guest.layers[disk][-3].name,
            speed=STREAM_SPEED,
            timeout=120,
        )

    def frozen_base(disk: str):
        return _counter(guest.layers[disk][-3], disk)

    async def main() -> tuple[int, int, float, dict]:
        async with qmp.connect(guest.sock) as q:
            if len(guest.layers["vda"]) < 2:
                await _snapshot(q, guest)
            for disk in DISKS:
                await q.hmp(f'qemu-io -d {disk}/virtio-backend "write -P {PATTERN:#x} {PATTERN_AT} {PATTERN_LEN}"')
            await _snapshot(q, guest)
            bases = {disk: await trio.to_thread.run_sync(frozen_base, disk) for disk in DISKS}
            await trio.to_thread.run_sync(guest.wait_counter, guest.last() + 3)
            start, started = guest.last(), time.monotonic()
            async with trio.open_nursery() as nursery:
                for disk in DISKS:
                    nursery.start_soon(stream, q, disk)
            elapsed, end = time.monotonic() - started, guest.last()
            for disk in DISKS:
                await q.execute("blockdev-del", node_name=guest.node(disk, -2))
            return start, end, elapsed, bases

    start, end, elapsed, bases = _run(main)
    guest.figures["stream_s"] = elapsed
    assert end >= start + 3, "the guest kept writing while the stream ran"
    guest.wait_counter(guest.last() + 10)
    for disk in DISKS:
        chain = guest.layers[disk]
        streamed = chain.pop(-2)
        assert trio.run(_backing_of, chain[-1]) == chain[-2].name
        assert _counter(chain[-2], disk) == bases[disk]
        # the data now lives in the top layer: the streamed-out layer is no longer read
        streamed.rename(streamed.with_suffix(".gone"))
        assert trio.run(_pattern_ok, chain[-1], PATTERN, PATTERN_AT, PATTERN_LEN)
        assert not trio.run(_pattern_ok, chain[-2], PATTERN, PATTERN_AT, PATTERN_LEN)
        live = _counter(chain[-1], disk)
        assert live.tag == guest.boot_tag() and live.last >= end + 10


def test_transaction_with_one_bad_action_switches_no_disk(guest: Guest) -> None:
    """DESIGN: a transaction is atomic across disks (one bad action, none applied)."""
    old = guest.layers["vda"][-1]
    new = guest.dir / "vda-bad.qcow2"

    async def main() -> None:
        await trio.run_process(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", old.name, "-F", "qcow2", str(new), DISK_SIZE]
        )
        async with qmp.connect(guest.sock) as q:
            file = {"driver": "file", "filename": str(new)}
            await q.execute("blockdev-add", {"driver": "qcow2", "node-name": new.stem, "file": file}, backing=None)
            actions = [
                {"type": "blockdev-snapshot", "data": {"node": old.stem, "overlay": new.stem}},
                {"type": "blockdev-snapshot", "data": {"node": guest.node("vdb"), "overlay": "no-such-node"}},
            ]
            with pytest.raises(qmp.QMPCommandError, match="^QEMU refused transaction: "):
                await q.execute("transaction", actions=actions)
            devices = {b["qdev"].split("/")[3]: b for b in await q.execute("query-block")}
            assert {d: devices[d]["inserted"]["node-name"] for d in DISKS} == {d: guest.node(d) for d in DISKS}
            await q.execute("blockdev-del", node_name=new.stem)

    _run(main)
    new.unlink()
    printed = guest.last()
    guest.wait_counter(printed + 3)
    assert _counter(old, "vda").last >= printed + 3  # still the live layer


def test_dead_qemu_raises_quickly(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [QEMU, "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
    )
    try:
        gone: dict[str, float] = {}

        async def main():
            with trio.fail_after(10):
                while not sock.exists():
                    await trio.sleep(0.02)
            assert await qmp.answers(sock)
            async with qmp.connect(sock) as q:
                assert (await q.execute("query-status"))["status"] == "prelaunch"
                os.kill(proc.pid, signal.SIGSTOP)
                with pytest.raises(SnapfsError) as silent:
                    await q.execute("query-status", timeout=0.5)
                assert silent.value.errno == errno.ETIMEDOUT
                os.kill(proc.pid, signal.SIGCONT)
                assert (await q.execute("query-name")) == {}

                async def waiter() -> None:
                    with pytest.raises(qmp.QEMUGone):
                        await q.wait_event("RESUME", timeout=60)
                    gone["waiter"] = time.monotonic()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    await trio.sleep(0.1)
                    killed = time.monotonic()
                    os.kill(proc.pid, signal.SIGKILL)
                    with pytest.raises(SnapfsError) as err:
                        await q.execute("query-status", timeout=60)
                    gone["call"] = time.monotonic()
                assert err.value.errno == 5 and "gone" in str(err.value)
                assert not q.alive
                assert gone["call"] - killed < 2 and gone["waiter"] - killed < 2
            with pytest.raises(SnapfsError) as refused:
                async with qmp.connect(sock):
                    pass
            assert "No QEMU answers" in str(refused.value)
            assert not await qmp.answers(sock)

        trio.run(main)
    finally:
        proc.kill()
        proc.wait(10)


def _pause(guest: Guest, seconds: float, how: str) -> tuple[float, float]:
    """QEMU paused for `seconds`: SIGSTOP/SIGCONT of its process, or QMP stop/cont."""
    if how == "signal":
        started = time.monotonic()
        os.kill(guest.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(guest.proc.pid, signal.SIGCONT)
        return started, time.monotonic()

    async def main() -> tuple[float, float]:
        async with qmp.connect(guest.sock) as q:
            started = time.monotonic()
            await q.execute("stop")
            await trio.sleep(seconds)
            await q.execute("cont")
            return started, time.monotonic()

    return _run(main)


def test_probe_reports_latencies_and_a_forced_stall(tmp_path: Path) -> None:
    """The I/O probe on vdb: its usual latency is sub-10 ms, QEMU frozen 200 ms (SIGSTOP) shows
    as one stall of that size at the host's time of it, and nothing else of it does. A QMP
    `stop` is invisible to it (the guest's clock stands still too), which is why the probe
    measures I/O stalls and not pauses of the VM. The counter keeps its blocks to itself."""
    disks = make_disks(tmp_path, DISKS, DISK_SIZE)
    with running_guest(tmp_path, disks, boot_timeout=BOOT_TIMEOUT, probe=Probe("vdb")) as g:
        log = g.wait_probe(8)
        assert log.entries[0][2] == "start" and log.entries[0][3][0] == 63 * MiB
        usual = log.usual(time.monotonic())
        assert 0 < usual < 0.010
        assert sum(s.writes for s in log.sums) > 100
        frozen, thawed = _pause(g, 0.2, "signal")
        log = g.wait_probe(4)
        stalls = log.stalls(frozen, thawed)
        assert stalls, f"no stall seen in [{frozen}, {thawed}]: {log.slows[-5:]}"
        worst = max(stalls, key=lambda s: s.stall)
        assert 0.19 <= worst.stall <= 0.4, worst
        assert abs(worst.began - frozen) < 0.05, (worst, frozen)
        assert sorted(s.stall for s in stalls)[-2:-1] < [0.1], stalls
        stopped, resumed = _pause(g, 0.2, "qmp")
        log = g.wait_probe(4)
        assert max(s.max for s in log.sums[-4:]) < 0.15, "a QMP stop is not seen by the guest's clock"
        printed = g.last()
        g.wait_counter(printed + 3)
        for disk in DISKS:
            assert _counter(disks[disk], disk).last >= printed + 3
    raw = tmp_path / "vdb.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disks["vdb"]), str(raw)], check=True, timeout=60)
    with raw.open("rb") as f:
        f.seek(63 * MiB)
        assert f.read(10) == b"SNAPFSPRB "


def test_counter_check_rejects_broken_sequences() -> None:
    def blocks(*records: tuple[str, str, int] | None, garbage: bool = False) -> bytes:
        out = b""
        for r in records:
            out += (b"" if r is None else f"SNAPFSCTR {r[0]} {r[1]} {r[2]}\n".encode()).ljust(512, b"\0")
        return out + (b"\x01".ljust(512, b"\0") if garbage else b"")

    good = [("t1", "vda", i) for i in range(4)]
    assert check_consistent(parse_blocks(blocks(*good) + bytes(4096)), "vda") == Counter("t1", 3)
    broken = {
        "gap": blocks(*good[:2], None, good[3]),
        "order": blocks(*good[:2], good[3], good[2]),
        "tag": blocks(*good[:3], ("t2", "vda", 3)),
        "disk": blocks(*good[:3], ("t1", "vdb", 3)),
        "garbage after": blocks(*good, garbage=True),
        "empty": bytes(1024),
    }
    for what, data in broken.items():
        with pytest.raises(AssertionError):
            check_consistent(parse_blocks(data), "vda")
            pytest.fail(f"{what} passed")
