"""A small trio client for QEMU's QMP socket: commands, events and jobs.

Our own rather than a library: qemu.qmp (QEMU's own package) is built on asyncio and would need
a second event loop or trio-asyncio bridged into every handler, and the older blocking
QEMUMonitorProtocol would stall the trio loop. QMP itself is small (newline-delimited JSON:
a greeting, `qmp_capabilities`, replies matched by `id`, asynchronous events), so a few
trio primitives cover it, with the timeouts and the dead-QEMU behaviour snapfs needs.

Use::

    async with qmp.connect("/run/vm1.qmp") as q:
        await q.execute("query-status")
        await q.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov0", ...})
        await q.run_job("block-stream", job_id="s0", device="ov0", base_node="base0", backing_file="a.qcow2")

Every wait is bounded. An error reply becomes `QMPCommandError` (EIO), a QEMU that goes away
becomes `QEMUGone` (EIO) for every caller waiting and every later call, a silent one a
`SnapfsError` with ETIMEDOUT; all are `SnapfsError`s.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import trio

from .errors import SnapfsError

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
JOB_TIMEOUT = 600.0
_EVENT_HISTORY = 4096
_MAX_LINE = 64 << 20


class QMPCommandError(SnapfsError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(errno.EIO, f"QEMU refused {command}: {desc.rstrip('.')}.")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QEMUGone(SnapfsError):
    """The QMP connection ended (QEMU quit or was killed) before an answer came."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def _timeout(what: str, seconds: float) -> SnapfsError:
    return SnapfsError(errno.ETIMEDOUT, f"QEMU did not {what} within {seconds:g} s.")


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None


@asynccontextmanager
async def connect(path: str | os.PathLike[str], *, timeout: float = CONNECT_TIMEOUT) -> AsyncIterator[QMP]:
    """A QMP session on the unix socket `path`, past the greeting and `qmp_capabilities`.

    A socket nobody answers on raises SnapfsError (ECONNREFUSED), which means shut off."""
    stream = await _open_stream(path, timeout)
    async with stream:
        client = QMP(stream, os.fspath(path))
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await client._greet(timeout)
                    nursery.start_soon(client._read_loop)
                    await client.execute("qmp_capabilities", timeout=timeout)
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task never raises, so the group holds the body's one exception:
            # callers get it as they raised it, not wrapped.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise


async def open_session(path: str | os.PathLike[str], *, timeout: float = CONNECT_TIMEOUT) -> QMP:
    """A QMP session as `connect` makes, not tied to a block: its reader is a trio system
    task, so the session may outlive the scope that opened it (the QMP engine keeps one for
    an operation's steps). QEMU serves one client at a time: the owner closes it (aclose)
    before anything else may talk to that QEMU."""
    stream = await _open_stream(path, timeout)
    client = QMP(stream, os.fspath(path))
    try:
        await client._greet(timeout)
        trio.lowlevel.spawn_system_task(client._read_loop)
        await client.execute("qmp_capabilities", timeout=timeout)
    except BaseException:
        await client.aclose()
        raise
    return client


async def _open_stream(path: str | os.PathLike[str], timeout: float) -> trio.SocketStream:
    try:
        with trio.fail_after(timeout):
            return await trio.open_unix_socket(os.fspath(path))
    except OSError as e:
        raise SnapfsError(errno.ECONNREFUSED, f"No QEMU answers on {path} ({e.strerror or e}).") from None
    except trio.TooSlowError:
        raise _timeout(f"accept a connection on {path}", timeout) from None


async def answers(path: str | os.PathLike[str], *, timeout: float = 2.0) -> bool:
    """Whether a QEMU answers on `path` (DESIGN: running means its QMP socket answers).

    QEMU serves one QMP client per socket at a time: while another client is connected this
    waits for the greeting, then says False after `timeout`."""
    try:
        async with connect(path, timeout=timeout):
            return True
    except SnapfsError:
        return False


