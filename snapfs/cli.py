"""The command line: virsh's words over the snapshot API (DESIGN section 3)."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable

import trio
from lxml import etree

from . import rules, xml
from .api import drop_final_newline, open_store_core, version
from .catalog import StoreCore
from .domain import DomainCore
from .errors import SnapfsError, invalid, not_found, single
from .records import SnapshotRecord, snapshot_order
from .rules import DeactivateFlags
from .store import default_store_path

EXAMPLES = {
    "define": "snapfs define vm1.xml\n"
    "  snapfs define --name vm1 --disk vda=/images/vm1.qcow2 --disk vdb=/images/data.img,format=raw",
    "undefine": "snapfs undefine vm1 --remove-snapshots",
    "list": "snapfs list",
    "dumpxml": "snapfs dumpxml vm1",
    "mount": "snapfs mount /mnt/snapfs",
    "snapshot-create": "snapfs snapshot-create vm1 snap.xml --compress=zstd",
    "snapshot-create-as": "snapfs snapshot-create-as vm1 --name before-upgrade --description 'kernel 6.1 to 6.6'",
    "snapshot-list": "snapfs snapshot-list vm1 --tree\n"
    "  snapfs snapshot-list vm1 --from before-upgrade --descendants --name",
    "snapshot-dumpxml": "snapfs snapshot-dumpxml vm1 before-upgrade",
    "snapshot-info": "snapfs snapshot-info vm1 --current",
    "snapshot-current": "snapfs snapshot-current vm1 --name",
    "snapshot-parent": "snapfs snapshot-parent vm1 before-upgrade",
    "snapshot-edit": "snapfs snapshot-edit vm1 before-upgrade --rename   (opens $VISUAL or $EDITOR)\n"
    "  snapfs snapshot-edit vm1 before-upgrade --name pre-6.6 --description 'known good'",
    "create-with-snapshot": "snapfs create-with-snapshot vm1 before-upgrade",
    "snapshot-deactivate": "snapfs snapshot-deactivate vm1 before-upgrade --merge",
    "snapshot-delete": "snapfs snapshot-delete vm1 before-upgrade --children",
    "snapshot-rename": "snapfs snapshot-rename vm1 before-upgrade pre-6.6",
    "snapshot-compress": "snapfs snapshot-compress vm1 before-upgrade zstd",
    "snapshot-desc": "snapfs snapshot-desc vm1 before-upgrade 'kernel 6.1, known good'",
}

# Verbs that may create the store; every other verb needs an existing one.
CREATES_STORE = ("define",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """Usage errors too are one sentence on stderr (see `snapfs VERB --help`)."""
        self.exit(2, f"snapfs: error: {self.prog}: {message} (see --help).\n")


def _store_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--store",
        default=default,
        help="the store directory (default: $SNAPFS_STORE, /var/lib/snapfs for root, else $XDG_DATA_HOME/snapfs)",
    )


def _snapshot_arg(p: argparse.ArgumentParser) -> None:
    """NAME, --snapshotname NAME or --current, as virsh takes them."""
    p.add_argument("snapshot", nargs="?", help="the snapshot's name")
    p.add_argument("--snapshotname", dest="snapshotname", metavar="NAME", help="the snapshot's name (as virsh)")
    p.add_argument("--current", action="store_true", help="the current snapshot instead of a name")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snapfs",
        description="Virtual-machine disk snapshots as files, commands and a Python API.",
        epilog="Every verb has --help with an example. Errors are one sentence on stderr, exit status 1.",
    )
    _store_option(parser, None)
    parser.add_argument("--version", action="version", version=f"snapfs {version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = verbs.add_parser(
            name,
            help=help_text,
            description=help_text,
            aliases=list(aliases),
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _store_option(p, argparse.SUPPRESS)  # the store option also works after the verb
        return p

    p = verb("define", "Define a domain from libvirt domain XML (virsh dumpxml output) or from --disk options.")
    p.add_argument("file", nargs="?", help="domain XML file ('-' for stdin)")
    p.add_argument("--name", help="domain name (with --disk)")
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="TARGET=PATH[,format=qcow2|raw]",
        help="a disk; the format is probed once when not given",
    )
    p = verb("undefine", "Remove a domain and the layers snapfs made for it (base images are never touched).")
    p.add_argument("domain")
    p.add_argument(
        "--remove-snapshots", action="store_true", help="also delete its snapshots and the changes in its live disk"
    )
    p = verb("list", "List the domains of the store.")
    p.add_argument("--name", action="store_true", help="names only")
    p = verb("dumpxml", "Print the domain XML, its disks pointing at the live layers.")
    p.add_argument("domain")
    p = verb("mount", "Mount the store as a filesystem (daemonizes unless --foreground).")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground (systemd, tests)")
    p.add_argument("--allow-other", action="store_true", help="let other users use the mount (modes enforced)")
    p.add_argument("--read-only", action="store_true", help="refuse every change with EROFS (backup hosts)")
    _create_verbs(verb)
    _list_verb(verb)
    _reading_verbs(verb)
    _changing_verbs(verb)
    return parser


def _create_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb(
        "snapshot-create",
        "Create a snapshot from domainsnapshot XML (only name, description, "
        "compression are read); with no file, <domainsnapshot/>.",
    )
    p.add_argument("domain")
    p.add_argument("xmlfile", nargs="?", help="snapshot XML file ('-' for stdin)")
    p.add_argument(
        "--compress",
        dest="compress",
        action="store_const",
        const="gzip",
        help="compress the snapshot's layers with gzip (zlib); --compress=zstd for zstd",
    )
    p.add_argument("--compress-kind", dest="compress", choices=["gzip", "zstd"], help=argparse.SUPPRESS)
    p.add_argument("--disk-only", action="store_true", help="accepted: snapfs always snapshots the disks only")
    p = verb("snapshot-create-as", "Create a snapshot from a name and a description.")
    p.add_argument("domain")
    p.add_argument("name", nargs="?")
    p.add_argument("description", nargs="?")
    p.add_argument("--name", dest="name_option", metavar="NAME", help="the snapshot's name (as virsh)")
    p.add_argument("--description", dest="description_option", metavar="TEXT", help="its description (as virsh)")
    p.add_argument("--print-xml", action="store_true", help="print the snapshot XML instead of creating it")
    p.add_argument("--disk-only", action="store_true", help="accepted: snapfs always snapshots the disks only")
    p.add_argument("--memspec", metavar="SPEC", help="only 'no' (snapshot=no) has a meaning: snapfs keeps no memory")


def _list_verb(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("snapshot-list", "List a domain's snapshots (columns, filters and order as virsh).")
    p.add_argument("domain")
    for flag, text in (
        ("--parent", "add a Parent column"),
        ("--roots", "only snapshots without a parent"),
        ("--leaves", "only snapshots without children"),
        ("--no-leaves", "only snapshots with children"),
        ("--metadata", "only snapshots with metadata (all of snapfs's)"),
        ("--no-metadata", "only snapshots without metadata (none in snapfs)"),
        ("--inactive", "only snapshots of a shut-off domain"),
        ("--active", "only snapshots of a running domain"),
        ("--disk-only", "only disk-only snapshots of a running domain"),
        ("--internal", "only internal snapshots (none in snapfs)"),
        ("--external", "only external snapshots (all of snapfs's)"),
        ("--tree", "draw the parent tree"),
        ("--name", "names only"),
        ("--current", "the current snapshot's children (with --descendants: all below it)"),
        ("--descendants", "with --from or --current: every descendant, not only the children"),
        ("--topological", "parents before children instead of by name"),
    ):
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--from", dest="from_", metavar="NAME", help="the children of NAME (with --descendants: all)")


def _reading_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    for name, text in (
        ("snapshot-dumpxml", "Print a snapshot's XML."),
        ("snapshot-info", "Show facts about a snapshot."),
        ("snapshot-parent", "Print the name of a snapshot's parent."),
    ):
        p = verb(name, text)
        p.add_argument("domain")
        _snapshot_arg(p)
    p = verb("snapshot-current", "Print the current snapshot's XML (or its name).")
    p.add_argument("domain")
    p.add_argument("--name", action="store_true")


def _changing_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb(
        "create-with-snapshot",
        "Revert the domain's disks to a snapshot (live changes since the "
        "last snapshot are lost; snapshot first to keep them).",
        ("snapshot-revert",),
    )
    p.add_argument("domain")
    _snapshot_arg(p)
    p.add_argument("--running", action="store_true", help="refused: snapfs cannot start the domain yet")
    p.add_argument("--paused", action="store_true", help="refused: snapfs cannot start the domain yet")
    p = verb(
        "snapshot-deactivate",
        "Deactivate a snapshot: with no flag the live disk stops depending on it; "
        "--merge folds it away keeping its changes; --delete discards it; --deleteforce discards its subtree.",
    )
    p.add_argument("domain")
    p.add_argument("snapshot")
    mode = p.add_mutually_exclusive_group()
    for flag, value in (
        ("--merge", DeactivateFlags.MERGE),
        ("--mergeforce", DeactivateFlags.MERGE_FORCE),
        ("--delete", DeactivateFlags.DISCARD),
        ("--deleteforce", DeactivateFlags.DISCARD_FORCE),
        ("--mergedelete", DeactivateFlags.DISCARD_FORCE),
    ):
        mode.add_argument(flag, dest="flags", action="store_const", const=value)
    p = verb(
        "snapshot-delete",
        "virsh's delete: the restore point goes away, its changes are kept (a merge); the current "
        "disk content never changes. To delete data, use snapshot-deactivate --delete/--deleteforce.",
    )
    p.add_argument("domain")
    _snapshot_arg(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--children", action="store_true", help="also merge away every descendant")
    which.add_argument("--children-only", action="store_true", help="merge away every descendant, keep the snapshot")
    p.add_argument("--metadata", action="store_true", help="refused: snapfs keeps no snapshot apart from its data")
    p = verb(
        "snapshot-edit",
        "Edit a snapshot's name and description: in $VISUAL/$EDITOR as virsh, or with --name/--description.",
    )
    p.add_argument("domain")
    _snapshot_arg(p)
    p.add_argument("--rename", action="store_true", help="allow the edited XML to change the name")
    p.add_argument("--clone", action="store_true", help="refused: snapfs cannot clone a snapshot")
    p.add_argument("--name", dest="new_name", metavar="NEWNAME", help="rename without an editor")
    p.add_argument("--description", dest="new_description", metavar="TEXT", help="set the description")
    p = verb("snapshot-rename", "Rename a snapshot (as libvirt's snapshot-edit --rename or zfs rename).")
    p.add_argument("domain")
    p.add_argument("snapshot")
    p.add_argument("new_name")
    p = verb("snapshot-compress", "Recompress a snapshot's layers: gzip, zstd or none.")
    p.add_argument("domain")
    p.add_argument("snapshot")
    p.add_argument("kind")
    p = verb("snapshot-desc", "Set a snapshot's description.")
    p.add_argument("domain")
    p.add_argument("snapshot")
    p.add_argument("description")


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SnapfsError(exc.errno or 2, f"Cannot read {path}: {exc.strerror}.") from exc


def _parse_disk(text: str) -> tuple[str, str, str | None]:
    target, sep, rest = text.partition("=")
    if not sep or not target or not rest:
        raise invalid(f"--disk {text!r} is not TARGET=PATH[,format=qcow2|raw].")
    path, _, option = rest.partition(",format=")
    return target, path, option or None


def _when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """virsh's table: a leading space, columns padded (not the last), a dashed rule two
    characters longer than the widest line, a blank line after."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)] + [cells[-1]]
        return " " + "   ".join(padded)

    rule = "-" * (1 + sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)]) + "\n\n"


