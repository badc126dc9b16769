"""The command line: virsh's words over the snapshot API (DESIGN section 3).

The reading verbs run without trio (and the verbs that print no XML without lxml): when no
domain waits for recovery they are answered synchronously, so a `snapfs list` costs little
more than Python's start-up. trio, lxml, the engine and the store's modules (which --help
and a usage error never need) are imported where they are used.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine

from . import cliquick
from .errors import SnapfsError, invalid, single

TYPE_CHECKING = False  # not typing's: a reading verb does not import typing (issue 16)
if TYPE_CHECKING:  # and listing, rules and records where they are used: --help needs none of them
    import argparse

    from .catalog import StoreCore
    from .domain import DomainCore
    from .records import SnapshotRecord

# Verbs that may create the store; every other verb needs an existing one.
CREATES_STORE = ("define",)
# Verbs that change nothing: answered without trio when no domain waits for recovery.
READING_VERBS = (
    "list",
    "dumpxml",
    "snapshot-list",
    "snapshot-current",
    "snapshot-dumpxml",
    "snapshot-info",
    "snapshot-parent",
)


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


# ---- orders ---------------------------------------------------------------------------------


# ---- snapshot-list ---------------------------------------------------------------------------


# ---- reading verbs ------------------------------------------------------------------------


def _chosen(dom: DomainCore, args: argparse.Namespace) -> SnapshotRecord:
    """The snapshot a verb names: NAME, --snapshotname NAME or --current (one of them)."""
    from . import listing

    names = [n for n in (args.snapshot, args.snapshotname) if n is not None]
    if len(names) + bool(args.current) > 1:
        raise invalid("Give one snapshot: a name, --snapshotname or --current.")
    if args.current:
        return listing.current_record(dom)
    if not names:
        raise invalid("A snapshot name or --current is required.")
    return dom.lookup(names[0])


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
    from lxml import etree

    root = etree.Element("domainsnapshot")
    for tag, text in (("name", name), ("description", description)):
        if text is not None:
            etree.SubElement(root, tag).text = text
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n\n\n"


async def _create_as(dom: DomainCore, args: argparse.Namespace) -> str:
    name = _one_of(args.name, args.name_option, "name")
    description = _one_of(args.description, args.description_option, "description")
    no_memory = args.memspec in ("no", "snapshot=no")
    if args.memspec is not None and not no_memory:
        raise SnapfsError(
            errno.EOPNOTSUPP,
            "snapfs keeps a snapshot's memory in its store: --memspec has no use but 'no' (or use --disk-only).",
        )
    if args.print_xml:
        return _request_xml(name, description)
    return await _created(dom.create(name, description, disk_only=args.disk_only or no_memory))


async def _revert(dom: DomainCore, args: argparse.Namespace) -> str:
    if args.running and args.paused:
        raise invalid("--running and --paused exclude each other.")
    snap = _chosen(dom, args)
    await dom.revert(snap.id, True if args.running else False if args.paused else None)
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
    from . import rules

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
    from . import xml
    from .api import drop_final_newline

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
    import shlex
    import tempfile

    import trio

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
    from .rules import DeactivateFlags

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
    from .api import drop_final_newline

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
    from . import listing

    if args.verb == "define":
        return await _define(store, args)
    if args.verb == "list" and args.name:
        return "".join(f"{n}\n" for n in store.domain_names())
    if args.verb == "list":
        rows = [_list_row(store.domain(n)) for n in store.domain_names()]
        if all(len(row) == 3 for row in rows):
            return listing.table(["Name", "Snapshots", "Current"], rows)
        return listing.table(["Name", "Snapshots", "Current", "Status"], [row + [""] * (4 - len(row)) for row in rows])
    await store.undefine(args.domain, args.remove_snapshots)
    return f"Domain '{args.domain}' has been undefined\n"


async def _run_verb(store: StoreCore, args: argparse.Namespace) -> str:
    from . import listing

    verb = args.verb
    if verb in ("define", "list", "undefine"):
        return await _store_verb(store, args)
    dom = store.domain(args.domain)
    if verb in LIFECYCLE_VERBS:  # only these bring runtime.py (trio, QMP)
        return await _lifecycle_verbs(dom, args)[verb]()
    verbs: dict[str, Callable[[], Awaitable[str]]] = {
        "dumpxml": lambda: _text(dom.domain_xml()),
        "snapshot-create": lambda: _create_from_file(dom, args),
        "snapshot-create-as": lambda: _create_as(dom, args),
        "snapshot-list": lambda: _text(listing.snapshot_list(dom, args)),
        "snapshot-current": lambda: _current(dom, args.name),
        "snapshot-dumpxml": lambda: _text(dom.snapshot_xml(_chosen(dom, args).id)),
        "snapshot-info": lambda: _text(listing.snapshot_info(dom, _chosen(dom, args))),
        "snapshot-parent": lambda: _text(listing.parent_line(dom, _chosen(dom, args))),
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


LIFECYCLE_VERBS = ("start", "shutdown", "destroy", "domstate", "attach", "detach")


def _lifecycle_verbs(dom: DomainCore, args: argparse.Namespace) -> dict[str, Callable[[], Awaitable[str]]]:
    """Who runs QEMU (DESIGN section 8), in virsh's words and output."""
    from . import runtime

    async def done(pending: Awaitable[None], what: str) -> str:
        await pending
        return f"Domain '{dom.name}' {what}\n\n"

    async def domstate() -> str:
        found = await runtime.state(dom.files)
        word = runtime.STATE_WORDS[found[0]]
        return f"{word} ({runtime.reason_word(found)})\n\n" if args.reason else f"{word}\n\n"

    return {
        "start": lambda: done(runtime.start(dom, args.qemu_args or None), "started"),
        "shutdown": lambda: done(runtime.shutdown(dom, args.timeout), "is being shutdown"),
        "destroy": lambda: done(runtime.destroy(dom), "destroyed"),
        "domstate": domstate,
        "attach": lambda: done(runtime.attach(dom, args.socket), "attached"),
        "detach": lambda: done(runtime.detach(dom), "detached"),
    }


