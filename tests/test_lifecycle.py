"""Who runs QEMU (DESIGN section 8): start, shutdown, destroy, domstate, attach, detach through
the command line, the API and the mount, with the real test guest (tests/guest) writing its
counter into the domain's live layer. Never a stub guest, never a fake QMP server.

The module's tests share one store and go in order (the guest boots a few times, each boot
about 7 s under TCG); every QEMU a test starts is killed in teardown, whatever happened.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fsfixtures import Mount, errno_of
from guest.build import guest_files
from guest.counter import Record, check_consistent, read_counter
from guest.vm import boot_args
from helpers import SNAPFS
from refusal import api_refused, cli_refused

import snapfs
from snapfs import api
from snapfs.qemu import process_ended

pytestmark = pytest.mark.timeout(240)

QEMU = "qemu-system-x86_64"
DISK_SIZE = "64M"
COUNTER_LIMIT = 4 << 20
BOOT_TIMEOUT = 120.0
MEMORY_MIB = 192
UUID = "5a1b52c0-0000-4000-8000-00000000beef"


@dataclass
class Lab:
    dir: Path
    store: str
    console: Path
    mount: Mount
    started: list[subprocess.Popen] = field(default_factory=list)  # QEMUs a test ran itself

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SNAPFS, "--store", self.store, *args],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, **(env or {})},
        )

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        return done.stdout

    def domain(self, name: str = "vm1") -> api.Domain:
        return snapfs.open_store(self.store).lookup_domain(name)

    def live(self, name: str = "vm1") -> str:
        """The live layer's real file (the stable name may be a symlink)."""
        return os.path.realpath(self.domain(name).live_paths()["vda"])

    def run_file(self, suffix: str, name: str = "vm1") -> str:
        return os.path.join(self.store, "run", "qemu.d", f"{name}{suffix}")

    def pid(self, name: str = "vm1") -> int:
        with open(self.run_file(".pid", name)) as f:
            return int(f.read())

    def mnt(self, rel: str) -> str:
        return os.path.join(self.mount.path, rel)

    def read(self, rel: str) -> str:
        with open(self.mnt(rel)) as f:
            return f.read()


def guest_args(console: Path) -> list[str]:
    return [*boot_args(), "-serial", f"file:{console}"]


