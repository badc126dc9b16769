"""The command line, through the installed `snapfs` script, on real images."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import CLUSTER, file_digest, has_pattern, make_image, read_raw, tree_fingerprint, write_pattern

SNAPFS = os.path.join(os.path.dirname(sys.executable), "snapfs")


def run(store: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SNAPFS, "--store", store, *args], capture_output=True, text=True, input=stdin, timeout=120)


def ok(store: str, *args: str) -> str:
    result = run(store, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def cli_domain(tmp_path):
    """Domain vm1 defined through the CLI: vda on a qcow2 base, vdb on a raw base."""
    store = str(tmp_path / "store")
    vda = make_image(str(tmp_path / "vda.qcow2"), "qcow2")
    vdb = make_image(str(tmp_path / "vdb.raw"), "raw")
    out = ok(store, "define", "--name", "vm1", "--disk", f"vda={vda}", "--disk", f"vdb={vdb},format=raw")
    assert "vda:" in out and "probed as qcow2" in out and "Domain 'vm1' defined" in out
    bases = {vda: file_digest(vda), vdb: file_digest(vdb)}
    yield store, bases
    assert {p: file_digest(p) for p in bases} == bases, "a base image changed"


def live(store: str, target: str) -> str:
    return os.path.join(store, "domains", "vm1", "layers", target, "live.qcow2")


def rows(text: str) -> list[str]:
    """The rows of a virsh table (after the header and rule, before the blank line)."""
    return [line for line in text.splitlines()[2:] if line]


def layer_of(store: str, name: str, target: str) -> str:
    xml = ok(store, "snapshot-dumpxml", "vm1", name)
    marker = f"layers/{target}/"
    start = xml.index(marker)
    end = xml.index(".qcow2", start) + len(".qcow2")
    return os.path.join(store, "domains", "vm1", xml[start:end])


def test_seed_verbs_as_written(cli_domain, tmp_path):
    """The seed's virsh lines: snapshot-create [--compress] <dom> <xmlfile>, snapshot-list,
    snapshot-dumpxml, create-with-snapshot, snapshot-deactivate --merge/--delete/..."""
    store, _ = cli_domain
    for target in ("vda", "vdb"):
        write_pattern(live(store, target), 0x11, 0)
    xmlfile = tmp_path / "s1.xml"
    xmlfile.write_text("<domainsnapshot><name>s1</name><description>first</description></domainsnapshot>")
    assert "Domain snapshot s1 created" in ok(store, "snapshot-create", "--compress", "vm1", str(xmlfile))
    for target in ("vda", "vdb"):
        write_pattern(live(store, target), 0x22, CLUSTER)
    ok(store, "snapshot-create-as", "vm1", "s2", "second")
    listing = ok(store, "snapshot-list", "vm1")
    assert listing.splitlines()[0].split() == ["Name", "Creation", "Time", "State"]
    assert [line.split()[0] for line in rows(listing)] == ["s1", "s2"]
    xml = ok(store, "snapshot-dumpxml", "vm1", "s1")
    assert "<compression>gzip</compression>" in xml and "<description>first</description>" in xml

    ok(store, "create-with-snapshot", "vm1", "s1")
    for target in ("vda", "vdb"):
        assert has_pattern(live(store, target), 0x11, 0)
        assert has_pattern(live(store, target), 0x00, CLUSTER)
    assert ok(store, "snapshot-current", "vm1", "--name") == "s1\n"

    ok(store, "snapshot-deactivate", "vm1", "s1", "--merge")  # two dependents: s2 and the live disk
    assert ok(store, "snapshot-list", "vm1", "--name") == "s2\n\n"
    for target in ("vda", "vdb"):
        s2 = layer_of(store, "s2", target)
        assert has_pattern(s2, 0x11, 0) and has_pattern(s2, 0x22, CLUSTER)
        assert has_pattern(live(store, target), 0x11, 0) and has_pattern(live(store, target), 0, CLUSTER)
    ok(store, "snapshot-deactivate", "vm1", "s2", "--delete")
    assert ok(store, "snapshot-list", "vm1", "--name") == "\n"


def test_tree_parent_roots_leaves_info(cli_domain):
    store, _ = cli_domain
    ok(store, "snapshot-create-as", "vm1", "a")
    ok(store, "snapshot-create-as", "vm1", "b")
    ok(store, "snapshot-revert", "vm1", "a")
    ok(store, "snapshot-create-as", "vm1", "c")
    assert ok(store, "snapshot-list", "vm1", "--tree") == "a\n  |\n  +- b\n  +- c\n    \n\n"
    parent_rows = {line.split()[0]: line.split()[-1] for line in rows(ok(store, "snapshot-list", "vm1", "--parent"))}
    assert parent_rows == {"a": "shutoff", "b": "a", "c": "a"}
    roots = rows(ok(store, "snapshot-list", "vm1", "--roots"))
    assert [r.split()[0] for r in roots] == ["a"]
    leaves = rows(ok(store, "snapshot-list", "vm1", "--leaves"))
    assert [r.split()[0] for r in leaves] == ["b", "c"]
    info = dict(line.split(":", 1) for line in ok(store, "snapshot-info", "vm1", "a").splitlines() if line)
    assert info["Children"].strip() == "2" and info["Descendants"].strip() == "2" and info["Parent"].strip() == "-"
    assert info["Current"].strip() == "no"
    assert "<name>c</name>" in ok(store, "snapshot-current", "vm1")
    domains = rows(ok(store, "list"))
    assert domains[0].split() == ["vm1", "3", "c"]


def test_rename_compress_desc_delete_children(cli_domain):
    store, _ = cli_domain
    write_pattern(live(store, "vda"), 0x33, 0, 4 * CLUSTER)
    ok(store, "snapshot-create-as", "vm1", "a")
    ok(store, "snapshot-create-as", "vm1", "b")
    ok(store, "snapshot-rename", "vm1", "a", "renamed a")
    assert "<parent>\n    <name>renamed a</name>" in ok(store, "snapshot-dumpxml", "vm1", "b")
    ok(store, "snapshot-compress", "vm1", "renamed a", "zstd")
    assert has_pattern(layer_of(store, "renamed a", "vda"), 0x33, 0, 4 * CLUSTER)
    ok(store, "snapshot-desc", "vm1", "b", "hello")
    assert "<description>hello</description>" in ok(store, "snapshot-dumpxml", "vm1", "b")
    ok(store, "snapshot-delete", "vm1", "renamed a", "--children")
    assert has_pattern(live(store, "vda"), 0x33, 0, 4 * CLUSTER), "delete --children changed the live disk"
    assert ok(store, "snapshot-list", "vm1", "--name") == "\n"


def test_define_from_virsh_xml_and_undefine(tmp_path):
    store = str(tmp_path / "store")
    disk = make_image(str(tmp_path / "d.qcow2"), "qcow2")
    raw = make_image(str(tmp_path / "r.img"), "raw")
    xml = tmp_path / "vm.xml"
    xml.write_text(f"""<domain type='kvm'>
  <name>vm2</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{raw}'/>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk' snapshot='no'><driver name='qemu' type='raw'/><source file='{raw}'/>
      <target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/></disk>
    <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdd' bus='virtio'/></disk>
  </devices>