async def _text(text: str) -> str:
    return text


async def _created(pending: Awaitable[SnapshotRecord]) -> str:
    snap = await pending
    return f"Domain snapshot {snap.name} created\n"


async def _create_from_file(dom: DomainCore, args: argparse.Namespace) -> str:
    text = _read_input(args.xmlfile) if args.xmlfile else b"<domainsnapshot/>"
    return await _created(dom.create_from_xml(text, args.compress, args.disk_only))


def _current_name(dom: DomainCore) -> str | None:
    view = dom.view()
    return view.snapshots[view.current].name if view.current in view.snapshots else None


async def _current(dom: DomainCore, name_only: bool) -> str:
    from . import listing

    current = listing.current_record(dom)
    return f"{current.name}\n" if name_only else dom.snapshot_xml(current.id)


def _open_store(args: argparse.Namespace, create: bool = False) -> StoreCore:
    from .api import open_store_core
    from .store import default_store_path

    return open_store_core(args.store or default_store_path(), create)


def _read(args: argparse.Namespace) -> str | None:
    """A reading verb's output without an event loop, or None when a domain waits for
    recovery (or its journal cannot be read): then the full path recovers first."""
    store = _open_store(args)
    if any(_needs_recovery(store, name) for name in store.domain_names()):
        return None
    return _without_loop(_run_verb(store, args))


def _needs_recovery(store: StoreCore, name: str) -> bool:
    """Whether StoreCore.recover would do anything for domain `name`: finish a journal, or
    carry an old-layout domain over (store.py)."""
    try:
        files = store.files.domain(name)
        journal = files.read_journal()
        if journal is not None and not journal.get("failed"):
            return True
        return files.needs_carry_over([disk.target for disk in files.record().disks])
    except SnapfsError:
        return True


def _without_loop(coroutine: Coroutine[object, object, str]) -> str:
    """The result of a coroutine that never suspends (a reading verb awaits nothing that
    needs trio), run to its end without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a reading verb waited for the event loop")


async def _main(args: argparse.Namespace) -> str:
    import trio

    store = _open_store(args, create=args.verb in CREATES_STORE)
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
    import trio

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


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = cliquick.parse(words) or _parse(words)
    try:
        if args.verb == "mount":
            from .mount import run_mount
            from .store import default_store_path

            store = args.store or default_store_path()
            return run_mount(store, args.mountpoint, args.foreground, args.allow_other, args.read_only)
        text = _read(args) if args.verb in READING_VERBS else None
        if text is None:
            import trio

            text = trio.run(_main, args)
        sys.stdout.write(text)
    except BaseException as caught:  # noqa: BLE001  (the edge: every failure is one sentence)
        return _failed(single(caught))
    return 0


def _parse(words: list[str]) -> argparse.Namespace:
    """argparse's reading of the command line (help and usage errors end the process)."""
    from . import cliargs

    words = cliargs.spell_out_compress(words)
    return cliargs.parser(words).parse_args(words)


def _failed(exc: BaseException) -> int:
    """One line on stderr for a failure and the exit status: 130 for Ctrl-C, 1 otherwise.
    A traceback only with SNAPFS_DEBUG=1."""
    if isinstance(exc, KeyboardInterrupt):
        print("snapfs: interrupted; an operation cut short is finished by the next change.", file=sys.stderr)
        return 130
    if isinstance(exc, SystemExit):
        raise exc
    if os.environ.get("SNAPFS_DEBUG") == "1":
        import traceback

        traceback.print_exception(exc)
    message = exc.message if isinstance(exc, SnapfsError) else f"unexpected {type(exc).__name__}: {exc}"
    print(f"snapfs: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