# ---- orders ---------------------------------------------------------------------------------
def store_order(records: Iterable[SnapshotRecord]) -> list[SnapshotRecord]:
    """The store's order of snapshots: creation time, then name."""
    return sorted(records, key=snapshot_order)


def _virsh_order(records: Iterable[SnapshotRecord]) -> list[SnapshotRecord]:
    """virsh sorts a listing by name, case-insensitively (strcasecmp on the bytes)."""
    return sorted(records, key=lambda r: (r.name.encode("utf-8").lower(), r.name))


def _topological(view, roots: list[SnapshotRecord]) -> list[SnapshotRecord]:
    """Parents before children; siblings newest first, as libvirt's drivers walk them."""
    order: list[SnapshotRecord] = []
    stack = list(store_order(roots))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(store_order(view.children(node.id)))
    return order


# ---- snapshot-list ---------------------------------------------------------------------------
_EXCLUSIVE = (
    ("tree", "name", "Options --tree and --name are mutually exclusive."),
    ("parent", "tree", "Options --parent and --tree are mutually exclusive."),
    ("roots", "tree", "Options --roots and --tree are mutually exclusive."),
    ("leaves", "tree", "Options --leaves and --tree are mutually exclusive."),
    ("no_leaves", "tree", "Options --no-leaves and --tree are mutually exclusive."),
    ("parent", "roots", "Options --parent and --roots are mutually exclusive."),
    ("roots", "from_", "Options --roots and --from are mutually exclusive."),
    ("roots", "current", "Options --roots and --current are mutually exclusive."),
    ("from_", "current", "Options --from and --current are mutually exclusive."),
)