</domain>""")
    out = ok(store, "define", str(xml))
    assert "vdc: snapshot='no'" in out and "sda: a cdrom" in out and "vdd: only file-backed" in out
    dumped = ok(store, "dumpxml", "vm2")
    assert "layers/vda/live.qcow2" in dumped and "layers/vdb/live.qcow2" in dumped
    assert "6695eb01-f6a4-8304-79aa-97f2502e193f" in dumped and '<memory unit="KiB">1048576</memory>' in dumped
    ok(store, "snapshot-create-as", "vm2", "s")
    refused = run(store, "undefine", "vm2")
    assert refused.returncode != 0 and "1 snapshot" in refused.stderr
    ok(store, "undefine", "vm2", "--remove-snapshots")
    assert rows(ok(store, "list")) == []
    assert os.path.exists(disk) and os.path.exists(raw)


def _refused(store: str, *args: str, says: str, stdin: str | None = None) -> None:
    before = tree_fingerprint(store)
    result = run(store, *args, stdin=stdin)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapfs: error: "), result.stderr
    assert says.lower() in lines[0].lower(), lines[0]
    assert tree_fingerprint(store) == before, f"{args} changed the store"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("snapshot-create-as", "nosuch", "x"), "no domain named 'nosuch'"),
        (("snapshot-create-as", "vm1", "a"), "already has a snapshot named 'a'"),
        (("snapshot-create-as", "vm1", ".hidden"), "cannot start with '.'"),
        (("snapshot-create-as", "vm1", "x" * 256), "at most 255 bytes"),
        (("snapshot-dumpxml", "vm1", "nosuch"), "no snapshot named 'nosuch'"),
        (("create-with-snapshot", "vm1", "nosuch"), "no snapshot named"),
        (("snapshot-deactivate", "vm1", "a", "--delete"), "cannot be discarded"),
        (("snapshot-deactivate", "vm1", "a", "--merge", "--delete"), "not allowed with"),
        (("snapshot-rename", "vm1", "a", "b"), "already has a snapshot named 'b'"),
        (("snapshot-rename", "vm1", "a", "x/y"), "cannot contain '/'"),
        (("snapshot-compress", "vm1", "a", "lz4"), "unknown compression"),
        (("snapshot-create", "vm1", "--compress=lz4"), "invalid choice"),
        (("snapshot-create", "vm1", "/nonexistent.xml"), "cannot read /nonexistent.xml"),
        (("snapshot-current", "nosuch"), "no domain"),
        (("define", "--name", "vm1", "--disk", "vda=/nonexistent.img"), "already a domain named"),
        (("define", "--name", "vm9", "--disk", "vda=/nonexistent.img"), "does not exist"),
        (("define", "--name", "vm9", "--disk", "vda=/tmp"), "/tmp is not a regular file"),
        (("define", "--name", "vm3", "--disk", "vda"), "is not target=path"),
        (("define",), "needs a domain xml file"),
        (("undefine", "vm1"), "pass --remove-snapshots"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_input_is_one_sentence_and_changes_nothing(cli_domain, args, says):
    store, _ = cli_domain
    ok(store, "snapshot-create-as", "vm1", "a")
    ok(store, "snapshot-create-as", "vm1", "b")
    _refused(store, *args, says=says)


def test_stdin_documents_are_refused(cli_domain):
    store, _ = cli_domain
    ok(store, "snapshot-create-as", "vm1", "a")
    bomb = (
        '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        "<domainsnapshot><name>&b;</name></domainsnapshot>"
    )
    for text, says in (
        ("<domainsnapshot><name>x</name>", "not well-formed"),
        ("<domain/>", "root element is <domain>"),
        (bomb, "doctype"),
        (
            '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domainsnapshot><name>&x;</name></domainsnapshot>',
            "doctype",
        ),
        ("<domainsnapshot><name>x</name><compression>lz4</compression></domainsnapshot>", "unknown compression"),
        ("<domainsnapshot>" + "<x/>" * 300000 + "</domainsnapshot>", "larger than"),
    ):
        _refused(store, "snapshot-create", "vm1", "-", says=says, stdin=text)
    _refused(store, "define", "-", says="not well-formed", stdin="not xml")


def test_in_use_image_is_refused(cli_domain, tmp_path):
    store, _ = cli_domain
    sock = str(tmp_path / "nbd.sock")
    subprocess.run(
        [
            "qemu-nbd",
            "--fork",
            "-f",
            "qcow2",
            f"--socket={sock}",
            "--pid-file",
            str(tmp_path / "pid"),
            live(store, "vdb"),
        ],
        check=True,
    )
    try:
        _refused(store, "snapshot-create-as", "vm1", "x", says="in use by another process")
    finally:
        with open(tmp_path / "pid") as f:
            os.kill(int(f.read()), 15)


@pytest.mark.xfail(strict=True, reason="README updated by the lead")
def test_readme_reference_matches_the_help():
    """README's command-line reference names exactly the verbs `snapfs --help` lists,
    and every verb's --help carries an example."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    documented = {line.split()[3] for line in block.splitlines() if line.startswith("snapfs [--store DIR] ")}
    helped = subprocess.run([SNAPFS, "--help"], capture_output=True, text=True, check=True).stdout
    listed = {
        line.split()[0]
        for line in helped.split("positional arguments:")[1].splitlines()[2:]
        if line.startswith("    ") and not line.startswith("      ")
    }
    assert documented == listed
    for verb in listed:
        text = subprocess.run([SNAPFS, verb, "--help"], capture_output=True, text=True, check=True).stdout
        assert f"example:\n  snapfs {verb}" in text or "example:\n  snapfs " in text, verb


