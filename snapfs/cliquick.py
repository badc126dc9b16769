"""`snapfs list` and `snapfs snapshot-list DOM` without argparse (issue 16).

Importing argparse (with gettext and locale) and building its parser is a sixth of a
reading verb's start-up. This reads only the plainest command lines of those two verbs:
every word spelled in full, nothing that argparse would treat otherwise (abbreviations,
`--flag=`, `-h`, `--`, words starting with "-", a second positional). Anything else is
None, and cliargs' argparse parser reads it, errors and help included. The namespace is the
one argparse makes (tests/test_cli_startup.py compares them).
"""

from __future__ import annotations

from types import SimpleNamespace

SNAPSHOT_LIST_FLAGS = (
    "parent",
    "roots",
    "leaves",
    "no_leaves",
    "metadata",
    "no_metadata",
    "inactive",
    "active",
    "disk_only",
    "internal",
    "external",
    "tree",
    "name",
    "current",
    "descendants",
    "topological",
)
# Options that take a value: the word after them, or after "=" ({option: namespace field}).
_VALUED = {"--store": "store", "--from": "from_"}


def parse(argv: list[str]) -> SimpleNamespace | None:
    """The namespace of `[--store DIR] list|snapshot-list ...`, or None for argparse."""
    found: dict[str, object] = {"store": None}
    words = _options(argv, found, ("--store",))
    if words is None or not words or words[0] not in ("list", "snapshot-list"):
        return None
    verb = words[0]
    if verb == "list":
        fields: dict[str, object] = {"name": False}
        flags: tuple[str, ...] = ("name",)
        valued: tuple[str, ...] = ("--store",)
    else:
        fields = dict.fromkeys(SNAPSHOT_LIST_FLAGS, False) | {"from_": None}
        flags, valued = SNAPSHOT_LIST_FLAGS, ("--store", "--from")
    positionals = _options(words[1:], fields, valued, flags)
    if positionals is None or len(positionals) != (verb == "snapshot-list"):
        return None
    if positionals:
        fields["domain"] = positionals[0]
    return SimpleNamespace(**(found | {"verb": verb} | fields))  # --store after the verb wins


def _options(
    words: list[str], into: dict[str, object], valued: tuple[str, ...], flags: tuple[str, ...] = ()
) -> list[str] | None:
    """Set the options among `words` in `into`; the other words (all of them after the first
    positional when no flag is allowed: that is the verb), or None when one is not plain."""
    rest: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        option, equals, value = word.partition("=")
        if not word.startswith("-"):
            if not flags:
                return words[index:]
            rest.append(word)
        elif equals and option in valued and value:
            into[_VALUED[option]] = value
        elif word in valued and index + 1 < len(words) and not words[index + 1].startswith("-"):
            index += 1
            into[_VALUED[word]] = words[index]
        elif word.startswith("--") and word[2:].replace("-", "_") in flags and "_" not in word:
            into[word[2:].replace("-", "_")] = True
        else:
            return None
        index += 1
    return rest