def _check_list_options(args: argparse.Namespace) -> None:
    for a, b, message in _EXCLUSIVE:
        if getattr(args, a) and getattr(args, b):
            raise invalid(message)
    if args.descendants and not (args.from_ or args.current):
        raise invalid("Option --descendants requires either --from or --current.")


def _passes_filters(view, snap: SnapshotRecord, args: argparse.Namespace) -> bool:
    """virsh's filter groups: within a group any flag may match, all groups must match."""
    has_children = bool(view.children(snap.id))
    if (args.leaves and has_children) or (args.no_leaves and not has_children):
        return False
    if args.no_metadata and not args.metadata:  # every snapfs snapshot has metadata; both: no filter
        return False
    states = {"inactive": "shutoff", "active": "running", "disk_only": "disk-snapshot"}
    wanted = [state for flag, state in states.items() if getattr(args, flag)]
    if wanted and snap.state not in wanted:
        return False
    return not (args.internal and not args.external)  # every snapfs snapshot is external


def _selected(dom: DomainCore, args: argparse.Namespace) -> tuple[SnapshotRecord | None, list[SnapshotRecord]]:
    """The start of --from/--current (or None) and the snapshots the options select."""
    view = dom.view()
    start = None
    if args.from_ is not None:
        start = dom.lookup(args.from_, view)
    elif args.current:
        start = _current_record(dom)
    if start is None:
        chosen = list(view.snapshots.values())
    elif args.descendants:
        chosen = [view.snapshots[i] for i in rules.subtree(view, start.id)[1:]]
    else:
        chosen = view.children(start.id)
    if args.roots:
        chosen = [s for s in chosen if s.parent is None]
    return start, [s for s in chosen if _passes_filters(view, s, args)]