# ---- issue 15 -------------------------------------------------------------------------------
def contents(store: str) -> dict[str, bytes]:
    """The live disks and every snapshot's disks, as raw bytes (qemu-img convert)."""
    found = {f"live/{t}": read_raw(live(store, t)) for t in ("vda", "vdb")}
    for name in ok(store, "snapshot-list", "vm1", "--name").split():
        for target in ("vda", "vdb"):
            found[f"{name}/{target}"] = read_raw(layer_of(store, name, target))
    return found


def same_live_disks(store: str, saved: str) -> None:
    """`qemu-img compare` of each live disk against its raw copy in `saved`."""
    os.makedirs(saved, exist_ok=True)
    for target in ("vda", "vdb"):
        raw = os.path.join(saved, f"{target}.raw")
        if not os.path.exists(raw):
            subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", live(store, target), raw], check=True)
        compared = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", live(store, target), raw],
            capture_output=True,
            text=True,
        )
        assert compared.returncode == 0, compared.stdout + compared.stderr


def identical_to(store: str, before: dict[str, bytes], gone: set[str]) -> None:
    after = contents(store)
    assert set(after) == {k for k in before if k.split("/")[0] not in gone}
    for key, data in after.items():
        assert data == before[key], f"{key} changed"


def test_delete_never_changes_the_current_disk(cli_domain, tmp_path):
    """snapshot-delete is virsh's: restore points go away, the live disk and every other
    snapshot keep their bytes (qemu-io patterns written at each step)."""
    store, _ = cli_domain

    def write(pattern: int, cluster: int) -> None:
        for target in ("vda", "vdb"):
            write_pattern(live(store, target), pattern, cluster * CLUSTER)

    write(0x11, 0)
    ok(store, "snapshot-create-as", "vm1", "s1")
    write(0x22, 1)
    ok(store, "snapshot-create-as", "vm1", "s2")
    write(0x33, 2)
    ok(store, "snapshot-create-as", "vm1", "s3")
    ok(store, "snapshot-revert", "vm1", "s1")
    write(0x44, 1)
    ok(store, "snapshot-create-as", "vm1", "s4")
    write(0x55, 3)
    ok(store, "snapshot-create-as", "vm1", "s5")
    write(0x66, 0)  # live changes on top of s5: they must survive every delete
    before = contents(store)
    same_live_disks(store, str(tmp_path / "saved"))
    _refused(store, "snapshot-delete", "vm1", "s1", "--metadata", says="metadata only")
    assert ok(store, "snapshot-delete", "vm1", "s2", "--children-only") == "Domain snapshot s2 children deleted\n\n"
    identical_to(store, before, {"s3"})
    same_live_disks(store, str(tmp_path / "saved"))
    assert ok(store, "snapshot-delete", "vm1", "s1", "--children") == "Domain snapshot s1 deleted\n\n"
    identical_to(store, before, {"s1", "s2", "s3", "s4", "s5"})
    same_live_disks(store, str(tmp_path / "saved"))
    assert ok(store, "snapshot-list", "vm1", "--name") == "\n"
    for target in ("vda", "vdb"):
        assert has_pattern(live(store, target), 0x66, 0) and has_pattern(live(store, target), 0x44, CLUSTER)
        assert has_pattern(live(store, target), 0x00, 2 * CLUSTER) and has_pattern(
            live(store, target), 0x55, 3 * CLUSTER
        )


