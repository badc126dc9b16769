"""Runs the test guest under QEMU (TCG) with the given disks and follows its counter.

`running_guest` starts `qemu-system-x86_64` with one `-blockdev` file + qcow2 node pair and a
virtio-blk device per disk (qdev id = the disk name, node name = the image's file stem), a
QMP socket, and the serial console on a pipe read by a thread that timestamps every line; it
waits for the first counter step and always kills QEMU on exit. With `probe=Probe(disk)` the
guest also runs its I/O probe; `Guest.probe()` gives its latencies and stalls in host time.
"""

from __future__ import annotations

import bisect
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from .build import guest_files

QEMU = "qemu-system-x86_64"


@dataclass
class Guest:
    dir: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    # Per disk, the chain's layer files in order (base first); each file's node is its stem.
    layers: dict[str, list[Path]] = field(default_factory=dict)
    made: int = 1
    figures: dict[str, float] = field(default_factory=dict)

    def counter_times(self) -> list[tuple[float, int]]:
        """(arrival time, N) of every `C N` line: both disks hold block N when it is printed."""
        return [(t, int(line[2:])) for t, line in list(self.lines) if line.startswith("C ") and line[2:].isdigit()]

    def last(self) -> int:
        times = self.counter_times()
        return times[-1][1] if times else -1

    def boot_tag(self) -> str:
        for _, line in list(self.lines):
            if line.startswith("snapfs-guest: boot "):
                return line.split()[2]
        raise AssertionError("the guest printed no boot tag")

    def wait_counter(self, n: int, timeout: float = 60.0) -> float:
        """Wait until the guest printed counter >= n; the time it arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"QEMU exited ({self.proc.returncode}): {self.tail()}"
            times = self.counter_times()
            if times and times[-1][1] >= n:
                return next(t for t, k in times if k >= n)
            time.sleep(0.05)
        raise AssertionError(f"the counter did not reach {n} in {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return " | ".join(line for _, line in self.lines[-8:])

    def node(self, disk: str, index: int = -1) -> str:
        return self.layers[disk][index].stem

    def probe(self) -> ProbeLog:
        """What the guest's I/O probe printed so far (the guest must run with `probe=`)."""
        return ProbeLog.parse(list(self.lines))

    def _probe_sums(self) -> int:
        lines = [line for _, line in list(self.lines) if line.startswith("P ")]
        failed = [line for line in lines if line.startswith("P error")]
        assert not failed, f"the probe failed: {failed}"
        return sum(1 for line in lines if line.startswith("P sum "))

    def wait_probe(self, summaries: int = 1, timeout: float = 60.0) -> ProbeLog:
        """Wait until the probe printed `summaries` more summary lines than now; its log then."""
        want = self._probe_sums() + summaries
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"QEMU exited ({self.proc.returncode}): {self.tail()}"
            if self._probe_sums() >= want:
                return self.probe()
            time.sleep(0.05)
        raise AssertionError(f"the probe printed no {summaries} summaries in {timeout} s: {self.tail()}")


@dataclass(frozen=True)
class Probe:
    """The guest's I/O probe (tests/guest/probe.c) on `disk`: O_DIRECT writes of one block,
    each followed by a flush when `sync`, `pause_us` apart (flat out, it takes the whole vCPU
    and the counter stands still); writes or idle times (oversleeps) of `slow_us` or more are
    printed one by one, a summary every `every_ms`. Without flushes a write takes 0.3-0.8 ms
    here (idle to loaded host); with them 1.5-3.5 ms, but the host's fdatasync makes writes of
    10-15 ms in every period, too coarse for a 10 ms goal."""

    disk: str
    sync: bool = False
    slow_us: int = 3000
    every_ms: int = 250
    pause_us: int = 1000

    def append(self) -> str:
        words = (f"snapfs.probe={self.disk}", f"snapfs.probe_sync={int(self.sync)}")
        words += (f"snapfs.probe_slow={self.slow_us}", f"snapfs.probe_every={self.every_ms}")
        return " ".join((*words, f"snapfs.probe_pause={self.pause_us}"))


class Slow(NamedTuple):
    """One slow write, in host time (see ProbeLog.offset): it started at `start`, took
    `latency` s, and began `idle` s later than the probe's pause after the previous write."""

    start: float
    latency: float
    idle: float

    @property
    def stall(self) -> float:
        return max(self.latency, self.idle)

    @property
    def began(self) -> float:
        """When the longer of the two (the write or the idle time before it) began."""
        return self.start if self.latency >= self.idle else self.start - self.idle


class Summary(NamedTuple):
    """A period of the probe ending at `at` (host time): writes, median and longest latency,
    longest idle time (s), slow writes not printed."""

    at: float
    writes: int
    median: float
    max: float
    max_idle: float
    dropped: int