def _snapshot_list(dom: DomainCore, args: argparse.Namespace) -> str:
    _check_list_options(args)
    view = dom.view()
    start, snaps = _selected(dom, args)
    if args.tree:
        return _tree(view, start, snaps, args.topological)
    snaps = _topological_within(view, snaps) if args.topological else _virsh_order(snaps)
    if args.name:
        return "".join(f"{s.name}\n" for s in snaps) + "\n"
    headers = ["Name", "Creation Time", "State"] + (["Parent"] if args.parent else [])
    rows = []
    for s in snaps:
        row = [s.name, _when(s.creation_time), s.state]
        if args.parent:
            row.append(view.snapshots[s.parent].name if s.parent in view.snapshots else "")
        rows.append(row)
    return _table(headers, rows)


def _topological_within(view, snaps: list[SnapshotRecord]) -> list[SnapshotRecord]:
    wanted = {s.id for s in snaps}
    return [s for s in _topological(view, view.children(None)) if s.id in wanted]


def _tree(view, start: SnapshotRecord | None, snaps: list[SnapshotRecord], topological: bool) -> str:
    """Drawn like `virsh snapshot-list --tree`: the selected snapshots (and the --from or
    --current one at the top), each under its nearest shown parent."""
    shown = {s.id: s for s in snaps}
    if start is not None:
        shown[start.id] = start
    order = _topological_within(view, list(shown.values())) if topological else _virsh_order(shown.values())
    kids: dict[str | None, list[SnapshotRecord]] = {}
    for snap in order:
        parent = None if start is not None and snap.id == start.id else snap.parent
        kids.setdefault(parent if parent in shown else None, []).append(snap)
    lines: list[str] = []

    def visit(snap: SnapshotRecord, last: bool, root: bool, indent: str) -> None:
        lines.append(f"{indent}{'' if root else '+- '}{snap.name}")
        if not root:
            indent += (" " if last else "|") + " "
        children = kids.get(snap.id, [])
        if children:
            lines.append(f"{indent}  |")
        for i, kid in enumerate(children):
            visit(kid, i == len(children) - 1, False, indent + "  ")
        if not children and last:
            lines.append(indent)

    for root in kids.get(None, []):
        visit(root, True, True, "")
    return "".join(f"{line}\n" for line in lines) + "\n"