def _define(store: str, images: Path, name: str, memory: bool) -> None:
    base = images / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), DISK_SIZE], check=True)
    sizing = f"<memory unit='MiB'>{MEMORY_MIB}</memory><vcpu>1</vcpu>" if memory else ""
    uuid = f"<uuid>{UUID}</uuid>" if memory else ""
    text = (
        f"<domain type='kvm'><name>{name}</name>{uuid}{sizing}<devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{base}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    snapfs.open_store(store, create=True).define_xml(text)


def _our_qemus(store: str) -> list[int]:
    """Every QEMU whose command line names a path of this store (daemonized ones included)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if cmdline.startswith(QEMU.encode()) and store.encode() in cmdline:
                found.append(int(entry))
    return found


def _kill_all(lab: Lab) -> None:
    for proc in lab.started:
        proc.kill()
        proc.wait(10)
    for pid in _our_qemus(lab.store):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    guest_files()  # build (or find) the guest before any clock starts
    directory = tmp_path_factory.mktemp("life")
    images = directory / "images"
    images.mkdir()
    store = str(directory / "store")
    _define(store, images, "vm1", memory=True)
    _define(store, images, "vm2", memory=False)
    snapfs.open_store(store).lookup_domain("vm1").snapshot_create_xml(
        "<domainsnapshot><name>s0</name></domainsnapshot>"
    )
    mount = Mount(store, str(directory / "mnt")).start()
    lab = Lab(directory, store, directory / "console.log", mount)
    try:
        yield lab
    finally:
        _kill_all(lab)
        mount.stop()


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """The lab with no QEMU left running after the test."""
    try:
        yield lab
    finally:
        _kill_all(lab)


def _progress(path: str) -> Record:
    """The latest counter step of the boot that wrote block 0 (earlier boots' blocks may follow)."""
    blocks = read_counter(path, COUNTER_LIMIT)
    first = blocks[0] if blocks else None
    assert isinstance(first, Record), f"block 0 is {first!r}"
    last = first
    for i, block in enumerate(blocks):
        if not (isinstance(block, Record) and block.tag == first.tag and block.n == i):
            break
        last = block
    return last


def _wait_counter(
    lab: Lab, at_least: int, tag: str | None = None, name: str = "vm1", after: str | None = None
) -> Record:
    """Wait until the live layer holds step `at_least` of a boot (of `tag` when given, not of
    boot `after`)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = _progress(lab.live(name))
        except AssertionError:
            seen = None
        if seen is not None and seen.n >= at_least and seen.tag in (tag or seen.tag,) and seen.tag != after:
            return seen
        time.sleep(0.5)
    console = lab.console.read_text(errors="replace")[-400:] if lab.console.exists() else ""
    raise AssertionError(f"the counter did not reach {at_least} (last {seen}); console: {console!r}")


def _start_cli(lab: Lab) -> None:
    assert lab.ok("start", "vm1", "--", *guest_args(lab.console)) == "Domain 'vm1' started\n\n"


def _tag(lab: Lab) -> str | None:
    """The boot tag in the live layer's block 0 now (None before any boot wrote it)."""
    try:
        return _progress(lab.live()).tag
    except AssertionError:
        return None


def _ensure_running(lab: Lab) -> Record:
    if lab.ok("domstate", "vm1") != "running\n\n":
        before = _tag(lab)
        _start_cli(lab)
        return _wait_counter(lab, 2, after=before)
    return _wait_counter(lab, 2)


# ---- a started domain --------------------------------------------------------------------------


def test_start_via_cli_runs_the_guest_on_the_live_layer(lab: Lab) -> None:
    assert lab.ok("domstate", "vm1") == "shut off\n\n"
    assert lab.read("vm1/state") == "shut off\n"
    _start_cli(lab)
    assert lab.ok("domstate", "vm1", "--reason") == "running (booted)\n\n"
    assert lab.read("vm1/state") == "running\n"
    assert os.stat(lab.mnt("vm1/state")).st_size == len("running\n")
    first = _wait_counter(lab, 3)
    later = _wait_counter(lab, first.n + 5, first.tag)
    assert later.tag == first.tag
    check_consistent(read_counter(lab.live(), COUNTER_LIMIT), "vda")
    # what snapfs gave QEMU: the live layer's real file, the XML's sizing, name and uuid
    with open(f"/proc/{lab.pid()}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert b"-daemonize" in cmdline
    assert cmdline[cmdline.index(b"-m") + 1] == str(MEMORY_MIB).encode()
    assert cmdline[cmdline.index(b"-name") + 1] == b"vm1"
    assert cmdline[cmdline.index(b"-uuid") + 1] == UUID.encode()
    blockdev = json.loads(cmdline[cmdline.index(b"-blockdev") + 1])
    assert blockdev["file"]["filename"] == lab.live()
    assert not os.path.islink(blockdev["file"]["filename"])
    assert b"virtio-blk-pci,id=vda,drive=disk-vda" in cmdline
    recorded = json.loads(Path(lab.store, "domains", "vm1", "qemu.json").read_text())
    assert recorded["args"] == guest_args(lab.console)
    assert lab.domain().state() == [api.VIR_DOMAIN_RUNNING, api.VIR_DOMAIN_RUNNING_BOOTED]
    assert lab.domain().isActive() == 1


def test_changes_to_a_running_domain_are_refused_metadata_works(lab: Lab) -> None:
    """What needs the disks free is refused while it runs (a discard-force under the live
    disk, undefine); snapshots and merges work (tests/test_live.py and tests/test_memory.py
    prove them)."""
    _ensure_running(lab)
    words = ("running", "shut it down")
    cli_refused(lab.cli("snapshot-deactivate", "vm1", "s0", "--deleteforce"), *words)
    dom = lab.domain()
    discard_force = snapfs.DeactivateFlags.DISCARD_FORCE
    api_refused(None, lambda: dom.snapshot_lookup_by_name("s0").deactivate(discard_force), errno.EBUSY, *words)
    os.mkdir(lab.mnt("vm1/snapshots/s1"))  # disk-only, while the guest writes
    Path(lab.mnt("vm1/snapshots/s1/control")).write_text("merge\n")
    cli_refused(lab.cli("undefine", "vm1", "--remove-snapshots"), *words)
    api_refused(None, lambda: snapfs.open_store(lab.store).undefine("vm1", True), errno.EBUSY, *words)
    assert dom.list_snapshot_names() == ["s0"]
    # metadata only: fine while it runs
    lab.ok("snapshot-rename", "vm1", "s0", "first")
    dom.snapshot_lookup_by_name("first").set_description("taken shut off")
    lab.ok("snapshot-rename", "vm1", "first", "s0")
    # the lifecycle's own refusals while it runs, at every door
    cli_refused(lab.cli("start", "vm1"), "already running")
    api_refused(None, dom.create, errno.EBUSY, "already running")
    assert _control(lab, "start") == errno.EBUSY
    cli_refused(lab.cli("detach", "vm1"), "not attached", "shutdown or destroy")
    api_refused(None, dom.detach, errno.EINVAL, "not attached")
    cli_refused(lab.cli("attach", "vm1", lab.run_file(".qmp")), "already running")
    _wait_counter(lab, _progress(lab.live()).n + 3)  # the guest never noticed


def _control(lab: Lab, word: str, name: str = "vm1") -> int:
    """`echo WORD > /<dom>/control` through the shell: 0 or the errno of the refusal."""
    done = subprocess.run(
        ["bash", "-c", f"echo {word} > {lab.mnt(name + '/control')}"],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=180,
    )
    return 0 if done.returncode == 0 else errno_of(done.stderr)


def test_kill9_leaves_a_stale_pidfile_that_reads_shut_off(lab: Lab) -> None:
    _ensure_running(lab)
    pid = lab.pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not process_ended(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(lab.run_file(".pid")) and os.path.exists(lab.run_file(".qmp"))
    assert lab.ok("domstate", "vm1", "--reason") == "shut off (crashed)\n\n"
    assert lab.read("vm1/state") == "shut off\n"
    assert lab.domain().state() == [api.VIR_DOMAIN_SHUTOFF, api.VIR_DOMAIN_SHUTOFF_CRASHED]
    assert lab.domain().isActive() == 0
    cli_refused(lab.cli("shutdown", "vm1"), "not running")
    cli_refused(lab.cli("destroy", "vm1"), "not running")
    assert _control(lab, "destroy") == errno.ESRCH
    # offline operations work again
    lab.ok("snapshot-create-as", "vm1", "after-crash")
    lab.ok("snapshot-delete", "vm1", "after-crash")


def test_start_through_the_mount_reuses_the_recorded_arguments(lab: Lab) -> None:
    assert lab.ok("domstate", "vm1") == "shut off\n\n"
    before = _progress(lab.live())
    assert _control(lab, "start") == 0
    assert lab.read("vm1/state") == "running\n"
    _wait_counter(lab, 3, after=before.tag)  # a new boot, with the recorded kernel and console
    with open(f"/proc/{lab.pid()}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[-len(guest_args(lab.console)) - 1 : -1] == [
            a.encode() for a in guest_args(lab.console)
        ]


def test_shutdown_falls_back_to_quit_after_the_timeout(lab: Lab) -> None:
    _ensure_running(lab)
    pid = lab.pid()
    began = time.monotonic()
    assert lab.ok("shutdown", "vm1", "--timeout", "1.5") == "Domain 'vm1' is being shutdown\n\n"
    took = time.monotonic() - began
    assert 1.5 <= took < 20  # the guest has no ACPI handling: QEMU was told to quit
    assert process_ended(pid)
    assert lab.ok("domstate", "vm1", "--reason") == "shut off (shutdown)\n\n"
    assert lab.read("vm1/state") == "shut off\n"
    assert sorted(os.listdir(os.path.dirname(lab.run_file(".pid")))) == ["vm1.stopped"]
    check = subprocess.run(["qemu-img", "check", lab.live()], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_api_create_destroy_and_the_mount_control(clean: Lab) -> None:
    lab = clean
    dom = lab.domain()
    before = _tag(lab)
    assert dom.create() == 0  # the recorded arguments
    assert dom.state() == [api.VIR_DOMAIN_RUNNING, api.VIR_DOMAIN_RUNNING_BOOTED]
    _wait_counter(lab, 2, after=before)
    pid = lab.pid()
    assert dom.destroy() == 0
    assert process_ended(pid)
    assert dom.state() == [api.VIR_DOMAIN_SHUTOFF, api.VIR_DOMAIN_SHUTOFF_DESTROYED]
    assert lab.ok("domstate", "vm1", "--reason") == "shut off (destroyed)\n\n"
    # the mount's door: start, then destroy
    assert _control(lab, "start") == 0
    pid = lab.pid()
    assert _control(lab, "destroy") == 0
    assert process_ended(pid)
    assert lab.read("vm1/state") == "shut off\n"
    api_refused(None, dom.destroy, errno.ESRCH, "not running")
    api_refused(None, dom.shutdown, errno.ESRCH, "not running")


# ---- attach ------------------------------------------------------------------------------------


def _own_qemu(lab: Lab, sock: Path, images: list[str], extra: list[str] | None = None) -> subprocess.Popen:
    """A QEMU the test starts itself (not daemonized) on `images` (vda, vdb, ...), -qmp `sock`."""
    cmd = [QEMU, *(extra if extra is not None else guest_args(lab.console))]
    cmd += ["-qmp", f"unix:{sock},server=on,wait=off"]
    for i, image in enumerate(images):
        target = f"vd{chr(ord('a') + i)}"
        cmd += ["-blockdev", f"driver=file,node-name={target}-file,filename={image}"]
        cmd += ["-blockdev", f"driver=qcow2,node-name={target}-node,file={target}-file"]
        cmd += ["-device", f"virtio-blk-pci,drive={target}-node,id={target}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lab.started.append(proc)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "QEMU made no QMP socket"
        time.sleep(0.05)
    return proc


def test_attach_and_detach_a_qemu_started_elsewhere(clean: Lab) -> None:
    lab = clean
    assert lab.ok("domstate", "vm1") == "shut off\n\n"
    sock = lab.dir / "own.qmp"
    stable = lab.domain().live_paths()["vda"]  # the stable name, as a script would write it
    before = _tag(lab)
    proc = _own_qemu(lab, sock, [stable])
    booted = _wait_counter(lab, 2, after=before)
    assert lab.ok("attach", "vm1", str(sock)) == "Domain 'vm1' attached\n\n"
    assert os.readlink(lab.run_file(".attached")) == str(sock)
    assert lab.ok("domstate", "vm1", "--reason") == "running (unknown)\n\n"
    assert lab.read("vm1/state") == "running\n"
    assert lab.domain().isActive() == 1
    # QEMU opened the symlink (a -blockdev node): the live snapshot re-points it at the real file
    live_file = os.path.realpath(stable)
    assert lab.ok("snapshot-create-as", "vm1", "s1", "--disk-only") == "Domain snapshot s1 created\n"
    assert lab.domain().snapshot_lookup_by_name("s1").layer_paths()["vda"] == live_file
    assert os.path.realpath(stable) != live_file  # the symlink moved on to the new live layer
    cli_refused(lab.cli("start", "vm1"), "already attached")
    cli_refused(lab.cli("attach", "vm1", str(sock)), "already attached")
    assert lab.ok("detach", "vm1") == "Domain 'vm1' detached\n\n"
    assert lab.ok("domstate", "vm1") == "shut off\n\n"
    assert proc.poll() is None  # detach leaves it running
    _wait_counter(lab, booted.n + 3, booted.tag)
    # the API's door, then destroy through the mount ends the attached QEMU
    lab.domain().attach(str(sock))
    assert lab.domain().state()[0] == api.VIR_DOMAIN_RUNNING
    assert _control(lab, "destroy") == 0
    assert proc.wait(15) is not None
    assert lab.read("vm1/state") == "shut off\n"
    assert not os.path.lexists(lab.run_file(".attached"))


def test_attach_refuses_what_it_cannot_adopt(clean: Lab) -> None:
    lab = clean
    dead = lab.dir / "dead.qmp"
    cli_refused(lab.cli("attach", "vm1", str(dead)), "No QEMU answers", str(dead))
    api_refused(None, lambda: lab.domain().attach(str(dead)), errno.ECONNREFUSED, "No QEMU answers")
    api_refused(None, lambda: lab.domain().attach(""), errno.EINVAL, "QMP socket")
    paused = ["-S", "-accel", "tcg", "-nodefaults", "-display", "none"]
    # a QEMU on another file: vm1's disk is not found
    other = str(lab.dir / "other.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", other, DISK_SIZE], check=True)
    elsewhere = lab.dir / "elsewhere.qmp"
    _own_qemu(lab, elsewhere, [other], paused)
    cli_refused(lab.cli("attach", "vm1", str(elsewhere)), "no disk on the live layer", "vda")
    # vm1's disk, and a writable one of vm2's: refused, vm2's file named
    both = lab.dir / "both.qmp"
    _own_qemu(lab, both, [lab.live("vm1"), lab.live("vm2")], paused)
    line = cli_refused(lab.cli("attach", "vm1", str(both)), "not one of vm1's live disks")
    assert lab.live("vm2") in line
    # a QMP socket another client holds (QEMU 7.2 serves one at a time)
    busy = lab.dir / "busy.qmp"
    spare = str(lab.dir / "spare.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", spare, DISK_SIZE], check=True)
    _own_qemu(lab, busy, [spare], paused)
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(str(busy))
    try:
        holder.recv(4096)  # the greeting: this client is QEMU's one
        cli_refused(lab.cli("attach", "vm1", str(busy)), "another client", "-qmp")
    finally:
        holder.close()
    assert not os.path.lexists(lab.run_file(".attached"))
    assert lab.ok("domstate", "vm1") == "shut off\n\n"


# ---- wrong input, every door (no guest needed) -----------------------------------------------


def test_wrong_input_every_door(clean: Lab) -> None:
    lab = clean
    dom = lab.domain()
    assert lab.ok("domstate", "vm1") == "shut off\n\n"
    for verb in ("start", "shutdown", "destroy", "domstate", "detach"):
        cli_refused(lab.cli(verb, "nosuch"), "no domain named 'nosuch'")
    cli_refused(lab.cli("attach", "nosuch", "/tmp/x"), "no domain named")
    cli_refused(lab.cli("shutdown", "vm1", "--timeout", "soon"), "--timeout")
    cli_refused(lab.cli("shutdown", "vm1", "--timeout", "-1"), "timeout", "seconds")
    api_refused(None, lambda: dom.shutdown(timeout=float("nan")), errno.EINVAL, "timeout")
    api_refused(None, lambda: dom.create(flags=1), errno.EINVAL, "flags")
    api_refused(None, lambda: dom.state(flags=4), errno.EINVAL, "flags")
    cli_refused(lab.cli("shutdown", "vm1"), "not running")
    cli_refused(lab.cli("detach", "vm1"), "not attached")
    # arguments snapfs gives QEMU itself, and QEMU's own refusal of a bad one
    cli_refused(lab.cli("start", "vm1", "--", "-name", "x"), "-name", "itself")
    api_refused(None, lambda: dom.create(qemu_args=["-pidfile", "/tmp/p"]), errno.EINVAL, "-pidfile")
    api_refused(None, lambda: dom.create(qemu_args="-m 64"), errno.EINVAL, "list of strings")
    line = cli_refused(lab.cli("start", "vm1", "--", "-no-such-option"), "QEMU did not start")
    assert "qemu-system-x86_64: -no-such-option: invalid option" in line
    assert lab.ok("domstate", "vm1") == "shut off\n\n"
    assert lab.domain().isActive() == 0
    # the recorded arguments are those of the last start that worked
    recorded = json.loads(Path(lab.store, "domains", "vm1", "qemu.json").read_text())
    assert recorded["args"] == guest_args(lab.console)
    # QEMU missing
    missing = {"SNAPFS_QEMU": str(lab.dir / "no-qemu-here")}
    cli_refused(lab.cli("start", "vm1", env=missing), "QEMU is not installed", "qemu-system-x86")
    # the mount: words, read-only state, a control word for snapshots
    assert _control(lab, "merge") == errno.EINVAL
    assert "Unknown control word 'merge'" in lab.read("vm1/last-error")
    assert _control(lab, "shutdown") == errno.ESRCH
    assert _control(lab, "detach") == errno.EINVAL
    done = subprocess.run(["bash", "-c", f"echo running > {lab.mnt('vm1/state')}"], capture_output=True, text=True)
    assert errno_of(done.stderr) in (errno.EACCES, errno.EPERM)
    assert lab.read("vm1/control") == "start shutdown destroy\n"


def test_start_refused_while_busy_or_unfinished(clean: Lab) -> None:
    lab = clean
    lock = os.open(os.path.join(lab.store, "domains", "vm1", "lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cli_refused(lab.cli("start", "vm1"), "Another operation holds domain 'vm1'")
        assert _control(lab, "start") == errno.EBUSY
    finally:
        os.close(lock)
    journal = Path(lab.store, "domains", "vm1", "journal.json")
    journal.write_text(json.dumps({"operation": "merge", "subject": "s0", "steps": [], "done": 0, "failed": "test"}))
    try:
        cli_refused(lab.cli("start", "vm1"), "unfinished merge s0")
        api_refused(None, lab.domain().create, errno.EBUSY, "unfinished")
    finally:
        journal.unlink()
    assert lab.ok("domstate", "vm1") == "shut off\n\n"


def test_a_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    store = str(deep / "store")
    _define(store, deep, "vm1", memory=False)
    done = subprocess.run([SNAPFS, "--store", store, "start", "vm1"], capture_output=True, text=True, timeout=60)
    cli_refused(done, "longer than", "unix socket")
    assert not _our_qemus(store)
