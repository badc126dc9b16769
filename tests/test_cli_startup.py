"""The command line starts fast: a verb that changes nothing imports neither trio nor the
engine nor pyfuse3, and lxml only when it prints XML (issue 16). Each verb runs in its own
Python, which lists the modules it holds as it exits (sys.modules: `-X importtime` leaves out
the modules imported through importlib, as `from . import listing` does through the
package's __getattr__)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import hypothesis
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_MAIN = "import sys; from snapfs.cli import main; sys.exit(main())"
# Writes the names in sys.modules to the file $LIST_MODULES_IN when the run ends, whatever its status.
LISTED = (
    "import atexit, os, sys; "
    "atexit.register(lambda: open(os.environ['LIST_MODULES_IN'], 'w').write(' '.join(sys.modules)))"
)
NEVER_FOR_READING = ("trio", "pyfuse3", "snapfs.engines.qemu_img", "snapfs.qemu", "snapfs.journal", "snapfs.mount")
# Nor, unless it prints XML (xml.py) or --version (importlib.metadata): the standard
# library's heaviest (dataclasses brings inspect, ast and dis; shutil bz2 and lzma), nor the engines' package.
NOR_FOR_TEXT = ("dataclasses", "inspect", "typing", "shutil", "snapfs.engines")
# --help and a usage error need the parser only: not even the store's modules.
NOR_FOR_HELP = ("snapfs.rules", "snapfs.records", "snapfs.listing", "snapfs.api", "snapfs.store", "json")

# (argv after --store STORE, prints XML, exit status)
READING = [
    (["list"], False, 0),
    (["list", "--name"], False, 0),
    (["snapshot-list", "vm1"], False, 0),
    (["snapshot-list", "vm1", "--tree"], False, 0),
    (["snapshot-list", "vm1", "--parent", "--topological"], False, 0),
    (["snapshot-list", "vm1", "--roots", "--name"], False, 0),
    (["snapshot-list", "vm1", "--leaves"], False, 0),
    (["snapshot-list", "vm1", "--no-leaves", "--metadata", "--inactive", "--external"], False, 0),
    (["snapshot-list", "vm1", "--from", "s1", "--descendants"], False, 0),
    (["snapshot-list", "vm1", "--current", "--name"], False, 0),
    (["snapshot-list", "vm1", "--tree", "--name"], False, 1),
    (["snapshot-list", "nosuch"], False, 1),
    (["snapshot-info", "vm1", "s1"], False, 0),
    (["snapshot-info", "vm1", "--current"], False, 0),
    (["snapshot-current", "vm1", "--name"], False, 0),
    (["snapshot-current", "vm1"], True, 0),
    (["snapshot-parent", "vm1", "s2"], False, 0),
    (["snapshot-parent", "vm1", "--snapshotname", "s1"], False, 1),
    (["snapshot-dumpxml", "vm1", "s1"], True, 0),
    (["dumpxml", "vm1"], True, 0),
    (["--help"], False, 0),
    (["--version"], False, 0),
    (["snapshot-list", "--help"], False, 0),
    (["bogus-verb"], False, 2),
    (["snapshot-info"], False, 2),
    (["snapshot-list", "vm1", "--no-such-flag"], False, 2),
]


def imported(store: str, *argv: str, env: dict[str, str] | None = None) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run `snapfs --store STORE ARGV` in a fresh Python; the modules it imported, and the run."""
    with tempfile.NamedTemporaryFile("r") as listed:
        done = subprocess.run(
            [sys.executable, "-c", f"{LISTED}; {RUN_MAIN}", "--store", store, *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**(os.environ if env is None else env), "LIST_MODULES_IN": listed.name},
            timeout=120,
        )
        modules = set(listed.read().split())
    crashed = done.returncode == 86  # SNAPFS_CRASH_AT's os._exit runs no atexit function
    assert "snapfs.cli" in modules or crashed, done.stderr  # the list was read
    return modules, done


@pytest.fixture
def two_snapshots(domain, store_path) -> str:
    """vm1 with s1 and its child s2 (current)."""
    for name in ("s1", "s2"):
        domain.snapshot_create_xml(f"<domainsnapshot><name>{name}</name></domainsnapshot>")
    return store_path


