"""Who runs QEMU (DESIGN section 8): start, shut down, destroy, attach, detach, and the state.

    STORE/run/qemu.d/<dom>.qmp        the QMP socket of a QEMU snapfs started
    STORE/run/qemu.d/<dom>.pid        its pidfile (QEMU's -pidfile)
    STORE/run/qemu.d/<dom>.attached   symlink -> the QMP socket of a QEMU adopted with attach
    STORE/run/qemu.d/<dom>.stopped    how snapfs last stopped it (shutdown, destroyed)
    STORE/domains/<dom>/qemu.json     the user's QEMU arguments, reused by the next start

(run/qemu.d has a dot: notify.py takes every dotless name in run/ for a mount's registration.)

Running means its QMP socket answers, never anything inferred from image locks; a stale
pidfile or socket means shut off. QEMU 7.2 serves one QMP client per socket, so every
operation connects, acts and closes; a socket that accepts but does not greet has another
client and so a live QEMU behind it. Start, shutdown, destroy, attach and detach hold the
domain's lock while they act, so no snapshot operation interleaves with them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from . import qemu, qmp, xml
from .durable import fsync_dir, read_json, write_json
from .errors import SnapfsError, busy, invalid, single

if TYPE_CHECKING:
    from .domain import DomainCore
    from .store import DomainFiles

QEMU_ENV = "SNAPFS_QEMU"
QEMU_DEFAULT = "qemu-system-x86_64"
RUN_SUBDIR = os.path.join("run", "qemu.d")
SHUTDOWN_TIMEOUT = 60.0
QUIT_TIMEOUT = 10.0
PROBE_TIMEOUT = 2.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the final NUL
CONTROL_WORDS = ("start", "shutdown", "destroy")
# Options snapfs gives QEMU itself; the user's arguments may not carry them.
OWN_OPTIONS = ("-daemonize", "-pidfile", "-name", "-uuid")


class State(enum.IntEnum):
    """libvirt's virDomainState."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


# libvirt's reasons (virDomainRunningReason, virDomainPausedReason, virDomainShutoffReason, ...).
RUNNING_UNKNOWN, RUNNING_BOOTED = 0, 1
PAUSED_UNKNOWN, PAUSED_USER, PAUSED_MIGRATION, PAUSED_SAVE = 0, 1, 2, 3
PAUSED_IOERROR, PAUSED_WATCHDOG, PAUSED_FROM_SNAPSHOT, PAUSED_STARTING_UP = 5, 6, 7, 11
SHUTOFF_UNKNOWN, SHUTOFF_SHUTDOWN, SHUTOFF_DESTROYED, SHUTOFF_CRASHED = 0, 1, 2, 3
CRASHED_PANICKED = 1

# virsh domstate's words, and its --reason words for the reasons snapfs gives.
STATE_WORDS = {
    State.NOSTATE: "no state",
    State.RUNNING: "running",
    State.BLOCKED: "idle",
    State.PAUSED: "paused",
    State.SHUTDOWN: "in shutdown",
    State.SHUTOFF: "shut off",
    State.CRASHED: "crashed",
    State.PMSUSPENDED: "pmsuspended",
}
REASON_WORDS = {
    State.RUNNING: {RUNNING_UNKNOWN: "unknown", RUNNING_BOOTED: "booted"},
    State.PAUSED: {
        PAUSED_UNKNOWN: "unknown",
        PAUSED_USER: "user",
        PAUSED_MIGRATION: "migrating",
        PAUSED_SAVE: "saving",
        PAUSED_IOERROR: "I/O error",
        PAUSED_WATCHDOG: "watchdog",
        PAUSED_FROM_SNAPSHOT: "from snapshot",
        PAUSED_STARTING_UP: "starting up",
    },
    State.SHUTOFF: {
        SHUTOFF_UNKNOWN: "unknown",
        SHUTOFF_SHUTDOWN: "shutdown",
        SHUTOFF_DESTROYED: "destroyed",
        SHUTOFF_CRASHED: "crashed",
    },
    State.CRASHED: {0: "unknown", CRASHED_PANICKED: "panicked"},
}
# QMP's RunState -> (libvirt state, reason), as libvirt's QEMU driver maps them.
_QMP_STATES = {
    "running": (State.RUNNING, RUNNING_UNKNOWN),
    "paused": (State.PAUSED, PAUSED_USER),
    "debug": (State.PAUSED, PAUSED_USER),
    "prelaunch": (State.PAUSED, PAUSED_STARTING_UP),
    "inmigrate": (State.PAUSED, PAUSED_MIGRATION),
    "postmigrate": (State.PAUSED, PAUSED_MIGRATION),
    "finish-migrate": (State.PAUSED, PAUSED_MIGRATION),
    "save-vm": (State.PAUSED, PAUSED_SAVE),
    "restore-vm": (State.PAUSED, PAUSED_FROM_SNAPSHOT),
    "io-error": (State.PAUSED, PAUSED_IOERROR),
    "watchdog": (State.PAUSED, PAUSED_WATCHDOG),
    "colo": (State.PAUSED, PAUSED_UNKNOWN),
    "suspended": (State.PMSUSPENDED, 0),
    "shutdown": (State.SHUTDOWN, 0),
    "guest-panicked": (State.CRASHED, CRASHED_PANICKED),
    "internal-error": (State.CRASHED, 0),
}
_BUSY = "busy"  # a probe's answer when another client holds the QMP socket


