"""bench.py's `memory` section (issue 14's `live` figures): a memory snapshot and a revert of
the real test guest (256 MiB, TCG).

- guest pause during a memory snapshot: from QEMU's STOP and RESUME events (their own
  timestamps), heard on a second QMP monitor given to QEMU for this (snapfs holds its own
  socket while it works; QEMU sends events to every monitor). Goal <= 50 ms (libvirt 9.0
  measured here: 234 ms), moonshot <= 5 ms.
- revert to a memory snapshot (end QEMU, new live layer, start with -incoming defer, load,
  cont) against a bare QEMU start with the same arguments + `migrate-incoming` of the same
  file + cont. Goal <= 1.3x.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

from snapfs import qmp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from guest.build import guest_files  # noqa: E402

DOM = "bench"
MiB = 1 << 20


def _args(directory: Path, events: Path | None) -> list[str]:
    kernel, initrd = guest_files()
    monitor = ["-qmp", f"unix:{events},server=on,wait=off"] if events else []
    return monitor + [
        "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1",
        "-chardev", f"file,id=con,path={directory / 'console.log'},append=on", "-serial", "chardev:con",
    ]  # fmt: skip


def _wait_console(console: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and "\nC 2" in console.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError("the guest did not start writing its counter")


def _stamp(event: dict) -> float:
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


async def _pause_of(events: Path, act) -> float:
    """The guest's pause (RESUME - STOP, seconds) while `act` runs in a thread."""
    async with qmp.connect(events) as q:
        since = q.mark()
        await trio.to_thread.run_sync(act)
        stop = await q.wait_event("STOP", since=since, timeout=30)
        resume = await q.wait_event("RESUME", since=since, timeout=30)
        return _stamp(resume) - _stamp(stop)


def _bare_revert(args: list[str], memory: str, layers: dict[str, str], directory: Path) -> float:
    """A bare QEMU with the same devices (fresh overlays on the snapshot's layers, made
    before the clock starts): started with -incoming defer, the memory loaded, cont."""
    sock = directory / "bare.qmp"
    cmd = ["qemu-system-x86_64", "-daemonize", "-pidfile", str(directory / "bare.pid")]
    cmd += ["-qmp", f"unix:{sock},server=on,wait=off"]
    for target, layer in layers.items():
        overlay = directory / f"bare-{target}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", layer, str(overlay)], check=True
        )
        node = f"disk-{target}"
        spec = {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": str(overlay)}}
        cmd += ["-blockdev", json.dumps(spec), "-device", f"virtio-blk-pci,id={target},drive={node}"]
    cmd += [*args, "-incoming", "defer", "-S"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)

    async def load() -> None:
        async with qmp.connect(sock) as q:
            await q.execute("migrate-incoming", uri="exec:" + shlex.join(["cat", memory]))
            while (await q.execute("query-migrate")).get("status") != "completed":
                await trio.sleep(0.02)
            await q.execute("cont")

    trio.run(load)
    took = time.perf_counter() - start

    async def quit_() -> None:
        async with qmp.connect(sock) as q:
            await q.execute("quit")

    trio.run(quit_)
    return took


def section_live(root: str, runs: int = 5, report=print) -> None:
    from factory import define_domain, make_bases

    directory = Path(root)
    bases = make_bases(str(directory / "images"), {}, sizes={"vda": 64 * MiB, "vdb": 64 * MiB})
    domain = define_domain(str(directory / "store"), DOM, bases)
    events = directory / "events.qmp"
    args = _args(directory, events)
    domain.create(qemu_args=args)
    try:
        _wait_console(directory / "console.log")
        pauses = []
        for i in range(runs):
            pauses.append(
                trio.run(
                    _pause_of,
                    events,
                    lambda i=i: domain.snapshot_create_xml(f"<domainsnapshot><name>p{i}</name></domainsnapshot>"),
                )
            )
        snap = domain.snapshot_lookup_by_name(f"p{runs - 1}")
        memory = str(directory / "store" / "domains" / DOM / "memory" / snap.id)
        size = os.path.getsize(memory)
        report(
            "live: guest pause in a memory snapshot (256 MiB guest)",
            f"{statistics.median(pauses) * 1000:.1f} ms",
            "",
            "goal <= 50 ms (libvirt 234 ms)",
        )
        reverts, bares = [], []
        for _ in range(3):
            start = time.perf_counter()
            domain.create_with_snapshot(snap)
            reverts.append(time.perf_counter() - start)
        layers = {t: os.path.realpath(p) for t, p in snap.layer_paths().items()}
        for _ in range(3):
            bares.append(_bare_revert(_args(directory, None), memory, layers, directory))
        ratio = statistics.median(reverts) / statistics.median(bares)
        report(
            f"live: revert to a memory snapshot ({size / MiB:.0f} MB saved)",
            f"{statistics.median(reverts) * 1000:.0f} ms",
            f"{ratio:.2f}x",
            "goal <= 1.3x a bare start + migrate-incoming",
        )
    finally:
        pid = directory / "store" / "run" / "qemu.d" / f"{DOM}.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text().strip()), 9)
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="snapfs-bench-memory-") as tmp:
        section_live(tmp)