def test_reading_verbs_import_no_trio(two_snapshots):
    failures = []
    for argv, prints_xml, status in READING:
        modules, done = imported(two_snapshots, *argv)
        if done.returncode != status:
            failures.append(f"{argv}: exit status {done.returncode}, not {status}: {done.stderr[-300:]}")
        unwanted = [m for m in NEVER_FOR_READING if m in modules]
        if not prints_xml:
            unwanted += [m for m in ("lxml", "lxml.etree") if m in modules]
        if not prints_xml and argv != ["--version"]:
            unwanted += [m for m in NOR_FOR_TEXT if m in modules]
        if "--help" in argv or status == 2:
            unwanted += [m for m in NOR_FOR_HELP if m in modules]
        elif argv[0] in ("list", "snapshot-list"):  # read by cliquick
            unwanted += [m for m in ("argparse", "gettext", "snapfs.cliargs") if m in modules]
        if unwanted:
            failures.append(f"{argv} imported {unwanted}")
        if prints_xml and "lxml.etree" not in modules:
            failures.append(f"{argv} printed XML without lxml?")
    assert not failures, "\n".join(failures)


def test_reading_verbs_print_what_the_full_path_prints(two_snapshots):
    """The loop-free path prints the bytes the trio path (recovery first) prints."""
    full = (
        "import sys, trio; from snapfs import cli, cliargs; words = sys.argv[1:]; "
        "sys.stdout.write(trio.run(cli._main, cliargs.parser(words).parse_args(words)))"
    )
    for argv in (["list"], ["snapshot-list", "vm1", "--tree"], ["snapshot-info", "vm1", "s1"], ["dumpxml", "vm1"]):
        fast = subprocess.run(
            [sys.executable, "-c", RUN_MAIN, "--store", two_snapshots, *argv], capture_output=True, cwd=ROOT
        )
        slow = subprocess.run(
            [sys.executable, "-c", full, "--store", two_snapshots, *argv], capture_output=True, cwd=ROOT
        )
        assert fast.returncode == 0 and slow.returncode == 0, (fast.stderr, slow.stderr)
        assert fast.stdout == slow.stdout and fast.stdout, argv


def test_changing_verbs_import_no_pyfuse3(two_snapshots):
    for argv in (["snapshot-create-as", "vm1", "s3"], ["snapshot-rename", "vm1", "s3", "s4"]):
        modules, done = imported(two_snapshots, *argv)
        assert done.returncode == 0, done.stderr
        assert "trio" in modules
        assert "pyfuse3" not in modules and "snapfs.mount" not in modules, argv


def test_a_reading_verb_recovers_first(two_snapshots, tmp_path):
    """A crashed operation is finished before a reading verb answers (the full path, with
    trio), as before: the listing shows the snapshot whose create was cut short."""
    trace = str(tmp_path / "steps")
    _, done = imported(
        two_snapshots, "snapshot-create-as", "vm1", "probe", env={**os.environ, "SNAPFS_TRACE_STEPS": trace}
    )
    assert done.returncode == 0, done.stderr
    with open(trace) as f:
        last = f.read().split()[-1]
    crash = {**os.environ, "SNAPFS_CRASH_AT": f"{last}:before"}
    _, crashed = imported(two_snapshots, "snapshot-create-as", "vm1", "cut-short", env=crash)
    assert crashed.returncode == 86, crashed.stderr
    journal = os.path.join(two_snapshots, "domains", "vm1", "journal.json")
    assert os.path.exists(journal)
    modules, listed = imported(two_snapshots, "snapshot-list", "vm1", "--name")
    assert listed.returncode == 0, listed.stderr
    assert "cut-short" in listed.stdout.split()
    assert "trio" in modules and not os.path.exists(journal)


# argv the parser is given, beside READING's: each must parse (or fail, or print help) the
# same with the parser built for it as with every verb's arguments built.
PARSED = [
    ["--store", "S", "snapshot-create-as", "vm1", "n", "d", "--disk-only"],
    ["--store=S", "snapshot-revert", "vm1", "s1", "--running"],
    ["--store", "S", "create-with-snapshot", "vm1", "--current"],
    ["--store", "S", "snapshot-deactivate", "vm1", "s1", "--merge", "--delete"],
    ["--store", "S", "snapshot-create", "vm1", "--compress-kind=zstd"],
    ["--store", "S", "start", "vm1", "--", "-accel", "kvm"],
    ["--store", "S", "shutdown", "vm1", "--timeout", "x"],
    ["--store", "S", "snapshot-list", "vm1", "--par", "--from", "s1"],
    ["--store", "S", "snapshot-list", "vm1", "--from"],
    ["--store", "S", "snapshot-info", "vm1", "--current", "s1"],
    ["--store", "S", "list", "extra"],
    ["--store", "S", "list", "--help"],
    ["--store", "S", "dumpxml"],
    ["--store", "S", "list", "--store", "T"],
    ["--st", "S", "list"],
    ["--store", "-x", "list"],
    ["-h", "list"],
    ["--version", "list"],
    ["-", "list"],
    ["--store", "list", "list"],
    ["--store", "S", "lisst"],
    ["--store", "S"],
    [],
    ["--", "list"],
    ["list", "--", "x"],
    ["-h"],
    ["--store", "S", "--help", "--version"],
    ["--help", "--store=S"],
    ["--sx", "list"],
]


