"""What the reading verbs print, in virsh 9.0's formats: snapshot-list (its selections,
filters, orders and tree), snapshot-info, snapshot-parent, and virsh's tables."""

from __future__ import annotations

import time
from collections.abc import Iterable

from . import rules
from .errors import invalid, not_found
from .records import SnapshotRecord, snapshot_order

TYPE_CHECKING = False  # not typing's: a reading verb does not import typing (issue 16)
if TYPE_CHECKING:
    import argparse

    from .domain import DomainCore


def _when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def table(headers: list[str], rows: list[list[str]]) -> str:
    """virsh's table: a leading space, columns padded (not the last), a dashed rule two
    characters longer than the widest line, a blank line after."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)] + [cells[-1]]
        return " " + "   ".join(padded)

    rule = "-" * (1 + sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)]) + "\n\n"


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
        start = current_record(dom)
    if start is None:
        chosen = list(view.snapshots.values())
    elif args.descendants:
        chosen = [view.snapshots[i] for i in rules.subtree(view, start.id)[1:]]
    else:
        chosen = view.children(start.id)
    if args.roots:
        chosen = [s for s in chosen if s.parent is None]
    return start, [s for s in chosen if _passes_filters(view, s, args)]


def snapshot_list(dom: DomainCore, args: argparse.Namespace) -> str:
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
    return table(headers, rows)


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


def snapshot_info(dom: DomainCore, snap: SnapshotRecord) -> str:
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


def current_record(dom: DomainCore) -> SnapshotRecord:
    view = dom.view()
    if view.current not in view.snapshots:
        raise not_found(f"Domain {dom.name!r} has no current snapshot.")
    return view.snapshots[view.current]


def parent_line(dom: DomainCore, snap: SnapshotRecord) -> str:
    view = dom.view()
    if snap.parent not in view.snapshots:
        raise not_found(f"Snapshot {snap.name!r} has no parent.")
    return f"{view.snapshots[snap.parent].name}\n"
