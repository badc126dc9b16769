"""One scripted session through `virsh -c test:///default` and through `snapfs`, compared
verb by verb (issue 15, item 9).

The test driver keeps its state only as long as its process, so the whole virsh session
runs in ONE virsh process; `echo @@@N` between the commands cuts its output into one piece
per command. Each snapfs command runs as its own process on a real store.

Compared byte for byte where the data allow it: names, trees, parents, current, counts,
messages, blank lines. Creation times differ, so a table's time cells (always 25
characters wide) are masked; snapshot-info is compared field by field (Location differs:
virsh's test driver makes internal snapshots, snapfs external ones; snapfs adds
Compression and Created); snapshot XML by name, parent and description. virsh's test
driver cannot do snapshot-edit (its metadata-only delete is unsupported), so edit is
checked on snapfs alone in test_cli.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import make_image
from lxml import etree

pytestmark = [
    pytest.mark.skipif(shutil.which("virsh") is None, reason="virsh (libvirt-clients) is not installed"),
    pytest.mark.timeout(600),
]

SNAPFS = os.path.join(os.path.dirname(sys.executable), "snapfs")
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}")

# (command, how to compare): exact | table | info | xml | fails
SESSION: list[tuple[str, str]] = [
    ("snapshot-create-as vmt --name s1 --description first", "exact"),
    ("snapshot-create-as vmt --name s2", "exact"),
    ("snapshot-create-as vmt s3 third", "exact"),
    ("snapshot-revert vmt s1", "exact"),
    ("snapshot-create-as vmt --name s4", "exact"),
    ("snapshot-create-as vmt --name s5", "exact"),
    ("snapshot-revert vmt s2", "exact"),
    # every list flag and the combinations virsh accepts
    ("snapshot-list vmt", "table"),
    ("snapshot-list vmt --parent", "table"),
    ("snapshot-list vmt --roots", "table"),
    ("snapshot-list vmt --leaves", "table"),
    ("snapshot-list vmt --no-leaves", "table"),
    ("snapshot-list vmt --name", "exact"),
    ("snapshot-list vmt --tree", "exact"),
    ("snapshot-list vmt --topological", "table"),
    ("snapshot-list vmt --topological --name", "exact"),
    ("snapshot-list vmt --topological --tree", "exact"),
    ("snapshot-list vmt --leaves --name", "exact"),
    ("snapshot-list vmt --roots --name", "exact"),
    ("snapshot-list vmt --parent --leaves", "table"),
    ("snapshot-list vmt --parent --no-leaves", "table"),
    ("snapshot-list vmt --parent --name", "exact"),
    ("snapshot-list vmt --roots --leaves", "table"),
    ("snapshot-list vmt --roots --no-leaves --name", "exact"),
    ("snapshot-list vmt --leaves --no-leaves --name", "exact"),
    ("snapshot-list vmt --metadata --name", "exact"),
    ("snapshot-list vmt --no-metadata --name", "exact"),
    ("snapshot-list vmt --metadata --no-metadata --name", "exact"),
    ("snapshot-list vmt --inactive --name", "exact"),
    ("snapshot-list vmt --active --name", "exact"),
    ("snapshot-list vmt --disk-only --name", "exact"),
    ("snapshot-list vmt --inactive --active", "table"),
    ("snapshot-list vmt --from s1", "table"),
    ("snapshot-list vmt --from s1 --name", "exact"),
    ("snapshot-list vmt --from s1 --parent", "table"),
    ("snapshot-list vmt --from s1 --tree", "exact"),
    ("snapshot-list vmt --from s1 --descendants", "table"),
    ("snapshot-list vmt --from s1 --descendants --name", "exact"),
    ("snapshot-list vmt --from s1 --descendants --tree", "exact"),
    ("snapshot-list vmt --from s1 --descendants --leaves --name", "exact"),
    ("snapshot-list vmt --from s1 --descendants --no-leaves --name", "exact"),
    ("snapshot-list vmt --from s1 --descendants --topological --name", "exact"),
    ("snapshot-list vmt --from s1 --leaves --name", "exact"),
    ("snapshot-list vmt --from s4 --tree", "exact"),
    ("snapshot-list vmt --current", "table"),
    ("snapshot-list vmt --current --name", "exact"),
    ("snapshot-list vmt --current --tree", "exact"),
    ("snapshot-list vmt --current --descendants --name", "exact"),
    ("snapshot-list vmt --current --descendants --tree", "exact"),
    ("snapshot-list vmt --tree --name", "fails"),
    ("snapshot-list vmt --parent --tree", "fails"),
    ("snapshot-list vmt --roots --tree", "fails"),
    ("snapshot-list vmt --leaves --tree", "fails"),
    ("snapshot-list vmt --no-leaves --tree", "fails"),
    ("snapshot-list vmt --parent --roots", "fails"),
    ("snapshot-list vmt --roots --from s1", "fails"),
    ("snapshot-list vmt --roots --current", "fails"),
    ("snapshot-list vmt --from s1 --current", "fails"),
    ("snapshot-list vmt --descendants", "fails"),
    ("snapshot-list vmt --from nosuch", "fails"),
    # info, current, parent, dumpxml
    ("snapshot-info vmt s1", "info"),
    ("snapshot-info vmt --current", "info"),
    ("snapshot-info vmt s5", "info"),
    ("snapshot-current vmt --name", "exact"),
    ("snapshot-current vmt", "xml"),
    ("snapshot-parent vmt s3", "exact"),
    ("snapshot-parent vmt --current", "exact"),
    ("snapshot-parent vmt s5", "exact"),
    ("snapshot-parent vmt s1", "fails"),
    ("snapshot-dumpxml vmt s1", "xml"),
    ("snapshot-dumpxml vmt s3", "xml"),
    ("snapshot-create-as vmt --name x --description 'a<b' --print-xml", "exact"),
    ("snapshot-create-as vmt y --print-xml", "exact"),
    ("snapshot-list vmt --name", "exact"),
    # delete: a leaf, --children-only, --current, --children
    ("snapshot-delete vmt s5", "exact"),
    ("snapshot-list vmt --tree", "exact"),
    ("snapshot-create-as vmt --name s6", "exact"),
    ("snapshot-create-as vmt --name s7", "exact"),
    ("snapshot-list vmt --tree", "exact"),
    ("snapshot-delete vmt s2 --children-only", "exact"),
    ("snapshot-list vmt --parent", "table"),
    ("snapshot-current vmt --name", "exact"),
    ("snapshot-revert vmt --current", "exact"),
    ("snapshot-delete vmt --current", "exact"),
    ("snapshot-current vmt --name", "exact"),
    ("snapshot-list vmt --tree", "exact"),
    ("snapshot-delete vmt s1 --children --children-only", "fails"),
    ("snapshot-delete vmt s1 --children", "exact"),
    ("snapshot-list vmt", "table"),
    ("snapshot-list vmt --name", "exact"),
    ("snapshot-list vmt --tree", "exact"),
    ("snapshot-current vmt --name", "fails"),
    ("snapshot-info vmt --current", "fails"),
]


def virsh_session(domain_xml: str, commands: list[str]) -> tuple[list[str], str]:
    """Every command's stdout, from one virsh process (and all of its stderr)."""
    script = [f"define {domain_xml}"] + [f"echo @@@{i}; {c}" for i, c in enumerate(commands)] + ["echo @@@end"]
    run = subprocess.run(
        ["virsh", "-c", "test:///default", "; ".join(script)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    pieces = re.split(r"^@@@(?:\d+|end)\n", run.stdout, flags=re.M)
    assert len(pieces) == len(commands) + 2, run.stdout + run.stderr
    return pieces[1:-1], run.stderr


def snapfs(store: str, command: str) -> subprocess.CompletedProcess:
    args = subprocess.run(["sh", "-c", f'printf "%s\\n" {command}'], capture_output=True, text=True).stdout
    return subprocess.run([SNAPFS, "--store", store, *args.splitlines()], capture_output=True, text=True, timeout=120)


def info_fields(text: str) -> dict[str, str]:
    fields = dict(line.split(":", 1) for line in text.splitlines() if line)
    return {k: v.strip() for k, v in fields.items() if k not in ("Location", "Compression", "Created")}


def xml_facts(text: str) -> tuple:
    root = etree.fromstring(text.encode())
    return root.findtext("name"), root.findtext("parent/name"), root.findtext("description")


def compare(how: str, command: str, theirs: str, ours: subprocess.CompletedProcess) -> None:
    if how == "fails":
        assert ours.returncode != 0 and theirs.strip() == "", f"{command}: virsh {theirs!r}, snapfs {ours.stdout!r}"
        lines = ours.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapfs: error: "), ours.stderr
        return
    assert ours.returncode == 0, f"{command}: {ours.stderr}"
    if how == "exact":
        assert ours.stdout == theirs, f"{command}:\nvirsh:\n{theirs!r}\nsnapfs:\n{ours.stdout!r}"
    elif how == "table":
        masked_ours, masked_theirs = TIME.sub("T" * 25, ours.stdout), TIME.sub("T" * 25, theirs)
        assert masked_ours == masked_theirs, f"{command}:\nvirsh:\n{theirs}\nsnapfs:\n{ours.stdout}"
    elif how == "info":
        assert info_fields(ours.stdout) == info_fields(theirs), f"{command}:\nvirsh:\n{theirs}\nsnapfs:\n{ours.stdout}"
        assert ours.stdout.endswith("\n\n") and theirs.endswith("\n\n")
    elif how == "xml":
        assert xml_facts(ours.stdout) == xml_facts(theirs), command
    else:
        raise AssertionError(how)


def test_same_session_same_answers(tmp_path):
    image = make_image(str(tmp_path / "vmt.qcow2"), "qcow2")
    domain_xml = tmp_path / "vmt.xml"
    domain_xml.write_text(f"""<domain type='test'>
  <name>vmt</name>
  <memory unit='KiB'>1048576</memory>
  <os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>
      <target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>
""")
    commands = [c for c, _ in SESSION]
    theirs, errors = virsh_session(str(domain_xml), commands)
    store = str(tmp_path / "store")
    defined = snapfs(store, f"define {domain_xml}")
    assert defined.returncode == 0, defined.stderr
    mismatches = []
    for (command, how), their_output in zip(SESSION, theirs, strict=True):
        try:
            compare(how, command, their_output, snapfs(store, command))
        except AssertionError as exc:
            mismatches.append(str(exc))
    assert not mismatches, "\n\n".join(mismatches) + f"\n\nvirsh's errors:\n{errors}"
    failing = sum(1 for _, how in SESSION if how == "fails")
    assert errors.count("error: ") >= failing, errors