def test_delete_current_and_a_middle_snapshot(cli_domain):
    store, _ = cli_domain
    write_pattern(live(store, "vda"), 0x11, 0)
    ok(store, "snapshot-create-as", "vm1", "a")
    write_pattern(live(store, "vda"), 0x22, CLUSTER)
    ok(store, "snapshot-create-as", "vm1", "b")
    write_pattern(live(store, "vda"), 0x33, 2 * CLUSTER)
    before = contents(store)
    assert ok(store, "snapshot-delete", "vm1", "--current") == "Domain snapshot b deleted\n\n"
    identical_to(store, before, {"b"})
    assert ok(store, "snapshot-current", "vm1", "--name") == "a\n"


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "--name"),
        ("snapshot-list", "vm1"),
        ("snapshot-current", "vm1"),
        ("dumpxml", "vm1"),
        ("snapshot-create-as", "vm1", "x"),
        ("undefine", "vm1"),
    ],
)
def test_a_path_that_is_not_a_store_is_an_error(tmp_path, args):
    typo = str(tmp_path / "typo")
    result = run(typo, *args)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.startswith("snapfs: error: There is no snapfs store at") and result.stderr.count("\n") == 1
    assert not os.path.exists(typo), "a reading command made a store"
    env = {**os.environ, "SNAPFS_STORE": typo}
    bare = subprocess.run([SNAPFS, *args], capture_output=True, text=True, env=env, timeout=60)
    assert bare.returncode != 0 and "no snapfs store" in bare.stderr and not os.path.exists(typo)