# ---- reading verbs ------------------------------------------------------------------------
def _snapshot_info(dom: DomainCore, snap: SnapshotRecord) -> str:
    view = dom.view()
    parent = view.snapshots.get(snap.parent) if snap.parent else None
    facts = [
        ("Name", snap.name),
        ("Domain", dom.name),
        ("Current", "yes" if view.current == snap.id else "no"),
        ("State", snap.state),
        ("Location", "external"),
        ("Parent", parent.name if parent else "-"),
        ("Children", str(len(view.children(snap.id)))),
        ("Descendants", str(len(rules.subtree(view, snap.id)) - 1)),
        ("Metadata", "yes"),
        ("Compression", snap.compression),
        ("Created", _when(snap.creation_time)),
    ]
    return "".join(f"{k + ':':<16}{v}\n" for k, v in facts) + "\n"


def _current_record(dom: DomainCore) -> SnapshotRecord:
    view = dom.view()
    if view.current not in view.snapshots:
        raise not_found(f"Domain {dom.name!r} has no current snapshot.")
    return view.snapshots[view.current]


def _chosen(dom: DomainCore, args: argparse.Namespace) -> SnapshotRecord:
    """The snapshot a verb names: NAME, --snapshotname NAME or --current (one of them)."""
    names = [n for n in (args.snapshot, args.snapshotname) if n is not None]
    if len(names) + bool(args.current) > 1:
        raise invalid("Give one snapshot: a name, --snapshotname or --current.")
    if args.current:
        return _current_record(dom)
    if not names:
        raise invalid("A snapshot name or --current is required.")
    return dom.lookup(names[0])


def _parent(dom: DomainCore, snap: SnapshotRecord) -> str:
    view = dom.view()
    if snap.parent not in view.snapshots:
        raise not_found(f"Snapshot {snap.name!r} has no parent.")
    return f"{view.snapshots[snap.parent].name}\n"