@dataclass(frozen=True)
class RunFiles:
    """Where one domain's QEMU keeps its run-time files."""

    dir: str
    qmp: str
    pid: str
    attached: str
    stopped: str
    args: str

    @classmethod
    def of(cls, files: DomainFiles) -> RunFiles:
        store_root = os.path.dirname(os.path.dirname(files.path))  # STORE/domains/<dom>
        run = os.path.join(store_root, RUN_SUBDIR)
        base = os.path.join(run, files.name)
        return cls(run, f"{base}.qmp", f"{base}.pid", f"{base}.attached", f"{base}.stopped", files.file("qemu.json"))


# ---- readings ------------------------------------------------------------------------------


def qmp_socket(files: DomainFiles) -> str | None:
    """The QMP socket of the domain's QEMU, if it has one (it may be stale: ask it)."""
    return _socket(RunFiles.of(files))


def _socket(run: RunFiles) -> str | None:
    """The QMP socket of the domain's QEMU (attached or started), or None."""
    if os.path.islink(run.attached):
        return run.attached
    if os.path.exists(run.qmp):
        return run.qmp
    return None


async def _probe(sock: str) -> str | None:
    """QEMU's run state on `sock`, _BUSY when another client holds the socket (so QEMU
    lives), None when nobody answers (shut off)."""
    try:
        async with qmp.connect(sock, timeout=PROBE_TIMEOUT) as q:
            return str((await q.execute("query-status", timeout=PROBE_TIMEOUT)).get("status", ""))
    except SnapfsError as exc:
        return _BUSY if exc.errno == errno.ETIMEDOUT else None


async def state(files: DomainFiles) -> tuple[State, int]:
    """(libvirt state, reason) of the domain now."""
    run = RunFiles.of(files)
    sock = _socket(run)
    status = await _probe(sock) if sock else None
    if status is None:
        return State.SHUTOFF, _shutoff_reason(run, stale=sock is not None)
    if status == _BUSY:
        return State.RUNNING, RUNNING_UNKNOWN
    found = _QMP_STATES.get(status, (State.RUNNING, RUNNING_UNKNOWN))
    if found == (State.RUNNING, RUNNING_UNKNOWN) and sock == run.qmp:
        return State.RUNNING, RUNNING_BOOTED
    return found


def _shutoff_reason(run: RunFiles, stale: bool) -> int:
    """How it stopped: as snapfs stopped it, crashed when its files outlived it, else unknown."""
    if stale:
        return SHUTOFF_CRASHED if os.path.exists(run.pid) or os.path.islink(run.attached) else SHUTOFF_UNKNOWN
    try:
        with open(run.stopped, encoding="ascii") as f:
            word = f.read().strip()
    except OSError:
        return SHUTOFF_UNKNOWN
    return {"shutdown": SHUTOFF_SHUTDOWN, "destroyed": SHUTOFF_DESTROYED}.get(word, SHUTOFF_UNKNOWN)


async def state_word(files: DomainFiles) -> str:
    """virsh domstate's word: running, paused, shut off, ..."""
    return STATE_WORDS[(await state(files))[0]]


def reason_word(found: tuple[State, int]) -> str:
    return REASON_WORDS.get(found[0], {}).get(found[1], "unknown")


async def is_running(files: DomainFiles) -> bool:
    """Whether a QEMU of the domain answers (any state but shut off)."""
    return (await state(files))[0] is not State.SHUTOFF


