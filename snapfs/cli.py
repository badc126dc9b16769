"""The command line: virsh's words over the snapshot API (DESIGN section 3)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from .domain import DeactivateFlags, DomainCore, StoreCore
from .errors import SnapfsError, invalid
from .store import SnapshotRecord, default_store_path

EXAMPLES = {
    "define": "snapfs define vm1.xml\n"
    "  snapfs define --name vm1 --disk vda=/images/vm1.qcow2 --disk vdb=/images/data.img,format=raw",
    "undefine": "snapfs undefine vm1 --remove-snapshots",
    "list": "snapfs list",
    "dumpxml": "snapfs dumpxml vm1",
    "mount": "snapfs mount /mnt/snapfs",
    "snapshot-create": "snapfs snapshot-create vm1 snap.xml --compress=zstd",
    "snapshot-create-as": "snapfs snapshot-create-as vm1 before-upgrade 'kernel 6.1 to 6.6'",
    "snapshot-list": "snapfs snapshot-list vm1 --tree",
    "snapshot-dumpxml": "snapfs snapshot-dumpxml vm1 before-upgrade",
    "snapshot-info": "snapfs snapshot-info vm1 before-upgrade",
    "snapshot-current": "snapfs snapshot-current vm1 --name",
    "create-with-snapshot": "snapfs create-with-snapshot vm1 before-upgrade",
    "snapshot-deactivate": "snapfs snapshot-deactivate vm1 before-upgrade --merge",
    "snapshot-delete": "snapfs snapshot-delete vm1 before-upgrade --children",
    "snapshot-rename": "snapfs snapshot-rename vm1 before-upgrade pre-6.6",
    "snapshot-compress": "snapfs snapshot-compress vm1 before-upgrade zstd",
    "snapshot-desc": "snapfs snapshot-desc vm1 before-upgrade 'kernel 6.1, known good'",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """Usage errors too are one sentence on stderr (see `snapfs VERB --help`)."""
        self.exit(2, f"snapfs: error: {self.prog}: {message} (see --help).\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snapfs",
        description="Virtual-machine disk snapshots as files, commands and a Python API.",
        epilog="Every verb has --help with an example. Errors are one sentence on stderr, exit status 1.",
    )
    parser.add_argument(
        "--store",
        default=None,
        help="the store directory (default: $SNAPFS_STORE, /var/lib/snapfs for root, else $XDG_DATA_HOME/snapfs)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        return verbs.add_parser(
            name,
            help=help_text,
            description=help_text,
            aliases=list(aliases),
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

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
    p = verb("snapshot-create-as", "Create a snapshot from a name and a description.")
    p.add_argument("domain")
    p.add_argument("name", nargs="?")
    p.add_argument("description", nargs="?")
    p = verb("snapshot-list", "List a domain's snapshots (columns as virsh).")
    p.add_argument("domain")
    shape = p.add_mutually_exclusive_group()
    for flag, text in (
        ("--tree", "draw the parent tree"),
        ("--parent", "add a Parent column"),
        ("--roots", "only snapshots without a parent"),
        ("--leaves", "only snapshots without children"),
        ("--name", "names only"),
    ):
        shape.add_argument(flag, action="store_true", help=text)
    for name, text in (
        ("snapshot-dumpxml", "Print a snapshot's XML."),
        ("snapshot-info", "Show facts about a snapshot."),
        (
            "create-with-snapshot",
            "Revert the domain's disks to a snapshot (live changes since the "
            "last snapshot are lost; snapshot first to keep them).",
        ),
    ):
        p = verb(name, text, ("snapshot-revert",) if name == "create-with-snapshot" else ())
        p.add_argument("domain")
        p.add_argument("snapshot")
    p = verb("snapshot-current", "Print the current snapshot's XML (or its name).")
    p.add_argument("domain")
    p.add_argument("--name", action="store_true")
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
        "libvirt's delete: merge the snapshot away, or with --children discard it and its whole subtree.",
    )
    p.add_argument("domain")
    p.add_argument("snapshot")
    p.add_argument("--children", action="store_true")
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
    return parser


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
    """virsh's table: a leading space, columns padded, a dashed rule."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return (" " + "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))).rstrip()

    rule = "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)]) + "\n"


def _tree(dom: DomainCore) -> str:
    """Drawn like `virsh snapshot-list --tree`."""
    view = dom.view()
    lines: list[str] = []

    def visit(snap: SnapshotRecord, last: bool, root: bool, indent: str) -> None:
        lines.append(f"{indent}{'' if root else '+- '}{snap.name}")
        if not root:
            indent += (" " if last else "|") + " "
        kids = sorted(view.children(snap.id), key=lambda r: r.name)
        if kids:
            lines.append(f"{indent}  |")
        for i, kid in enumerate(kids):
            visit(kid, i == len(kids) - 1, False, indent + "  ")
        if not kids and last:
            lines.append(indent)

    for root in sorted(view.children(None), key=lambda r: r.name):
        visit(root, True, True, "")
    return "\n".join(lines) + ("\n" if lines else "")


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


