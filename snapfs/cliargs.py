"""The command line's words: argparse with virsh's verbs, options and examples (DESIGN section 3)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator

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
    "start": "snapfs start vm1 -- -accel kvm -machine q35 -nic user -display none\n"
    "  snapfs start vm1            (again with the recorded arguments)",
    "shutdown": "snapfs shutdown vm1 --timeout 120",
    "destroy": "snapfs destroy vm1",
    "domstate": "snapfs domstate vm1 --reason",
    "attach": "snapfs attach vm1 /run/vm1-snapfs.qmp\n"
    "  (QEMU started with -qmp unix:/run/vm1-snapfs.qmp,server=on,wait=off, a socket for snapfs alone)",
    "detach": "snapfs detach vm1",
}


def version() -> str:
    """The installed snapfs's version (importlib.metadata is loaded only when asked)."""
    from importlib import metadata

    try:
        return metadata.version("snapfs")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Version(argparse.Action):
    """argparse's version action, the version looked up only when --version is given."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show program's version number and exit"
        )

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: object, values: object, option_string: object = None
    ) -> None:
        parser._print_message(f"snapfs {version()}\n", sys.stdout)
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, columns: int, **kwargs: object) -> None:
        self._columns = columns  # before argparse's __init__, which formats the -h option
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _get_formatter(self) -> argparse.HelpFormatter:
        """argparse's, with the terminal's width read once per command line: HelpFormatter
        asks shutil for it each time, and importing shutil brings bz2, lzma and fnmatch."""
        return self.formatter_class(prog=self.prog, width=self._columns - 2)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Usage errors too are one sentence on stderr (see `snapfs VERB --help`)."""
        self.exit(2, f"snapfs: error: {self.prog}: {message} (see --help).\n")