class QMP:
    """One QMP connection; made by `connect`. Several tasks may call it at once."""

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self.path = path
        self.greeting: dict[str, Any] = {}
        self._stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=_EVENT_HISTORY)
        self._event_seq = 0
        self._new_event = trio.Event()
        self._gone: str | None = None

    # --- state -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the connection ended."""
        return self._gone is None

    @property
    def version(self) -> tuple[int, int, int]:
        v = self.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        return (v.get("major", 0), v.get("minor", 0), v.get("micro", 0))

    async def aclose(self) -> None:
        """End an open_session session (its reader ends with the stream)."""
        self._die("the QMP connection was closed")
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    def _gone_error(self, command: str) -> QEMUGone:
        return QEMUGone(f"QEMU on {self.path} is gone ({self._gone}); {command} got no answer.")

    # --- commands ----------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = COMMAND_TIMEOUT,
        **kwargs: Any,
    ) -> Any:
        """Run one command and return its `return` value.

        Keyword arguments become QMP arguments with `_` turned into `-` (job_id -> job-id);
        `arguments` is passed as is (for names with underscores, or nested options)."""
        if self._gone is not None:
            raise self._gone_error(command)
        args = {k.replace("_", "-"): v for k, v in kwargs.items()}
        args.update(arguments or {})
        ident = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": ident}
        if args:
            message["arguments"] = args
        pending = self._pending[ident] = _Pending()
        try:
            with trio.move_on_after(timeout) as scope:
                await self._send(message, command)
                await pending.done.wait()
        finally:
            del self._pending[ident]
        if scope.cancelled_caught:
            raise _timeout(f"answer {command}", timeout)
        reply = pending.reply
        if reply is None:
            raise self._gone_error(command)
        if "error" in reply:
            error = reply["error"]
            raise QMPCommandError(command, str(error.get("class", "")), str(error.get("desc", "no description")))
        return reply.get("return")

    async def hmp(self, command_line: str, *, timeout: float = COMMAND_TIMEOUT) -> str:
        """A human-monitor command (e.g. `qemu-io -d vd0/virtio-backend "write 0 64k"`); its output."""
        return await self.execute("human-monitor-command", {"command-line": command_line}, timeout=timeout)

    async def _send(self, message: dict[str, Any], command: str) -> None:
        data = json.dumps(message).encode() + b"\n"
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                self._die(f"sending failed: {e}")
                raise self._gone_error(command) from None
            except trio.Cancelled:
                # A half-sent command leaves the stream unusable for everyone.
                self._die("a command was cut off while being sent")
                raise

    # --- events ------------------------------------------------------------------------

    def mark(self) -> int:
        """A point in the event stream: pass it as `since` to wait for events after it."""
        return self._event_seq

    def events_since(self, since: int) -> list[dict[str, Any]]:
        """The events received after `mark()` returned `since` (as far as the history goes)."""
        return [event for seq, event in self._events if seq > since]

    async def wait_event(
        self,
        names: str | Collection[str],
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout: float = COMMAND_TIMEOUT,
        since: int | None = None,
    ) -> dict[str, Any]:
        """The first event named `names` (one or several) whose `data` satisfies `predicate`,
        received after `since` (default: now). Returns the whole event (event, data, timestamp)."""
        wanted = {names} if isinstance(names, str) else set(names)
        seen = self._event_seq if since is None else since
        with trio.move_on_after(timeout):
            while True:
                for seq, event in self._events:
                    if seq > seen and event.get("event") in wanted:
                        if predicate is None or predicate(event.get("data", {})):
                            return event
                seen = self._event_seq
                if self._gone is not None:
                    raise self._gone_error(f"the wait for {'/'.join(sorted(wanted))}")
                await self._new_event.wait()
        raise _timeout(f"send {'/'.join(sorted(wanted))}", timeout)

    # --- jobs --------------------------------------------------------------------------

    async def run_job(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float = JOB_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        """Start a job (the arguments must name its `job-id`) and wait until it concluded;
        its error, if any, raised as SnapfsError."""
        args = {k.replace("_", "-"): v for k, v in kwargs.items()} | (arguments or {})
        job_id = args.get("job-id")
        if not job_id:
            raise SnapfsError(errno.EINVAL, f"A {command} job needs a job-id.")
        since = self.mark()
        await self.execute(command, args)
        await self.wait_job(job_id, timeout=timeout, since=since)

    async def wait_job(self, job_id: str, *, timeout: float = JOB_TIMEOUT, since: int = 0) -> None:
        """Wait (from the event mark `since`) until job `job_id` concluded, dismiss it if it
        waits for that, and raise its error. Block jobs report it in BLOCK_JOB_COMPLETED;
        other jobs keep it until dismissed (start them with auto-dismiss false)."""
        await self.wait_event(
            "JOB_STATUS_CHANGE",
            lambda d: d.get("id") == job_id and d.get("status") == "concluded",
            timeout=timeout,
            since=since,
        )
        error = None
        for event in self.events_since(since):
            data = event.get("data", {})
            if data.get("device") != job_id:
                continue
            if event["event"] == "BLOCK_JOB_CANCELLED":
                error = "it was cancelled"
            elif event["event"] == "BLOCK_JOB_COMPLETED" and data.get("error"):
                error = data["error"]
        job = await self.query_job(job_id)
        if job is not None and job.get("status") == "concluded":
            error = error or job.get("error")
            await self.execute("job-dismiss", id=job_id)
        if error:
            raise SnapfsError(errno.EIO, f"QEMU job {job_id} failed: {str(error).rstrip('.')}.")

    async def query_job(self, job_id: str) -> dict[str, Any] | None:
        """The job's entry of query-jobs (status, current-progress, total-progress, error), or None."""
        for job in await self.execute("query-jobs"):
            if job.get("id") == job_id:
                return job
        return None

    # --- the reader --------------------------------------------------------------------

    async def _greet(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            try:
                greeting = await self._receive()
                # An event can come first (seen with a block job finishing as a client
                # connected): kept as any other event.
                while greeting is not None and "event" in greeting:
                    self._dispatch(greeting)
                    greeting = await self._receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError) as e:
                raise SnapfsError(errno.ECONNREFUSED, f"No QEMU answers on {self.path} ({e}).") from None
            if greeting is None or "QMP" not in greeting:
                raise SnapfsError(errno.EPROTO, f"{self.path} does not speak QMP (greeting {greeting!r}).")
            self.greeting = greeting
            return
        raise _timeout(f"greet on {self.path}", timeout)

    async def _read_loop(self) -> None:
        reason = "its QMP socket closed"
        try:
            while (message := await self._receive()) is not None:
                self._dispatch(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            reason = f"its QMP socket failed: {e}"
        except ValueError as e:
            reason = f"it sent something that is not QMP: {e}"
        except trio.Cancelled:
            reason = "the QMP connection was closed"
            raise
        finally:
            self._die(reason)

    async def _receive(self) -> dict[str, Any] | None:
        """The next JSON message, None at the end of the stream."""
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = bytearray(rest)
                if line.strip():
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError(f"a message that is not an object: {line[:200]!r}")
                    return message
                continue
            if len(self._buffer) > _MAX_LINE:
                raise ValueError("a message longer than 64 MiB")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            self._event_seq += 1
            self._events.append((self._event_seq, message))
            self._wake_event_waiters()
        elif "id" in message and ("return" in message or "error" in message):
            pending = self._pending.get(message["id"]) if isinstance(message["id"], int) else None
            if pending is not None:
                pending.reply = message
                pending.done.set()

    def _wake_event_waiters(self) -> None:
        self._new_event.set()
        self._new_event = trio.Event()

    def _die(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
        for pending in self._pending.values():
            pending.done.set()
        self._wake_event_waiters()


def file_of(filename: str) -> str | None:
    """The file a node's `file` names: a plain path, or the one inside a json:{...} name
    (QEMU writes those for a node whose backing was set by hand, like an overlay after
    blockdev-snapshot)."""
    if not filename.startswith("json:"):
        return filename or None
    try:
        options: Any = json.loads(filename[5:])
    except ValueError:
        return None
    while isinstance(options, dict):
        if options.get("driver") == "file" and isinstance(options.get("filename"), str):
            return options["filename"]
        options = options.get("file")
    return None
