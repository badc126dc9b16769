"""Fixtures for the FUSE tests: a store with real qemu-img images, mounted in a
subprocess (`python -m snapfs.mount STORE MNT --foreground`), always unmounted.

Mount is the one way the tests start a mount (options such as --allow-other, and an own
process group for kill tests); define_store builds its store with tests/factory.py; the
errno helpers come from tests/refusal.py and are re-exported here for the FUSE tests.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from factory import define_domain, make_base, make_bases
from helpers import (  # noqa: F401  (re-exported for the FUSE tests)
    CLUSTER,
    DISK_SIZE,
    PYTHON,
    REPO,
    SNAPFS,
    MiB,
    file_digest,
    has_pattern,
    make_image,
    tree_fingerprint,
    write_pattern,
)
from refusal import STRERROR, errno_of, os_errno  # noqa: F401  (STRERROR re-exported)

MOUNT_WAIT = 15.0
BASH_ENV = {**os.environ, "LC_ALL": "C"}


# ---- images and patterns: shared with the core tests -----------------------------------
fingerprint = tree_fingerprint


# ---- the store --------------------------------------------------------------------------
@dataclass
class StoreSetup:
    root: str
    images: dict[str, tuple[str, str]]  # target -> (base path, format)


def define_store(tmp: str) -> StoreSetup:
    """vm1: vda on a qcow2 base and vdb on a raw base (4 MiB each); vm2: one qcow2 disk."""
    images_dir = os.path.join(tmp, "images")
    root = os.path.join(tmp, "store")
    bases = make_bases(images_dir)
    define_domain(root, "vm1", bases)
    define_domain(root, "vm2", {"vda": (make_base(os.path.join(images_dir, "vm2.qcow2"), "qcow2", {}), "qcow2")})
    return StoreSetup(root, bases)


def core_call(store_root: str, code: str) -> subprocess.CompletedProcess:
    """Run core API calls in another process: `code` is the body of `async def go(store)`."""
    body = "\n".join("    " + line for line in code.strip().splitlines())
    script = f"import trio\nfrom snapfs.catalog import StoreCore\nasync def go(store):\n{body}\n"
    script += f"trio.run(go, StoreCore({store_root!r}))\n"
    return subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)


# ---- the mount ------------------------------------------------------------------------
def unmount_and_wait(path: str, seconds: float = 10.0) -> None:
    """fusermount3 -u a mount started outside Mount (mount(8), a daemon) and wait until the
    daemon lets go of it."""
    subprocess.run(["fusermount3", "-u", path], check=False, capture_output=True)
    deadline = time.monotonic() + seconds
    while os.path.ismount(path) and time.monotonic() < deadline:
        time.sleep(0.05)


class Mount:
    """A mount in a subprocess; stop() always leaves the mountpoint unmounted. The one way
    the tests start a mount: `options` are extra command-line options (--allow-other);
    `own_session` puts the daemon in its own process group, so that kill_all() takes it and
    its qemu-img children at once (as a power cut would); `via_cli` starts it as users do,
    `snapfs --store STORE mount MOUNTPOINT --foreground`, instead of `python -m snapfs.mount`;
    `umask` is the daemon's umask (the store's modes must not depend on it)."""

    def __init__(
        self,
        store_root: str,
        mountpoint: str,
        env: dict[str, str] | None = None,
        options: tuple[str, ...] = (),
        own_session: bool = False,
        via_cli: bool = False,
        umask: int | None = None,
    ) -> None:
        self.store_root = store_root
        self.path = mountpoint
        self.log_path = mountpoint.rstrip("/") + ".log"
        self.env = {**os.environ, **(env or {})}
        self.options = options
        self.own_session = own_session
        self.via_cli = via_cli
        self.umask = umask
        self.proc: subprocess.Popen | None = None
        self.unmount_errors: list[str] = []

    def start(self) -> Mount:
        os.makedirs(self.path, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
                start_new_session=self.own_session,
                preexec_fn=None if self.umask is None else functools.partial(os.umask, self.umask),
            )
        deadline = time.monotonic() + MOUNT_WAIT
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the mount did not come up:\n{self.log()}")
            time.sleep(0.05)
        return self

    def command(self) -> list[str]:
        if self.via_cli:
            return [SNAPFS, "--store", self.store_root, "mount", self.path, "--foreground", *self.options]
        return [PYTHON, "-m", "snapfs.mount", self.store_root, self.path, "--foreground", *self.options]

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """fusermount3 -u, then wait; kill if it does not end; lazy unmount as a last resort.
        An unmount refused as busy is tried again for a moment: a process forked by another
        test thread can hold a copy of a descriptor opened in the mount until its exec."""
        for _ in range(25):
            if not os.path.ismount(self.path):
                break
            run = subprocess.run(["fusermount3", "-u", self.path], capture_output=True, text=True)
            if run.returncode == 0:
                break
            self.unmount_errors.append(run.stderr.strip())
            time.sleep(0.2)
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                if self.own_session:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                code = self.proc.wait(timeout=10)
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        return code

    def kill_all(self) -> None:
        """SIGKILL to the daemon's whole process group (own_session mounts only)."""
        assert self.proc is not None and self.own_session
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def signal(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=15)

    # paths
    def __truediv__(self, rel: str) -> str:
        return os.path.join(self.path, rel)