@dataclass
class ProbeLog:
    """The probe's lines with the guest's clock mapped onto the host's.

    Every line carries the guest's CLOCK_MONOTONIC just before it was written, and arrives on
    the host after that instant: arrival - guest time = offset + console delay, delay >= 0.
    The smallest value near a time is the tightest bound on the offset there, too large by
    the shortest console delay seen (the probe prints a summary every period, so there are
    many chances for a short one). It is taken locally (lines within `span` s): the guest's
    clock stands still while QEMU is stopped (QMP `stop`; a SIGSTOP of QEMU, by contrast, is
    time the guest sees pass), so the offset grows by each pause. Mapped times are thus at
    most that delay late, never early, as long as no `stop` falls within `span` of them."""

    # (host arrival, guest seconds, kind, fields after the guest time)
    entries: list[tuple[float, float, str, list[int]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    span: float = 1.0
    _guest_times: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def parse(cls, lines: Sequence[tuple[float, str]]) -> ProbeLog:
        log = cls()
        for arrival, line in lines:
            words = line.split()
            if len(words) < 3 or words[0] != "P":
                continue
            if words[1] in ("error", "warning") or not words[2].isdigit():
                log.errors.append(line)
                continue
            values = [int(w) for w in words[3:] if w.isdigit()]
            log.entries.append((arrival, int(words[2]) / 1e6, words[1], values))
        return log

    @cached_property
    def sums(self) -> list[Summary]:
        return [
            Summary(self.host_time(g), v[0], v[1] / 1e6, v[2] / 1e6, v[3] / 1e6, v[4])
            for _, g, kind, v in self.entries
            if kind == "sum" and len(v) == 5
        ]

    @cached_property
    def slows(self) -> list[Slow]:
        return [
            Slow(self.host_time(v[0] / 1e6), v[1] / 1e6, v[2] / 1e6)
            for _, _, kind, v in self.entries
            if kind == "slow" and len(v) == 3
        ]

    @property
    def slow_threshold(self) -> float:
        """The probe's SLOW_US (s): below it, writes are only in the summaries."""
        starts = [v for _, _, kind, v in self.entries if kind == "start" and len(v) >= 3]
        return starts[-1][2] / 1e6 if starts else 0.0

    def offset(self, guest_time: float) -> float:
        """host time - guest time near `guest_time` (an upper bound, see the class)."""
        if len(self._guest_times) != len(self.entries):
            self._guest_times = [g for _, g, _, _ in self.entries]  # in order: one process prints them
        low = bisect.bisect_left(self._guest_times, guest_time - self.span)
        high = bisect.bisect_right(self._guest_times, guest_time + self.span)
        assert low < high, f"the probe printed nothing within {self.span} s of guest time {guest_time:.3f}"
        return min(a - g for a, g, _, _ in self.entries[low:high])

    def host_time(self, guest_time: float) -> float:
        return guest_time + self.offset(guest_time)

    def stalls(self, start: float, end: float, margin: float = 0.02) -> list[Slow]:
        """The slow writes (or idle times) that overlap [start - margin, end + margin] (host time)."""
        return [s for s in self.slows if s.start - s.idle <= end + margin and s.start + s.latency >= start - margin]

    def usual(self, before: float, periods: int = 20) -> float:
        """The median of the probe's per-period median latencies over `periods` before `before`."""
        medians = [s.median for s in self.sums if s.at < before][-periods:]
        assert medians, "the probe printed no summary before that time"
        return statistics.median(medians)


def boot_args(append: str = "") -> list[str]:
    """The arguments that boot the guest (TCG: DESIGN says this kernel hangs under nested KVM);
    the caller adds memory, disks, QMP and where the serial console goes."""
    kernel, initrd = guest_files()
    cmd = ["-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(kernel)]
    return cmd + ["-initrd", str(initrd), "-append", f"console=ttyS0 quiet panic=-1 {append}".strip()]


def qemu_command(sock: Path, disks: Mapping[str, Path], memory_mib: int = 256, append: str = "") -> list[str]:
    """The QEMU command line of the guest, its console on stdout."""
    cmd = [QEMU, "-m", str(memory_mib), *boot_args(append), "-serial", "stdio"]
    cmd += ["-qmp", f"unix:{sock},server=on,wait=off"]
    used: set[str] = set()
    for disk, image in disks.items():
        node = node_of(disk, image)
        node = f"{disk}-boot" if node in used else node  # two disks' live.qcow2 symlinks
        used.add(node)
        cmd += ["-blockdev", f"driver=file,node-name={node}-file,filename={image}"]
        cmd += ["-blockdev", f"driver=qcow2,node-name={node},file={node}-file"]
        cmd += ["-device", f"virtio-blk-pci,drive={node},id={disk}"]
    return cmd


def node_of(disk: str, image: Path) -> str:
    """The image's file stem, or `<disk>-boot` where the stem is no QEMU node name (a letter
    first, at most 31 characters with "-file": a uuid.qcow2 of the store is not)."""
    stem = image.stem
    return stem if stem[:1].isalpha() and len(stem) <= 26 else f"{disk}-boot"


def _read_console(guest: Guest) -> None:
    assert guest.proc.stdout is not None
    for raw in guest.proc.stdout:
        guest.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))


def make_disks(directory: Path, names: Sequence[str], size: str = "64M") -> dict[str, Path]:
    """An empty qcow2 image `<name>-0.qcow2` per disk."""
    disks = {name: directory / f"{name}-0.qcow2" for name in names}
    for image in disks.values():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size], check=True, timeout=60)
    return disks


@contextmanager
def running_guest(
    directory: Path,
    disks: Mapping[str, Path],
    *,
    boot_timeout: float = 90.0,
    step_us: int | None = None,
    probe: Probe | None = None,
) -> Iterator[Guest]:
    """The guest running on `disks` ({disk name: real qcow2 path}), QMP at `directory`/qmp.sock,
    once it wrote its first counter step; killed (SIGKILL) when the block ends. `step_us` sets
    the pause between counter steps (0: flat out); `probe` starts the guest's I/O probe."""
    guest_files()  # build (or find) before the clock starts
    sock = directory / "qmp.sock"
    append = "" if step_us is None else f"snapfs.step={step_us}"
    if probe is not None:
        append = f"{append} {probe.append()}".strip()
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(sock, disks, append=append),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    g = Guest(directory, sock, proc, started, layers={d: [p] for d, p in disks.items()})
    reader = threading.Thread(target=_read_console, args=(g,), daemon=True)
    reader.start()
    try:
        g.figures["boot_to_first_counter_s"] = g.wait_counter(0, boot_timeout) - started
        yield g
    finally:
        proc.kill()
        proc.wait(10)
        reader.join(10)