def test_define_makes_the_store(tmp_path):
    store = str(tmp_path / "new" / "store")
    image = make_image(str(tmp_path / "d.qcow2"), "qcow2")
    ok(store, "define", "--name", "d", "--disk", f"vda={image}")
    assert rows(ok(store, "list"))[0].split() == ["d", "0", "-"]


def test_version_module_and_store_after_the_verb(cli_domain):
    store, _ = cli_domain
    version = subprocess.run([SNAPFS, "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"snapfs \d+\.\d+\.\d+\S*\n", version), version
    module = subprocess.run([sys.executable, "-m", "snapfs", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout == version
    listed = subprocess.run(
        [sys.executable, "-m", "snapfs", "list", "--store", store, "--name"], capture_output=True, text=True
    )
    assert listed.returncode == 0 and listed.stdout == "vm1\n", listed.stderr
    after = subprocess.run([SNAPFS, "snapshot-create-as", "vm1", "a", "--store", store], capture_output=True, text=True)
    assert after.returncode == 0, after.stderr
    assert ok(store, "snapshot-list", "vm1", "--name") == "a\n\n"


def test_list_filters_combine(cli_domain):
    store, _ = cli_domain
    for step in (("a",), ("b",), ("c",)):
        ok(store, "snapshot-create-as", "vm1", *step)
    ok(store, "snapshot-revert", "vm1", "a")
    ok(store, "snapshot-create-as", "vm1", "d")
    assert ok(store, "snapshot-list", "vm1", "--leaves", "--name") == "c\nd\n\n"
    assert ok(store, "snapshot-list", "vm1", "--roots", "--name") == "a\n\n"
    assert ok(store, "snapshot-list", "vm1", "--no-leaves", "--name") == "a\nb\n\n"
    parents = {r.split()[0]: r.split()[-1] for r in rows(ok(store, "snapshot-list", "vm1", "--parent", "--leaves"))}
    assert parents == {"c": "b", "d": "a"}
    assert ok(store, "snapshot-list", "vm1", "--from", "a", "--descendants", "--name") == "b\nc\nd\n\n"
    assert ok(store, "snapshot-list", "vm1", "--current", "--tree") == "d\n\n\n"
    listing = ok(store, "snapshot-list", "vm1")
    lines = listing.splitlines()
    assert len(lines[1]) == max(len(line) for line in [lines[0], *lines[2:]]) + 2 and listing.endswith("\n\n")


def test_virsh_verbs_with_current(cli_domain, tmp_path):
    store, _ = cli_domain
    ok(store, "snapshot-create-as", "vm1", "--name", "a", "--description", "first", "--disk-only")
    ok(store, "snapshot-create-as", "vm1", "--name", "b")
    assert ok(store, "snapshot-parent", "vm1", "--current") == "a\n"
    assert ok(store, "snapshot-parent", "vm1", "b") == "a\n"
    _refused(store, "snapshot-parent", "vm1", "a", says="has no parent")
    assert "Name:           b\n" in ok(store, "snapshot-info", "vm1", "--current")
    assert "<name>b</name>" in ok(store, "snapshot-dumpxml", "vm1", "--current")
    assert "<description>first</description>" in ok(store, "snapshot-dumpxml", "vm1", "--snapshotname", "a")
    printed = ok(store, "snapshot-create-as", "vm1", "--name", "p", "--description", "x<y", "--print-xml")
    assert printed == "<domainsnapshot>\n  <name>p</name>\n  <description>x&lt;y</description>\n</domainsnapshot>\n\n\n"
    assert ok(store, "snapshot-list", "vm1", "--name") == "a\nb\n\n", "--print-xml created a snapshot"
    _refused(store, "snapshot-revert", "vm1", "a", "--running", says="cannot start the domain")
    _refused(store, "snapshot-revert", "vm1", "a", "--paused", says="cannot start the domain")
    _refused(store, "snapshot-info", "vm1", says="name or --current is required")
    _refused(store, "snapshot-create-as", "vm1", "--name", "m", "--memspec", "file=/m", says="--memspec")
    assert ok(store, "snapshot-revert", "vm1", "--current") == "Domain snapshot b reverted\n\n"


def test_snapshot_edit(cli_domain, tmp_path):
    store, _ = cli_domain
    ok(store, "snapshot-create-as", "vm1", "a")
    ok(store, "snapshot-create-as", "vm1", "b")
    assert ok(store, "snapshot-edit", "vm1", "a", "--description", "words\n") == "Snapshot a edited.\n"
    assert "<description>words</description>" in ok(store, "snapshot-dumpxml", "vm1", "a")
    assert ok(store, "snapshot-edit", "vm1", "a", "--name", "aa") == ""
    assert "<parent>\n    <name>aa</name>" in ok(store, "snapshot-dumpxml", "vm1", "b")
    editor = tmp_path / "editor.sh"
    editor.write_text(
        "#!/bin/sh\nsed -i 's#<name>b</name>#<name>bb</name>#; s#</name>#</name><description>d</description>#' \"$1\"\n"
    )
    editor.chmod(0o755)

    def edit(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "EDITOR": str(editor), "VISUAL": ""}
        return subprocess.run(
            [SNAPFS, "--store", store, "snapshot-edit", "vm1", *args], capture_output=True, text=True, env=env
        )

    refused = edit("--current")
    assert refused.returncode != 0 and "Must use --rename to change b to bb" in refused.stderr
    assert ok(store, "snapshot-list", "vm1", "--name") == "aa\nb\n\n"
    renamed = edit("b", "--rename")
    assert renamed.returncode == 0 and renamed.stdout == "", renamed.stderr
    assert ok(store, "snapshot-list", "vm1", "--name") == "aa\nbb\n\n"
    assert "<description>d</description>" in ok(store, "snapshot-dumpxml", "vm1", "bb")
    unchanged = subprocess.run(
        [SNAPFS, "--store", store, "snapshot-edit", "vm1", "bb"],
        capture_output=True,
        text=True,
        env={**os.environ, "EDITOR": "true", "VISUAL": ""},
    )
    assert unchanged.stdout == "Snapshot bb XML configuration not changed.\n", unchanged.stderr
    _refused(store, "snapshot-edit", "vm1", "bb", "--clone", says="cannot clone")


def test_listing_order_is_virsh_s(cli_domain):
    """virsh sorts a listing by name, case-insensitively, whatever the creation order."""
    store, _ = cli_domain
    for name in ("Zed", "alpha", "Mid"):
        ok(store, "snapshot-create-as", "vm1", name)
    assert ok(store, "snapshot-list", "vm1", "--name") == "alpha\nMid\nZed\n\n"
    assert ok(store, "snapshot-list", "vm1", "--topological", "--name") == "Zed\nalpha\nMid\n\n"