@dataclass
class FsEnv:
    """A defined store and its mount."""

    setup: StoreSetup
    mount: Mount

    @property
    def store(self) -> str:
        return self.setup.root

    @property
    def mnt(self) -> str:
        return self.mount.path

    def p(self, rel: str) -> str:
        return os.path.join(self.mount.path, rel)

    def snap(self, name: str, entry: str = "", dom: str = "vm1") -> str:
        path = os.path.join(self.mount.path, dom, "snapshots", name)
        return os.path.join(path, entry) if entry else path

    def read(self, rel: str) -> str:
        with open(self.p(rel), encoding="utf-8") as f:
            return f.read()

    def last_error(self, dom: str = "vm1") -> str:
        return self.read(f"{dom}/last-error")

    def live(self, target: str, dom: str = "vm1") -> str:
        return os.path.join(self.store, "domains", dom, "layers", target, "live.qcow2")

    def layer(self, snapshot: str, target: str, dom: str = "vm1") -> str:
        """L(S) as the mount's snapshot xml names it."""
        text = self.read(f"{dom}/snapshots/{snapshot}/xml")
        found = re.search(rf"<disk name=\"{target}\".*?<source file=\"([^\"]+)\"", text, re.S)
        assert found, text
        return found.group(1)

    def fingerprint(self) -> dict[str, str]:
        return fingerprint(self.store)


def start_env(tmp_path, env: dict[str, str] | None = None, options: tuple[str, ...] = ()) -> Iterator[FsEnv]:
    setup = define_store(str(tmp_path))
    mount = Mount(setup.root, str(tmp_path / "mnt"), env, options)
    mount.start()
    try:
        yield FsEnv(setup, mount)
    finally:
        mount.stop()


@pytest.fixture(name="fs")
def fs_fixture(tmp_path) -> Iterator[FsEnv]:
    """vm1 (two disks) and vm2 in a fresh store, mounted at tmp_path/mnt."""
    yield from start_env(tmp_path)


# ---- two ways to drive the filesystem -----------------------------------------------------
class PyDriver:
    """Python file calls; each returns 0 or the errno."""

    name = "py"

    _call = staticmethod(os_errno)

    def mkdir(self, path: str) -> int:
        return self._call(os.mkdir, path)

    def rmdir(self, path: str) -> int:
        return self._call(os.rmdir, path)

    def rename(self, src: str, dst: str) -> int:
        return self._call(os.rename, src, dst)

    def write(self, path: str, data: bytes) -> int:
        """open(O_WRONLY|O_TRUNC), one write(), close: what `echo > f` does."""

        def go() -> None:
            with open(path, "wb", buffering=0) as f:
                f.write(data)

        return self._call(go)

    def read(self, path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def readlink(self, path: str) -> str:
        return os.readlink(path)


class ShDriver:
    """bash -c with echo/cat/mkdir/rmdir/mv; errno parsed from the tool's message."""

    name = "sh"

    @staticmethod
    def _run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script, "bash", *args], capture_output=True, env=BASH_ENV, timeout=120)

    def _status(self, script: str, *args: str) -> int:
        run = self._run(script, *args)
        if run.returncode == 0:
            return 0
        return errno_of(run.stderr.decode("utf-8", "replace"))

    def mkdir(self, path: str) -> int:
        return self._status('mkdir -- "$1"', path)

    def rmdir(self, path: str) -> int:
        return self._status('rmdir -- "$1"', path)

    def rename(self, src: str, dst: str) -> int:
        return self._status('mv -T -- "$1" "$2"', src, dst)

    def write(self, path: str, data: bytes) -> int:
        """`echo WORD > PATH` for one line of text, else `cat > PATH` fed with the bytes."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and text.endswith("\n") and "\n" not in text[:-1] and "\0" not in text:
            return self.echo(path, text[:-1])
        run = subprocess.run(
            ["bash", "-c", 'cat > "$1"', "bash", path], input=data, capture_output=True, env=BASH_ENV, timeout=120
        )
        if run.returncode == 0:
            return 0
        return errno_of(run.stderr.decode("utf-8", "replace"))

    def echo(self, path: str, word: str) -> int:
        return self._status('echo "$2" > "$1"', path, word)

    def read(self, path: str) -> str:
        run = self._run('cat -- "$1"', path)
        assert run.returncode == 0, run.stderr
        return run.stdout.decode("utf-8")

    def readlink(self, path: str) -> str:
        run = self._run('readlink -- "$1"', path)
        assert run.returncode == 0, run.stderr
        return run.stdout.decode("utf-8").rstrip("\n")


DRIVERS = [PyDriver(), ShDriver()]


@pytest.fixture(name="drive", params=DRIVERS, ids=lambda d: d.name)
def drive_fixture(request) -> PyDriver | ShDriver:
    """Each test that takes `drive` runs twice: Python file calls, then bash."""
    return request.param