def _parse(parser_for, argv: list[str]) -> tuple[object, ...]:
    """What parsing argv gives: the namespace, or the exit status and what was printed."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return ("parsed", vars(parser_for(argv).parse_args(argv)))
        except SystemExit as exc:
            return ("exit", exc.code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("argv", [["--store", "S", *argv] for argv, _, _ in READING] + PARSED)
def test_the_parser_built_for_an_argv_parses_it_as_the_whole_parser(argv):
    from snapfs import cliargs

    def whole(argv: list[str]):
        return cliargs._build(None)[0]

    assert _parse(cliargs.parser, argv) == _parse(whole, argv)


@pytest.mark.parametrize("columns", [None, "100", "33", "0", "-4", "wide"])
def test_help_is_as_wide_as_argparse_makes_it(monkeypatch, columns):
    """The parser reads the width once (cliargs._columns) as shutil reads it for argparse."""
    import shutil

    from snapfs import cliargs

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cliargs._columns() == shutil.get_terminal_size().columns
    for argv, verb in ((["--help"], None), (["snapshot-list", "vm1"], "snapshot-list")):
        ours, theirs = (_verb_parser(cliargs.parser(argv), verb) for _ in range(2))
        theirs._get_formatter = lambda p=theirs: p.formatter_class(prog=p.prog)  # argparse's own
        assert ours.format_help() == theirs.format_help() and ours.format_usage() == theirs.format_usage()


def _verb_parser(parser, verb: str | None):
    import argparse

    if verb is None:
        return parser
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


QUICK_WORDS = [
    "list",
    "snapshot-list",
    "vm1",
    "s1",
    "",
    "-",
    "--",
    "-h",
    "--help",
    "--store",
    "--store=T",
    "--store=",
    "--st",
    "--from",
    "--from=s1",
    "--fro",
    "--name",
    "--name=x",
    "--no-leaves",
    "--no_leaves",
    "--tree",
    "--disk-only",
    "--version",
    "--compress=zstd",
    "-x",
    "a=b",
    "--bogus",
] + [f"--{flag.replace('_', '-')}" for flag in ("parent", "roots", "leaves", "topological", "current", "descendants")]


def _quick_or_whole(argv: list[str]) -> None:
    """cliquick reads argv as argparse does, or leaves it to argparse (None)."""
    from snapfs import cliargs, cliquick

    quick = cliquick.parse(argv)
    if quick is not None:
        words = cliargs.spell_out_compress(argv)
        assert ("parsed", vars(quick)) == _parse(lambda _: cliargs._build(None)[0], words), argv


@pytest.mark.parametrize(
    "argv",
    [["--store", "S", *argv] for argv, _, _ in READING]
    + PARSED
    + [
        ["list"],
        ["--store=S", "list", "--name", "--name"],
        ["snapshot-list", "--tree", "vm1", "--store", "T"],
        ["snapshot-list", "vm1", "--from=a=b", "--from", ""],
        ["snapshot-list", "", "--name"],
        ["--store", "S", "snapshot-list", "vm1", *[f"--{f.replace('_', '-')}" for f in ("parent", "no_metadata")]],
    ],
)
def test_the_quick_parser_reads_as_argparse(argv):
    from snapfs import cliquick

    _quick_or_whole(argv)
    plain = argv[:3] in (["--store", "S", "list"], ["--store", "S", "snapshot-list"]) and argv[-1] != "--from"
    if plain and all(word not in argv for word in ("extra", "--par", "--no-such-flag", "--help")):
        assert cliquick.parse(argv) is not None, argv  # READING's list and snapshot-list take the quick path


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(hypothesis.strategies.lists(hypothesis.strategies.sampled_from(QUICK_WORDS), max_size=7))
def test_any_words_the_quick_parser_takes_read_as_argparse(words):
    _quick_or_whole(words)