# ---- changing verbs -------------------------------------------------------------------------
async def _define(store: StoreCore, args: argparse.Namespace) -> str:
    if args.file and (args.disk or args.name):
        raise invalid("Give either a domain XML file or --name with --disk, not both.")
    if args.file:
        dom, messages = await store.define_xml(_read_input(args.file))
        source = f"from {args.file}"
    elif args.name and args.disk:
        dom, messages = await store.define(args.name, [_parse_disk(d) for d in args.disk])
        source = "from --disk"
    else:
        raise invalid("define needs a domain XML file, or --name and at least one --disk.")
    return "".join(f"{m}\n" for m in messages) + f"Domain '{dom.name}' defined {source}\n"


def _one_of(positional: str | None, option: str | None, what: str) -> str | None:
    if positional is not None and option is not None and positional != option:
        raise invalid(f"The {what} is given twice ({positional!r} and --{what} {option!r}); give it once.")
    return option if option is not None else positional


def _request_xml(name: str | None, description: str | None) -> str:
    """What `snapshot-create-as --print-xml` prints (virsh's document and spacing)."""
    root = etree.Element("domainsnapshot")
    for tag, text in (("name", name), ("description", description)):
        if text is not None:
            etree.SubElement(root, tag).text = text
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n\n\n"


async def _create_as(dom: DomainCore, args: argparse.Namespace) -> str:
    name = _one_of(args.name, args.name_option, "name")
    description = _one_of(args.description, args.description_option, "description")
    if args.memspec is not None and args.memspec not in ("no", "snapshot=no"):
        raise SnapfsError(
            errno.EOPNOTSUPP,
            "snapfs snapshots the disks of a shut-off domain and keeps no memory: --memspec has no use.",
        )
    if args.print_xml:
        return _request_xml(name, description)
    return await _created(dom.create(name, description))


async def _revert(dom: DomainCore, args: argparse.Namespace) -> str:
    if args.running or args.paused:
        raise SnapfsError(
            errno.EOPNOTSUPP,
            "snapfs cannot start the domain yet: revert without --running/--paused, then start it yourself.",
        )
    snap = _chosen(dom, args)
    await dom.revert(snap.id)
    return f"Domain snapshot {snap.name} reverted\n\n"


async def _delete(dom: DomainCore, args: argparse.Namespace) -> str:
    """virsh's delete never changes the current disk content: every deletion is a merge.
    The descendants go first, deepest first, so each merge has at most its own children."""
    if args.metadata:
        raise SnapfsError(
            errno.EOPNOTSUPP,
            "snapfs keeps no snapshot apart from its data, so --metadata cannot delete metadata only; "
            "snapshot-delete without it merges the snapshot away and keeps every byte.",
        )
    snap = _chosen(dom, args)
    view = dom.view()
    doomed = rules.subtree(view, snap.id)[1:] if args.children or args.children_only else []
    for snap_id in reversed(doomed):
        await dom.merge(snap_id)
    if args.children_only:
        return f"Domain snapshot {snap.name} children deleted\n\n"
    await dom.merge(snap.id)
    return f"Domain snapshot {snap.name} deleted\n\n"


async def _edit(dom: DomainCore, args: argparse.Namespace) -> str:
    if args.clone:
        raise SnapfsError(errno.EOPNOTSUPP, "snapfs cannot clone a snapshot: --clone is not supported.")
    snap = _chosen(dom, args)
    if args.new_name is None and args.new_description is None:
        edited = await _edit_in_editor(dom.snapshot_xml(snap.id))
        if edited is None:
            return f"Snapshot {snap.name} XML configuration not changed.\n"
        request = xml.parse_snapshot_request(edited)
        if request.name is not None and request.name != snap.name and not args.rename:
            raise invalid(f"Must use --rename to change {snap.name} to {request.name}.")
        new_name, description, compression = request.name, request.description or "", request.compression
    else:
        new_name, description, compression = args.new_name, args.new_description, None
    if description is not None and description != snap.description:
        await dom.set_description(snap.id, drop_final_newline(description))
    if compression is not None and compression != snap.compression:
        await dom.set_compression(snap.id, compression)
    if new_name is not None and new_name != snap.name:
        await dom.rename(snap.id, new_name)
        return ""  # virsh prints nothing after a rename
    return f"Snapshot {snap.name} edited.\n"


