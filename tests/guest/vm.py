"""Runs the test guest under QEMU (TCG) with the given disks and follows its counter.

`running_guest` starts `qemu-system-x86_64` with one `-blockdev` file + qcow2 node pair and a
virtio-blk device per disk (qdev id = the disk name, node name = the image's file stem), a
QMP socket, and the serial console on a pipe read by a thread that timestamps every line; it
waits for the first counter step and always kills QEMU on exit.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
    directory: Path, disks: Mapping[str, Path], *, boot_timeout: float = 90.0, step_us: int | None = None
) -> Iterator[Guest]:
    """The guest running on `disks` ({disk name: real qcow2 path}), QMP at `directory`/qmp.sock,
    once it wrote its first counter step; killed (SIGKILL) when the block ends. `step_us` sets
    the pause between counter steps (0: flat out, for measuring short I/O stalls)."""
    guest_files()  # build (or find) before the clock starts
    sock = directory / "qmp.sock"
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(sock, disks, append="" if step_us is None else f"snapfs.step={step_us}"),
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