async def _snapshot_list(dom: DomainCore, args: argparse.Namespace) -> str:
    if args.tree:
        return _tree(dom)
    view = dom.view()
    snaps = sorted(view.snapshots.values(), key=lambda r: r.name)
    if args.roots:
        snaps = [s for s in snaps if s.parent is None]
    if args.leaves:
        snaps = [s for s in snaps if not view.children(s.id)]
    if args.name:
        return "".join(f"{s.name}\n" for s in snaps)
    headers = ["Name", "Creation Time", "State"] + (["Parent"] if args.parent else [])
    rows = []
    for s in snaps:
        row = [s.name, _when(s.creation_time), s.state]
        if args.parent:
            row.append(view.snapshots[s.parent].name if s.parent in view.snapshots else "")
        rows.append(row)
    return _table(headers, rows)


def _snapshot_info(dom: DomainCore, snap: SnapshotRecord) -> str:
    view = dom.view()
    parent = view.snapshots.get(snap.parent) if snap.parent else None
    descendants = -1
    stack = [snap.id]
    while stack:
        descendants += 1
        stack.extend(c.id for c in view.children(stack.pop()))
    facts = [
        ("Name", snap.name),
        ("Domain", dom.name),
        ("Current", "yes" if view.current == snap.id else "no"),
        ("State", snap.state),
        ("Location", "external"),
        ("Parent", parent.name if parent else "-"),
        ("Children", str(len(view.children(snap.id)))),
        ("Descendants", str(descendants)),
        ("Metadata", "yes"),
        ("Compression", snap.compression),
        ("Created", _when(snap.creation_time)),
    ]
    return "".join(f"{k + ':':<16}{v}\n" for k, v in facts)


async def _run_verb(store: StoreCore, args: argparse.Namespace) -> str:
    verb = args.verb
    if verb == "define":
        return await _define(store, args)
    if verb == "list" and args.name:
        return "".join(f"{n}\n" for n in store.domain_names())
    if verb == "list":
        return _table(
            ["Name", "Snapshots", "Current"],
            [
                [n, str(len(store.domain(n).view().snapshots)), _current_name(store.domain(n)) or "-"]
                for n in store.domain_names()
            ],
        )
    if verb == "undefine":
        await store.undefine(args.domain, args.remove_snapshots)
        return f"Domain '{args.domain}' has been undefined\n"
    dom = store.domain(args.domain)
    simple: dict[str, Callable[[], Awaitable[str]]] = {
        "dumpxml": lambda: _text(dom.domain_xml()),
        "snapshot-create": lambda: _create_from_file(dom, args),
        "snapshot-create-as": lambda: _created(dom.create(args.name, args.description)),
        "snapshot-list": lambda: _snapshot_list(dom, args),
        "snapshot-current": lambda: _current(dom, args.name),
    }
    if verb in simple:
        return await simple[verb]()
    snap = dom.lookup(args.snapshot)
    if verb == "snapshot-dumpxml":
        return dom.snapshot_xml(snap.id)
    if verb == "snapshot-info":
        return _snapshot_info(dom, snap)
    if verb in ("create-with-snapshot", "snapshot-revert"):
        await dom.revert(snap.id)
        return f"Domain '{dom.name}' reverted to snapshot {snap.name}\n"
    if verb == "snapshot-deactivate":
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
    if verb == "snapshot-delete":
        await (dom.discard_force(snap.id) if args.children else dom.merge(snap.id))
        return f"Domain snapshot {snap.name} deleted\n"
    if verb == "snapshot-rename":
        await dom.rename(snap.id, args.new_name)
        return f"Domain snapshot {snap.name} renamed to {args.new_name}\n"
    if verb == "snapshot-compress":
        await dom.set_compression(snap.id, args.kind)
        return f"Domain snapshot {snap.name} compression set to {args.kind}\n"
    if verb == "snapshot-desc":
        await dom.set_description(snap.id, args.description)
        return f"Domain snapshot {snap.name} description set\n"
    raise invalid(f"Unknown verb {verb!r}.")


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
    current = dom.view().current
    if current is None:
        raise SnapfsError(2, f"Domain {dom.name!r} has no current snapshot.")
    return f"{dom.get(current).name}\n" if name_only else dom.snapshot_xml(current)


async def _main(args: argparse.Namespace) -> str:
    store = StoreCore(args.store or default_store_path())
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
    except SnapfsError as exc:
        print(f"snapfs: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
