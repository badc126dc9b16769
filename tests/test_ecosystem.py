"""snapfs among other tools: systemd, mount(8), bash completion, and a real libvirt
(`virsh -c test:///default`, the in-process test driver that needs no daemon)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from fsfixtures import unmount_and_wait
from helpers import REPO, SNAPFS, make_image

BIN = os.path.dirname(sys.executable)
needs_virsh = pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) is not installed")


def snapfs(store: str, *args: str) -> str:
    run = subprocess.run([SNAPFS, "--store", store, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def virsh(*commands: str) -> str:
    """One virsh process runs all commands: the test driver's state lives as long as it."""
    run = subprocess.run(
        ["virsh", "-q", "-c", "test:///default", "; ".join(commands)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def domain_xml(path: str, disk: str) -> None:
    with open(path, "w") as f:
        f.write(f"""<domain type='test'>
  <name>vmt</name>
  <memory unit='KiB'>1048576</memory>
  <os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>
""")


@pytest.fixture
def libvirt_domain(tmp_path):
    """A domain defined in libvirt's test driver, dumped by virsh, defined in snapfs."""
    disk = make_image(str(tmp_path / "vmt.qcow2"), "qcow2")
    source = str(tmp_path / "source.xml")
    domain_xml(source, disk)
    dumped = str(tmp_path / "dumped.xml")
    with open(dumped, "w") as f:
        f.write(virsh(f"define {source}", "dumpxml vmt"))
    store = str(tmp_path / "store")
    assert "Domain 'vmt' defined" in snapfs(store, "define", dumped)
    return store, tmp_path


@needs_virsh
def test_virsh_dumpxml_is_accepted_and_kept(libvirt_domain):
    store, tmp_path = libvirt_domain
    ours = snapfs(store, "dumpxml", "vmt")
    with open(tmp_path / "dumped.xml") as f:
        uuid = f.read().split("<uuid>")[1].split("</uuid>")[0]
    assert f"<uuid>{uuid}</uuid>" in ours
    assert "layers/vda/live.qcow2" in ours and '<vcpu placement="static">1</vcpu>' in ours


@needs_virsh
def test_snapshot_xml_is_accepted_by_virsh_redefine(libvirt_domain):
    store, tmp_path = libvirt_domain
    snapfs(store, "snapshot-create-as", "vmt", "a", "first")
    snapfs(store, "snapshot-create-as", "vmt", "b")
    snapfs(store, "snapshot-revert", "vmt", "a")
    snapfs(store, "snapshot-create-as", "vmt", "c")
    files = []
    for name in ("a", "b", "c"):
        path = str(tmp_path / f"{name}.xml")
        with open(path, "w") as f:
            f.write(snapfs(store, "snapshot-dumpxml", "vmt", name))
        files.append(path)
    domain = str(tmp_path / "ours.xml")
    with open(domain, "w") as f:
        f.write(snapfs(store, "dumpxml", "vmt"))
    out = virsh(
        f"define {domain}",
        *(f"snapshot-create vmt {p} --redefine" for p in files),
        "snapshot-list vmt --tree",
        "snapshot-dumpxml vmt a",
    )
    tree = snapfs(store, "snapshot-list", "vmt", "--tree").removesuffix("\n")  # virsh -q: no blank line after
    assert tree in out
    assert "<description>first</description>" in out


@needs_virsh
def test_same_sequence_gives_the_same_tree(libvirt_domain):
    store, tmp_path = libvirt_domain
    steps = [
        ("snapshot-create-as", "vmt", "s1"),
        ("snapshot-create-as", "vmt", "s2"),
        ("snapshot-revert", "vmt", "s1"),
        ("snapshot-create-as", "vmt", "s3"),
        ("snapshot-create-as", "vmt", "s4"),
        ("snapshot-delete", "vmt", "s3"),
        ("snapshot-revert", "vmt", "s2"),
        ("snapshot-create-as", "vmt", "s5"),
    ]
    for step in steps:
        snapfs(store, *step)
    source = str(tmp_path / "source.xml")
    theirs = virsh(f"define {source}", *(" ".join(step) for step in steps), "snapshot-list vmt --tree")
    ours = snapfs(store, "snapshot-list", "vmt", "--tree").removesuffix("\n")  # virsh -q: no blank line after
    assert ours.strip() and ours in theirs, f"snapfs:\n{ours}\nvirsh:\n{theirs}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path):
    with open(os.path.join(REPO, "contrib", "snapfs@.service")) as f:
        unit = f.read().replace("/usr/local/bin/snapfs", SNAPFS)
    path = tmp_path / "snapfs@mnt-snapfs.service"
    path.write_text(unit)
    run = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ExecStart=" in unit and "--foreground" in unit and "fusermount3 -u" in unit


@pytest.mark.timeout(120)
def test_mount_helper(tmp_path):
    store = str(tmp_path / "store")
    disk = make_image(str(tmp_path / "d.qcow2"), "qcow2")
    snapfs(store, "define", "--name", "vm1", "--disk", f"vda={disk}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helper = os.path.join(REPO, "contrib", "mount.fuse.snapfs")
    env = {**os.environ, "SNAPFS": SNAPFS}
    run = subprocess.run(
        [helper, store, str(mnt), "-o", "rw,allow_other"], capture_output=True, text=True, env=env, timeout=60
    )
    try:
        assert run.returncode == 0, run.stderr
        assert os.path.ismount(mnt)
        assert os.listdir(mnt) == ["vm1"]
        with open("/proc/mounts") as f:
            line = next(m for m in f if f" {mnt} " in m)
        assert "fuse.snapfs" in line and "allow_other" in line
    finally:
        unmount_and_wait(str(mnt))
    assert not os.path.ismount(mnt)


def complete(store: str, *words: str) -> list[str]:
    script = (
        f"source {os.path.join(REPO, 'contrib', 'snapfs-completion.bash')}\n"
        f"COMP_WORDS=(snapfs --store {store} {' '.join(words)})\n"
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        "_snapfs\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    return [w for w in run.stdout.splitlines() if w]


def test_bash_completion_from_a_real_store(tmp_path):
    store = str(tmp_path / "store")
    disk = make_image(str(tmp_path / "d.qcow2"), "qcow2")
    snapfs(store, "define", "--name", "vm1", "--disk", f"vda={disk}")
    snapfs(store, "snapshot-create-as", "vm1", "before-upgrade")
    snapfs(store, "snapshot-create-as", "vm1", "before-reboot")
    assert "snapshot-deactivate" in complete(store, "snapshot-d")
    assert complete(store, "snapshot-info", "v") == ["vm1"]
    assert sorted(complete(store, "snapshot-info", "vm1", "before-")) == ["before-reboot", "before-upgrade"]
    assert "--merge" in complete(store, "snapshot-deactivate", "vm1", "before-upgrade", "--m")
    assert complete(store, "snapshot-compress", "vm1", "before-upgrade", "z") == ["zstd"]


def test_bash_completion_knows_the_virsh_verbs(tmp_path):
    store = str(tmp_path / "store")
    disk = make_image(str(tmp_path / "d.qcow2"), "qcow2")
    snapfs(store, "define", "--name", "vm1", "--disk", f"vda={disk}")
    snapfs(store, "snapshot-create-as", "vm1", "before-upgrade")
    assert {"snapshot-parent", "snapshot-edit"} <= set(complete(store, "snapshot-"))
    assert complete(store, "snapshot-parent", "vm1", "bef") == ["before-upgrade"]
    assert complete(store, "snapshot-list", "vm1", "--from", "b") == ["before-upgrade"]
    assert "--children-only" in complete(store, "snapshot-delete", "vm1", "before-upgrade", "--ch")
    assert "--descendants" in complete(store, "snapshot-list", "vm1", "--d")