def recorded_args(files: DomainFiles) -> list[str]:
    """The QEMU arguments the last successful start was given ([] before any)."""
    try:
        data = read_json(RunFiles.of(files).args)
    except FileNotFoundError:
        return []
    args = data.get("args") if isinstance(data, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SnapfsError(errno.EIO, f"{RunFiles.of(files).args} is not a list of QEMU arguments; fix or remove it.")
    return args


# ---- operations ----------------------------------------------------------------------------


async def start(dom: DomainCore, args: list[str] | None = None) -> None:
    """Start QEMU on the domain's live layers; `args` (None: the recorded ones) are recorded
    once QEMU runs."""
    async with _acting(dom, "start"):
        run = RunFiles.of(dom.files)
        await _refuse_if_running(dom, run)
        user_args = recorded_args(dom.files) if args is None else _checked_args(args)
        _clear_stale(run)
        os.makedirs(run.dir, mode=0o700, exist_ok=True)
        if len(os.fsencode(run.qmp)) > SUN_PATH_MAX:
            raise SnapfsError(
                errno.ENAMETOOLONG,
                f"The QMP socket path {run.qmp} is longer than the {SUN_PATH_MAX} bytes a unix socket allows; "
                "use a shorter store path or domain name.",
            )
        await _launch(_command(dom, run, user_args), run)
        if args is not None:
            await trio.to_thread.run_sync(write_json, run.args, {"args": user_args})
        _unlink(run.stopped)


async def shutdown(dom: DomainCore, timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """ACPI power-down; QEMU is told to quit if the guest has not stopped after `timeout` s."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 86400:
        message = f"A shutdown timeout must be a number of seconds from 0 to 86400, not {timeout!r}."
        dom.record_error("shutdown", message)
        raise invalid(message)
    async with _acting(dom, "shutdown"):
        run = RunFiles.of(dom.files)
        sock = await _running_socket(dom, run)
        pid = await _peer_pid(sock)
        with contextlib.suppress(SnapfsError):  # it may be gone already, or busy: quit follows
            async with qmp.connect(sock, timeout=PROBE_TIMEOUT) as q:
                await q.execute("system_powerdown")
        if not await _ended_within(sock, pid, timeout):
            await _quit(dom, sock, pid)
        _forget(run, "shutdown")


async def destroy(dom: DomainCore) -> None:
    """End QEMU at once (the guest is not asked)."""
    async with _acting(dom, "destroy"):
        run = RunFiles.of(dom.files)
        sock = await _running_socket(dom, run)
        await _quit(dom, sock, await _peer_pid(sock))
        _forget(run, "destroyed")


async def attach(dom: DomainCore, socket_path: str) -> None:
    """Adopt a QEMU started elsewhere whose disks are the domain's live layers."""
    async with _acting(dom, "attach"):
        run = RunFiles.of(dom.files)
        await _refuse_if_running(dom, run)
        if not isinstance(socket_path, str) or not socket_path:
            raise invalid(f"attach needs the path of a QMP socket, not {socket_path!r}.")
        sock = os.path.abspath(socket_path)
        try:
            async with qmp.connect(sock, timeout=PROBE_TIMEOUT) as q:
                devices = await q.execute("query-block")
        except SnapfsError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise SnapfsError(
                    errno.EBUSY,
                    f"The QEMU on {sock} did not greet snapfs: another client holds that QMP socket "
                    "(QEMU serves one at a time); start QEMU with a -qmp of its own for snapfs.",
                ) from None
            raise SnapfsError(exc.errno, f"Cannot attach {dom.name!r}: {exc.message}") from None
        _check_disks(dom, devices, sock)
        _clear_stale(run)
        os.makedirs(run.dir, mode=0o700, exist_ok=True)
        tmp = f"{run.attached}.tmp{os.getpid()}"
        _unlink(tmp)
        os.symlink(sock, tmp)
        os.rename(tmp, run.attached)
        fsync_dir(run.dir)
        _unlink(run.stopped)


async def detach(dom: DomainCore) -> None:
    """Forget an attached QEMU; it keeps running."""
    async with _acting(dom, "detach"):
        run = RunFiles.of(dom.files)
        if not os.path.islink(run.attached):
            started = " (snapfs started it: stop it with shutdown or destroy)" if os.path.exists(run.qmp) else ""
            raise invalid(f"Domain {dom.name!r} is not attached{started}.")
        _unlink(run.attached)
        fsync_dir(run.dir)


async def control(dom: DomainCore, word: str) -> None:
    """A word written to /<dom>/control."""
    actions: dict[str, Callable] = {"start": start, "shutdown": shutdown, "destroy": destroy}
    if word not in actions:
        message = f"Unknown control word {word!r}; the words are: {' '.join(CONTROL_WORDS)}."
        dom.record_error("control", message)
        raise invalid(message)
    await actions[word](dom)


async def refuse_if_running(dom: DomainCore, cause: SnapfsError) -> None:
    """Raise the running-domain sentence for an operation refused with `cause` (EBUSY on a
    layer) when the domain's QEMU is what holds it; return otherwise."""
    if cause.errno == errno.EBUSY and await is_running(dom.files):
        raise SnapfsError(
            errno.EBUSY,
            f"Domain {dom.name!r} is running, but its QEMU did not answer snapfs on its QMP socket (another "
            "client holds it, and QEMU serves one at a time); try again when that client is gone.",
        ) from cause


async def refuse_while_running(dom: DomainCore, then: str) -> None:
    """EBUSY while the domain's QEMU runs (undefine would delete the files it writes)."""
    if await is_running(dom.files):
        raise busy(f"Domain {dom.name!r} is running; shut it down first (snapfs shutdown {dom.name}), then {then}.")


def forget(files: DomainFiles) -> None:
    """Remove the run-time files of a domain that is gone (undefined, not running)."""
    run = RunFiles.of(files)
    for path in (run.qmp, run.pid, run.attached, run.stopped):
        _unlink(path)


# ---- carrying out --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _acting(dom: DomainCore, operation: str):
    """The domain's lock (refused at once if another operation holds it) and no unfinished
    journal; a failure is one SnapfsError, written to last-error."""
    try:
        dom.record()  # ENOENT for a domain undefined meanwhile, before the lock's own message
        async with dom.files.locked(wait=0):
            journal = dom.files.read_journal()
            if journal is not None:
                what = f"{journal['operation']} {journal.get('subject') or ''}".rstrip()
                raise busy(
                    f"Domain {dom.name!r} has an unfinished {what}; the next change on the domain finishes it "
                    f"(see its last-error), then {operation} can go on."
                )
            yield
    except BaseException as caught:
        exc = single(caught)
        if isinstance(exc, SnapfsError):
            dom.record_error(operation, exc.message)
            raise exc from None
        if isinstance(exc, OSError):
            error = SnapfsError(exc.errno or errno.EIO, f"{operation} failed: {exc.strerror or exc}.")
            dom.record_error(operation, error.message)
            raise error from exc
        raise exc  # noqa: B904


async def _refuse_if_running(dom: DomainCore, run: RunFiles) -> None:
    sock = _socket(run)
    if sock and await _probe(sock) is not None:
        how = "attached to a QEMU" if sock == run.attached else "running"
        raise busy(f"Domain {dom.name!r} is already {how}.")


async def _running_socket(dom: DomainCore, run: RunFiles) -> str:
    sock = _socket(run)
    if sock is None or await _probe(sock) is None:
        raise SnapfsError(errno.ESRCH, f"Domain {dom.name!r} is not running.")
    return sock


def _checked_args(args: list[str]) -> list[str]:
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise invalid(f"QEMU arguments must be a list of strings, not {args!r}.")
    for arg in args:
        if "\0" in arg:
            raise invalid("A QEMU argument may not contain a NUL character.")
        if arg.split("=", 1)[0].replace("--", "-", 1) in OWN_OPTIONS:
            raise invalid(f"snapfs gives QEMU {arg.split('=', 1)[0]} itself; leave it out of the arguments.")
    return list(args)


def _command(dom: DomainCore, run: RunFiles, user_args: list[str]) -> list[str]:
    record = dom.record()
    cmd = [os.environ.get(QEMU_ENV) or QEMU_DEFAULT, "-daemonize", "-pidfile", run.pid]
    cmd += ["-qmp", f"unix:{run.qmp},server=on,wait=off", "-name", dom.name, "-uuid", record.uuid]
    memory, vcpus = _sizing(dom)
    given = set(user_args)
    if memory and "-m" not in given:
        cmd += ["-m", str(memory)]
    if vcpus and "-smp" not in given:
        cmd += ["-smp", str(vcpus)]
    for disk in record.disks:
        real = dom.files.live_layer(dom.view(), disk.target)  # QEMU is never given a symlink
        node = f"disk-{disk.target}"
        file = {"driver": "file", "node-name": f"{node}-file", "filename": real}
        cmd += ["-blockdev", _json({"driver": "qcow2", "node-name": node, "file": file})]
        cmd += ["-device", f"virtio-blk-pci,id={disk.target},drive={node}"]
    return cmd + user_args


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _sizing(dom: DomainCore) -> tuple[int | None, int | None]:
    """(memory in MiB, vCPUs) from the domain XML's <memory> and <vcpu>, where it has them."""
    root = xml.parse(dom.files.original_xml(), "domain XML")
    memory = vcpus = None
    mem = root.find("memory")
    if mem is not None and (mem.text or "").strip().isdigit():
        scale = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}
        factor = scale.get(mem.get("unit", "KiB").lower(), 1024)
        memory = max(1, int(mem.text.strip()) * factor >> 20)
    cpu = root.find("vcpu")
    if cpu is not None and (cpu.text or "").strip().isdigit():
        vcpus = int(cpu.text.strip())
    return memory, vcpus


async def _launch(cmd: list[str], run: RunFiles) -> None:
    """Run QEMU daemonized; its first error line as the sentence when it does not start."""
    try:
        done = await trio.run_process(cmd, stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError:
        raise SnapfsError(
            errno.ENOENT, f"QEMU is not installed: {cmd[0]} was not found (install qemu-system-x86, or set {QEMU_ENV})."
        ) from None
    except PermissionError as exc:
        raise SnapfsError(errno.EACCES, f"QEMU cannot be run: {cmd[0]}: {exc.strerror}.") from None
    if done.returncode != 0:
        _clear_stale(run)
        lines = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        first = lines[0] if lines else f"it exited with status {done.returncode} and said nothing"
        raise SnapfsError(errno.EIO, f"QEMU did not start: {first.rstrip('.')}.")
    if await _probe(run.qmp) is None:
        raise SnapfsError(errno.EIO, f"QEMU started but does not answer on {run.qmp}.")


async def _peer_pid(sock: str) -> int | None:
    """The pid of the process listening on `sock` (SO_PEERCRED; no QMP client is needed, so
    it works while another client holds the socket), or None."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            await s.connect(sock)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    return struct.unpack("3i", creds)[0] or None


async def _ended_within(sock: str, pid: int | None, timeout: float) -> bool:
    """Wait until the QEMU has ended: its process when known (so that its image locks are
    gone), else its socket; False after `timeout`."""
    with trio.move_on_after(timeout):
        while not qemu.process_ended(pid) if pid else await _probe(sock) is not None:
            await trio.sleep(0.1)
        return True
    return False


async def _quit(dom: DomainCore, sock: str, pid: int | None) -> None:
    """`quit` over QMP; a QEMU that does not end is killed."""
    with contextlib.suppress(SnapfsError):  # gone meanwhile, or not answering: checked below
        async with qmp.connect(sock, timeout=PROBE_TIMEOUT) as q:
            await q.execute("quit", timeout=PROBE_TIMEOUT)
    if await _ended_within(sock, pid, QUIT_TIMEOUT):
        return
    if pid is None:
        raise SnapfsError(errno.ETIMEDOUT, f"The QEMU of domain {dom.name!r} did not quit within {QUIT_TIMEOUT:g} s.")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not await _ended_within(sock, pid, QUIT_TIMEOUT):
        raise SnapfsError(errno.ETIMEDOUT, f"The QEMU of domain {dom.name!r} (pid {pid}) survived SIGKILL.")


def _check_disks(dom: DomainCore, devices: list[dict], sock: str) -> None:
    """Each disk's live layer is a device's active image; no other writable device opens a
    file of the store."""
    images = {}
    for device in devices:
        inserted = device.get("inserted") or {}
        file = qmp.file_of(inserted["file"]) if isinstance(inserted.get("file"), str) else None
        if file:
            name = device.get("qdev") or device.get("device") or "?"
            images[name] = (os.path.realpath(file), bool(inserted.get("ro")))
    view = dom.view()
    wanted = {os.path.realpath(dom.files.live_layer(view, d.target)): d.target for d in dom.disks}
    found = {real for real, _ in images.values()}
    for real, target in wanted.items():
        if real not in found:
            raise SnapfsError(
                errno.ENOENT,
                f"The QEMU on {sock} has no disk on the live layer of {dom.name}'s disk {target} ({real}).",
            )
    store_root = os.path.dirname(os.path.dirname(dom.files.path)) + os.sep
    for name, (real, read_only) in images.items():
        if real not in wanted and not read_only and real.startswith(store_root):
            raise SnapfsError(
                errno.EBUSY,
                f"The QEMU on {sock} writes {real} (device {name}), a file of the store that is not one of "
                f"{dom.name}'s live disks; snapfs does not adopt it.",
            )


def _clear_stale(run: RunFiles) -> None:
    """Remove what a QEMU that is gone left (the caller checked that it is gone)."""
    for path in (run.qmp, run.pid, run.attached):
        _unlink(path)


def _forget(run: RunFiles, how: str) -> None:
    _clear_stale(run)
    with contextlib.suppress(OSError):
        os.makedirs(run.dir, mode=0o700, exist_ok=True)
        with open(run.stopped, "w", encoding="ascii") as f:
            f.write(how + "\n")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