def _columns() -> int:
    """shutil.get_terminal_size().columns, its fallback of 80 included."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


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


class _Unbuilt:
    """Stands for the parser of a verb the command line does not run: its arguments are not
    built (argparse's construction would be most of a reading verb's start-up). Every
    call is accepted and ignored."""

    def __getattr__(self, name: str) -> Callable[..., _Unbuilt]:
        return lambda *args, **kwargs: self


def _verb_in(argv: list[str]) -> str | None:
    """The verb argparse will take from argv: the first word that is neither an option nor
    the value of --store (or of a prefix of it, which argparse accepts). "" when there is
    none (--help, --version or a usage error: no verb's arguments are needed); None after
    `--`, where every verb is built."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return None
        if word.startswith("--s") and "=" not in word:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


@contextlib.contextmanager
def _gettext_once() -> Iterator[None]:
    """argparse has gettext translate the same few words for every verb's parser, and
    gettext searches for catalogues on each call; while the parser is built, each word is
    looked up once (the answer depends only on the environment, which does not change)."""
    original = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.lru_cache(maxsize=None)(original)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        argparse._ = original  # type: ignore[attr-defined]


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser; given the argv it will parse, only the verb found there
    gets its arguments (the others are listed with their help only, as `--help` shows them).
    When nothing but --store comes before a known verb, the other verbs are left out
    altogether: argparse then never looks at them (a verb's parser is all it runs). When
    argv has no verb (`snapfs --help`), the verbs are listed without a parser of their own."""
    chosen = _verb_in(argv) if argv is not None else None
    with _gettext_once():
        if argv is not None and chosen == "" and _plain_options(argv, ("-h", "--help", "--version")):
            return _build(chosen, listed_only=True)[0]
        if argv is not None and chosen and _only_store_before(argv, chosen):
            built, found = _build(chosen, alone=True)
            if found:
                return built
        return _build(chosen)[0]


def _only_store_before(argv: list[str], verb: str) -> bool:
    """Whether the words before `verb` are only `--store DIR` or `--store=DIR`."""
    return _plain_options(argv[: argv.index(verb)], ())


def _plain_options(words: list[str], flags: tuple[str, ...]) -> bool:
    """Whether `words` are only `flags`, `--store DIR` and `--store=DIR` (argparse takes no
    positional word from them)."""
    while words:
        if words[0] in flags or (words[0].startswith("--store=") and len(words[0]) > len("--store=")):
            words = words[1:]
        elif words[0] == "--store" and len(words) > 1 and not words[1].startswith("-"):
            words = words[2:]
        else:
            return False
    return True


def _build(chosen: str | None, alone: bool = False, listed_only: bool = False) -> tuple[argparse.ArgumentParser, bool]:
    """The parser, and whether `chosen` is one of its verbs; with `alone`, the only one; with
    `listed_only`, the verbs are in its help and its choices but have no parser (argparse's
    add_parser without the parser: for an argv from which argparse takes no verb)."""
    found = False
    columns = _columns()
    parser = _Parser(
        columns=columns,
        prog="snapfs",
        description="Virtual-machine disk snapshots as files, commands and a Python API.",
        epilog="Every verb has --help with an example. Errors are one sentence on stderr, exit status 1.",
    )
    _store_option(parser, None)
    parser.add_argument("--version", action=_Version)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        nonlocal found
        found = found or chosen == name or chosen in aliases
        if alone and chosen != name and chosen not in aliases:
            return _Unbuilt()  # type: ignore[return-value]
        if listed_only:
            verbs._choices_actions.append(verbs._ChoicesPseudoAction(name, list(aliases), help_text))  # type: ignore[attr-defined]
            verbs._name_parser_map.update(dict.fromkeys([name, *aliases]))  # type: ignore[attr-defined]
            return _Unbuilt()  # type: ignore[return-value]
        p = verbs.add_parser(
            name,
            help=help_text,
            description=help_text,
            aliases=list(aliases),
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            columns=columns,
        )
        if chosen is not None and chosen != name and chosen not in aliases:
            return _Unbuilt()  # type: ignore[return-value]
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
    _lifecycle_verbs(verb)
    return parser, found


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
    p.add_argument(
        "--disk-only", action="store_true", help="the disks only (without it, a running domain's memory is saved too)"
    )
    p = verb("snapshot-create-as", "Create a snapshot from a name and a description.")
    p.add_argument("domain")
    p.add_argument("name", nargs="?")
    p.add_argument("description", nargs="?")
    p.add_argument("--name", dest="name_option", metavar="NAME", help="the snapshot's name (as virsh)")
    p.add_argument("--description", dest="description_option", metavar="TEXT", help="its description (as virsh)")
    p.add_argument("--print-xml", action="store_true", help="print the snapshot XML instead of creating it")
    p.add_argument(
        "--disk-only", action="store_true", help="the disks only (without it, a running domain's memory is saved too)"
    )
    p.add_argument(
        "--memspec", metavar="SPEC", help="only 'no' (snapshot=no): leave the memory out (snapfs keeps it in its store)"
    )


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
    p.add_argument("--running", action="store_true", help="the domain runs after the revert")
    p.add_argument("--paused", action="store_true", help="the domain is started paused after the revert")
    p = verb(
        "snapshot-deactivate",
        "Deactivate a snapshot: with no flag the live disk stops depending on it; "
        "--merge folds it away keeping its changes; --delete discards it; --deleteforce discards its subtree.",
    )
    p.add_argument("domain")
    p.add_argument("snapshot")
    if not isinstance(p, _Unbuilt):  # rules.py (DeactivateFlags) is imported only for this verb
        _deactivate_modes(p.add_mutually_exclusive_group())
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


def _deactivate_modes(mode: argparse._MutuallyExclusiveGroup) -> None:
    from .rules import DeactivateFlags

    for flag, value in (
        ("--merge", DeactivateFlags.MERGE),
        ("--mergeforce", DeactivateFlags.MERGE_FORCE),
        ("--delete", DeactivateFlags.DISCARD),
        ("--deleteforce", DeactivateFlags.DISCARD_FORCE),
        ("--mergedelete", DeactivateFlags.DISCARD_FORCE),
    ):
        mode.add_argument(flag, dest="flags", action="store_const", const=value)


def spell_out_compress(argv: list[str]) -> list[str]:
    """`--compress` may come before the domain (the seed's order), so it takes no value
    by position; `--compress=zstd` is rewritten to a hidden option that does."""
    return [f"--compress-kind={a.split('=', 1)[1]}" if a.startswith("--compress=") else a for a in argv]


def _lifecycle_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Who runs QEMU (DESIGN section 8)."""
    p = verb(
        "start",
        "Start the domain's QEMU (daemonized) on its live disks; the arguments after -- (machine, "
        "accelerator, network, kernel, display) are recorded and reused by the next start.",
    )
    p.add_argument("domain")
    p.add_argument("qemu_args", nargs="*", metavar="QEMU-ARG", help="after --: QEMU's own arguments")
    p = verb("shutdown", "Shut the domain down: ACPI power button, then QEMU quits after the timeout.")
    p.add_argument("domain")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="how long the guest has (default 60)")
    p = verb("destroy", "End the domain's QEMU at once (the guest is not asked).")
    p.add_argument("domain")
    p = verb("domstate", "Print the domain's state: running, paused or shut off (virsh's words).")
    p.add_argument("domain")
    p.add_argument("--reason", action="store_true", help="also the reason, as virsh")
    p = verb("attach", "Adopt a QEMU started elsewhere whose disks are the domain's live disks.")
    p.add_argument("domain")
    p.add_argument("socket", metavar="QMP-SOCKET", help="a QMP socket of that QEMU that snapfs may use alone")
    p = verb("detach", "Forget an attached QEMU (it keeps running).")
    p.add_argument("domain")
