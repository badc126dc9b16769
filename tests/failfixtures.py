"""Shared pieces of the failure tests (issue 12): a store built through the command line,
a CLI runner that checks "one sentence, no traceback", a mount through `snapfs mount`,
the "no leftovers" and "every layer checks clean" checkers, and runs as user nobody.

Everything goes through snapfs's public doors (the `snapfs` command, `snapfs mount`) and
the store's on-disk layout (STORE/domains/<dom>/{journal.json,state.json,domain.json,
last-error,layers/<target>/live.qcow2}), so the tests survive a restructure of the core.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fsfixtures import Mount
from helpers import SNAPFS, MiB, make_image, qemu_check_problems, write_pattern
from refusal import cli_refused

CLI_TIMEOUT = 60.0
# Every temporary shape snapfs writes (issue 12 item 9).
TEMP_PATTERNS = ("*.tmp*", "*.new", "*.rebase", "*.compress", "job.tmp*", "journal.json.tmp*", "*.check.raw")


def _umask022() -> None:
    os.umask(0o022)  # the common default: the store's modes must not depend on it


def cli(store: str, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """`snapfs --store STORE ARGS...`; a hang fails the test (its process group is killed)."""
    proc = subprocess.Popen(
        [SNAPFS, "--store", store, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_umask022,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"snapfs {' '.join(args)} did not finish within {timeout:.0f} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def ok(store: str, *args: str, timeout: float = CLI_TIMEOUT) -> str:
    run = cli(store, *args, timeout=timeout)
    assert run.returncode == 0 and "Traceback" not in run.stderr, f"snapfs {args}: {run.returncode}\n{run.stderr}"
    return run.stdout


def refused(store: str, *args: str, words: tuple[str, ...] = (), timeout: float = CLI_TIMEOUT) -> str:
    return cli_refused(cli(store, *args, timeout=timeout), *words)


# ---- the store -------------------------------------------------------------------------
@dataclass
class FailStore:
    """A store at `root` whose domains are defined with `snapfs define --disk`; the base
    images live in `images`. Every disk is `vda`, qcow2, 64 KiB clusters."""

    root: str
    images: str
    bases: dict[str, str] = field(default_factory=dict)

    def add_domain(self, name: str, size: int = 4 * MiB, base_pattern: int = 0xA1) -> str:
        base = make_image(os.path.join(self.images, f"{name}-base.qcow2"), "qcow2", size)
        write_pattern(base, base_pattern, 0)
        ok(self.root, "define", "--name", name, "--disk", f"vda={base},format=qcow2")
        self.bases[name] = base
        return base

    def domain_dir(self, name: str) -> str:
        return os.path.join(self.root, "domains", name)

    def file(self, name: str, rel: str) -> str:
        return os.path.join(self.domain_dir(name), rel)

    def live(self, name: str) -> str:
        return self.file(name, "layers/vda/live.qcow2")

    def layer(self, name: str, snapshot: str) -> str:
        """L(S) of disk vda, as `snapshot-dumpxml` names it."""
        text = ok(self.root, "snapshot-dumpxml", name, snapshot)
        found = re.search(r"<disk name=.vda.*?<source file=.([^'\"]+)", text, re.S)
        assert found, text
        return found.group(1)

    def snap(self, name: str, snapshot: str) -> str:
        out = ok(self.root, "snapshot-create-as", name, snapshot)
        assert snapshot in out
        return self.layer(name, snapshot)

    def last_error(self, name: str) -> str:
        try:
            with open(self.file(name, "last-error"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def journal_exists(self, name: str) -> bool:
        return os.path.exists(self.file(name, "journal.json"))


def new_store(directory: str) -> FailStore:
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    return FailStore(os.path.join(directory, "store"), images)


@pytest.fixture(name="fstore")
def fstore_fixture(tmp_path) -> FailStore:
    return new_store(str(tmp_path))


@pytest.fixture(name="public_dir")
def public_dir_fixture() -> Iterator[str]:
    """A directory user nobody can traverse (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="snapfs-fail-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- checks ------------------------------------------------------------------------------
def leftovers(root: str) -> list[str]:
    """Temporary files anywhere in the store (run/ holds the mounts' sockets: not data)."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if any(fnmatch.fnmatch(name, p) for p in TEMP_PATTERNS):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def layer_problems(root: str) -> list[str]:
    """`qemu-img check` (no repair) of every layer of every domain, and non-regular files."""
    problems = []
    for dirpath, _, names in os.walk(os.path.join(root, "domains")):
        if os.path.basename(os.path.dirname(dirpath)) != "layers":
            continue
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if name == "live.qcow2":  # the live layer's stable name: a symlink to a real file beside it
                target = os.readlink(path) if os.path.islink(path) else ""
                if "/" in target or not os.path.isfile(os.path.join(dirpath, target)):
                    problems.append(f"{path}: not a symlink to a layer beside it")
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                problems.append(f"{path}: not a regular file")
                continue
            problems += qemu_check_problems(path)
    return problems


def assert_store_clean(root: str) -> None:
    """Issue 12 item 9: after a failure and the next command, no temporary file is left and
    every layer checks clean."""
    assert leftovers(root) == [], f"temporary files left in the store: {leftovers(root)}"
    assert layer_problems(root) == [], layer_problems(root)


def qemu_img_children(root: str) -> list[str]:
    """qemu-img processes still working on files of this store."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-img" and any(root.encode() in a for a in argv):
            found.append(f"{pid}: {b' '.join(argv).decode(errors='replace')}")
    return found


def raw_digest(path: str) -> str:
    """sha256 of an image's whole content through its chain (qemu-img convert -U to raw)."""
    import hashlib

    with tempfile.NamedTemporaryFile(dir="/var/tmp", suffix=".raw") as out:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, out.name], check=True, timeout=120)
        digest = hashlib.sha256()
        with open(out.name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def as_nobody(*argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *argv],
        capture_output=True,
        timeout=timeout,
    )


# ---- a mount through the command line ------------------------------------------------------
def cli_mount(store: str, path: str, allow_other: bool = False) -> Mount:
    """`snapfs mount MOUNTPOINT --foreground [--allow-other]` as a user starts it (umask 022)."""
    options = ("--allow-other",) if allow_other else ()
    return Mount(store, path, options=options, own_session=True, via_cli=True, umask=0o022)


@pytest.fixture(name="mounts")
def mounts_fixture() -> Iterator[list[Mount]]:
    """Mounts a test started: all stopped at teardown, whatever happened."""
    started: list[Mount] = []
    yield started
    for mount in started:
        mount.stop()


def mount_serves(store: str, path: str, domain: str, mounts: list[Mount]) -> Mount:
    """A new mount starts and lists `domain`'s snapshots."""
    mount = cli_mount(store, path)
    mounts.append(mount)
    mount.start()
    assert os.path.isdir(mount / f"{domain}/snapshots"), os.listdir(mount.path)
    os.listdir(mount / f"{domain}/snapshots")
    return mount