async def _edit_in_editor(text: str) -> str | None:
    """virsh's editing: $VISUAL, else $EDITOR, else vi, on a temporary copy; None when unchanged."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, path = tempfile.mkstemp(prefix="snapfs-", suffix=".xml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        done = await trio.run_process([*shlex.split(editor), path], check=False, stdin=None)
        if done.returncode != 0:
            failed = f"The editor {editor!r} failed (status {done.returncode}); nothing changed."
            raise SnapfsError(errno.ECANCELED, failed)
        with open(path) as f:
            edited = f.read()
    finally:
        os.unlink(path)
    return None if edited == text else edited


async def _deactivate(dom: DomainCore, args: argparse.Namespace) -> str:
    snap = dom.lookup(args.snapshot)
    flags = args.flags or DeactivateFlags.NONE
    await dom.deactivate(snap.id, flags)
    done = {
        DeactivateFlags.NONE: "deactivated",
        DeactivateFlags.MERGE: "merged",
        DeactivateFlags.MERGE_FORCE: "merged",
        DeactivateFlags.DISCARD: "deleted",
        DeactivateFlags.DISCARD_FORCE: "deleted with its children",
    }[flags]
    return f"Domain snapshot {snap.name} {done}\n"


async def _extension(dom: DomainCore, args: argparse.Namespace) -> str:
    """snapfs's own verbs: rename, compress, desc."""
    snap = dom.lookup(args.snapshot)
    if args.verb == "snapshot-rename":
        await dom.rename(snap.id, args.new_name)
        return f"Domain snapshot {snap.name} renamed to {args.new_name}\n"
    if args.verb == "snapshot-compress":
        await dom.set_compression(snap.id, args.kind)
        return f"Domain snapshot {snap.name} compression set to {args.kind}\n"
    await dom.set_description(snap.id, drop_final_newline(args.description))
    return f"Domain snapshot {snap.name} description set\n"


def _list_row(dom: DomainCore) -> list[str]:
    """Name, snapshots, current; and a status when the domain is broken (a corrupt metadata
    file) or waits for an unfinished operation."""
    health = dom.health()
    if health and health.startswith("broken"):
        return [dom.name, "-", "-", health]
    row = [dom.name, str(len(dom.view().snapshots)), _current_name(dom) or "-"]
    return row + [health] if health else row


async def _store_verb(store: StoreCore, args: argparse.Namespace) -> str:
    if args.verb == "define":
        return await _define(store, args)
    if args.verb == "list" and args.name:
        return "".join(f"{n}\n" for n in store.domain_names())
    if args.verb == "list":
        rows = [_list_row(store.domain(n)) for n in store.domain_names()]
        if all(len(row) == 3 for row in rows):
            return _table(["Name", "Snapshots", "Current"], rows)
        return _table(["Name", "Snapshots", "Current", "Status"], [row + [""] * (4 - len(row)) for row in rows])
    await store.undefine(args.domain, args.remove_snapshots)
    return f"Domain '{args.domain}' has been undefined\n"


async def _run_verb(store: StoreCore, args: argparse.Namespace) -> str:
    verb = args.verb
    if verb in ("define", "list", "undefine"):
        return await _store_verb(store, args)
    dom = store.domain(args.domain)
    verbs: dict[str, Callable[[], Awaitable[str]]] = {
        "dumpxml": lambda: _text(dom.domain_xml()),
        "snapshot-create": lambda: _create_from_file(dom, args),
        "snapshot-create-as": lambda: _create_as(dom, args),
        "snapshot-list": lambda: _text(_snapshot_list(dom, args)),
        "snapshot-current": lambda: _current(dom, args.name),
        "snapshot-dumpxml": lambda: _text(dom.snapshot_xml(_chosen(dom, args).id)),
        "snapshot-info": lambda: _text(_snapshot_info(dom, _chosen(dom, args))),
        "snapshot-parent": lambda: _text(_parent(dom, _chosen(dom, args))),
        "create-with-snapshot": lambda: _revert(dom, args),
        "snapshot-revert": lambda: _revert(dom, args),
        "snapshot-deactivate": lambda: _deactivate(dom, args),
        "snapshot-delete": lambda: _delete(dom, args),
        "snapshot-edit": lambda: _edit(dom, args),
        "snapshot-rename": lambda: _extension(dom, args),
        "snapshot-compress": lambda: _extension(dom, args),
        "snapshot-desc": lambda: _extension(dom, args),
    }
    if verb not in verbs:
        raise invalid(f"Unknown verb {verb!r}.")
    return await verbs[verb]()


async def _text(text: str) -> str:
    return text


async def _created(pending: Awaitable[SnapshotRecord]) -> str:
    snap = await pending
    return f"Domain snapshot {snap.name} created\n"


async def _create_from_file(dom: DomainCore, args: argparse.Namespace) -> str:
    text = _read_input(args.xmlfile) if args.xmlfile else b"<domainsnapshot/>"
    return await _created(dom.create_from_xml(text, args.compress))


def _current_name(dom: DomainCore) -> str | None:
    view = dom.view()
    return view.snapshots[view.current].name if view.current in view.snapshots else None


async def _current(dom: DomainCore, name_only: bool) -> str:
    current = _current_record(dom)
    return f"{current.name}\n" if name_only else dom.snapshot_xml(current.id)


async def _main(args: argparse.Namespace) -> str:
    store = open_store_core(args.store or default_store_path(), create=args.verb in CREATES_STORE)
    await store.recover()
    if not (sys.stderr.isatty() and getattr(args, "domain", None)):
        return await _run_verb(store, args)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_show_progress, store, args.domain)
        try:
            return await _run_verb(store, args)
        finally:
            nursery.cancel_scope.cancel()


async def _show_progress(store: StoreCore, domain: str) -> None:
    """On a terminal: one line that follows the domain's job file (qemu-img's progress)."""
    shown = ""
    try:
        files = store.domain(domain).files
        while True:
            line = files.job().strip()
            if line != shown:
                sys.stderr.write(f"\r\033[K{line}")
                sys.stderr.flush()
                shown = line
            await trio.sleep(0.2)
    except SnapfsError:
        return
    finally:
        if shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _spell_out_compress(argv: list[str]) -> list[str]:
    """`--compress` may come before the domain (the seed's order), so it takes no value
    by position; `--compress=zstd` is rewritten to a hidden option that does."""
    return [f"--compress-kind={a.split('=', 1)[1]}" if a.startswith("--compress=") else a for a in argv]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_spell_out_compress(sys.argv[1:] if argv is None else argv))
    try:
        if args.verb == "mount":
            from .mount import run_mount

            store = args.store or default_store_path()
            return run_mount(store, args.mountpoint, args.foreground, args.allow_other, args.read_only)
        sys.stdout.write(trio.run(_main, args))
    except BaseException as caught:  # noqa: BLE001  (the edge: every failure is one sentence)
        return _failed(single(caught))
    return 0


def _failed(exc: BaseException) -> int:
    """One line on stderr for a failure and the exit status: 130 for Ctrl-C, 1 otherwise.
    A traceback only with SNAPFS_DEBUG=1."""
    if isinstance(exc, KeyboardInterrupt):
        print("snapfs: interrupted; an operation cut short is finished by the next change.", file=sys.stderr)
        return 130
    if isinstance(exc, SystemExit):
        raise exc
    if os.environ.get("SNAPFS_DEBUG") == "1":
        traceback.print_exception(exc)
    message = exc.message if isinstance(exc, SnapfsError) else f"unexpected {type(exc).__name__}: {exc}"
    print(f"snapfs: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
