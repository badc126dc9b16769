"""The operations of DESIGN section 1 as pure planning over a domain's metadata.

Each `plan_*` function reads a MetadataView and returns a Plan: a list of INTENTS (what
must happen to the layers and the records, for all disks at once) or a refusal
(SnapfsError). Nothing here touches a file, runs a process or knows an engine: an engine
(engines/) turns each layer intent into its own file steps, and the journal (journal.py)
carries them out. Intents are small JSON-able dicts:

    freeze S              the live layer becomes L(S): its real file keeps its name
    new_live on=S|None names={t: N}
                          a new, empty live layer (real file N per disk) on L(S) (on the
                          base image for None); the live layer's stable name then leads to it
    fold S into=[D...] parent=P
                          S's data goes into its dependents (child snapshots' layers, or
                          "live"), which then sit on P; L(S) is gone afterwards
    drop S|live           delete L(S), or a live layer's real file that nothing uses any more
    recompress S parent=P kind=K
                          rewrite L(S) (which sits on P) compressed with K
    rebase_live onto=P    the live layer moves onto P, keeping its content
    meta_write record     write a snapshot's record
    meta_delete id        delete a snapshot's record
    state current [live]  record `current` (and the live layers' real names): the last step of every change

Every layer intent names the real files it is about, per disk ({target: basename}, through
records.layer_name / view.live; the backing of a layer is its parent's file, or the base
image for None): an engine joins them to the disk's layer directory and decides nothing.
New real names are drawn here, one per disk (records.fresh_layer_name).

The layer tree's queries (dependents, subtree, ancestors) live here too: they are the
questions the rules ask of the metadata, and nothing else needs them.
"""

from __future__ import annotations

import enum
import errno
import re

from .errors import DependentsError, SnapfsError, exists, invalid, not_found
from .plaindata import asdict, dataclass, field, replace
from .records import COMPRESSIONS, LIVE, MetadataView, SnapshotRecord, fresh_layer_name, layer_name

CONTROL_WORDS = ("merge", "merge-force", "discard", "discard-force", "revert", "deactivate")
MAX_DESCRIPTION_BYTES = 64 * 1024
MAX_NAME_BYTES = 255
# The most snapshots one chain may hold (base + this many layers + the live layer). qemu-img
# handles a chain in time and memory that grow with the square of its depth, measured
# with qemu-img 7.2 on the bench machine: at 1,000 layers a commit costs 8 s and a map
# 10 s before any data moves; at 2,000, 49 s and 60 s; at 5,000 a map takes 6 minutes
# and 1 GB. snapfs refuses (EMLINK) a create that would go past this depth.
MAX_CHAIN_SNAPSHOTS = 1024

LIVE_DEPENDENT = LIVE  # the live disk among a snapshot's dependents
FILE_INTENTS = ("freeze", "new_live", "fold", "drop", "recompress", "rebase_live")
METADATA_INTENTS = ("meta_write", "meta_delete", "state")


class DeactivateFlags(enum.IntFlag):
    NONE = 0
    MERGE = 1
    MERGE_FORCE = 2
    DISCARD = 4
    DISCARD_FORCE = 8


# ---- checks of what users give ------------------------------------------------------------
# Characters an XML 1.0 document cannot carry (names and descriptions go into XML).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def validate_name(name: object, what: str = "snapshot") -> str:
    """1-255 bytes of UTF-8, no '/', no NUL, not '.' or '..', not starting with '.'."""
    if not isinstance(name, str):
        raise invalid(f"A {what} name must be text.")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid(f"The {what} name is not valid UTF-8.") from None
    if size == 0:
        raise invalid(f"A {what} name cannot be empty.")
    if size > MAX_NAME_BYTES:
        raise SnapfsError(errno.ENAMETOOLONG, f"A {what} name is at most {MAX_NAME_BYTES} bytes; this one has {size}.")
    if "/" in name or "\0" in name:
        raise invalid(f"A {what} name cannot contain '/' or NUL: {name!r}.")
    if name.startswith("."):
        raise invalid(f"A {what} name cannot start with '.': {name!r}.")
    if _NOT_XML.search(name):
        raise invalid(f"A {what} name cannot hold control characters, which XML cannot carry: {name!r}.")
    return name


def validate_description(text: object) -> str:
    """At most 64 KiB of UTF-8 that XML can carry (tabs and newlines are fine)."""
    if not isinstance(text, str):
        raise invalid("A description must be text.")
    if _NOT_XML.search(text):
        raise invalid(
            "A description cannot hold control characters (other than tab and newline), which XML cannot carry."
        )
    size = len(text.encode("utf-8"))
    if size > MAX_DESCRIPTION_BYTES:
        raise SnapfsError(errno.EFBIG, f"A description is at most {MAX_DESCRIPTION_BYTES} bytes; this one has {size}.")
    return text


def validate_compression(kind: object) -> str:
    if kind not in COMPRESSIONS:
        raise invalid(f"Unknown compression {kind!r}; use gzip, zstd or none.")
    return str(kind)


# ---- the layer tree (the metadata tree and the file tree are the same tree) ----------------
def dependents(view: MetadataView, snap_id: str) -> list[str]:
    """What sits directly on L(S): child snapshots' ids, and LIVE when current = S."""
    found = [child.id for child in view.children(snap_id)]
    if view.current == snap_id:
        found.append(LIVE_DEPENDENT)
    return found


def subtree(view: MetadataView, snap_id: str) -> list[str]:
    """S and every descendant, parents before children."""
    order = [snap_id]
    for node in order:
        order.extend(child.id for child in view.children(node))
    return order


def ancestors(view: MetadataView, snap_id: str | None) -> list[str]:
    """snap_id and its ancestors up to the root (empty for None)."""
    chain: list[str] = []
    while snap_id is not None and snap_id in view.snapshots and snap_id not in chain:
        chain.append(snap_id)
        snap_id = view.snapshots[snap_id].parent
    return chain


def live_descends_from(view: MetadataView, snap_id: str) -> bool:
    return snap_id in ancestors(view, view.current)


# ---- plans ------------------------------------------------------------------------------------
@dataclass
class Plan:
    intents: list[dict] = field(default_factory=list)
    result: object = None
    subject: str = ""  # the snapshot's name, for the job line


def get(view: MetadataView, snap_id: str, domain: str) -> SnapshotRecord:
    if snap_id not in view.snapshots:
        raise not_found(f"Domain {domain!r} has no such snapshot (it may have been merged or discarded).")
    return view.snapshots[snap_id]


def plan_create(
    view: MetadataView,
    domain: str,
    name: str | None,
    description: str | None,
    compression: str | None,
    *,
    state: str,
    now: int,
    new_id: str | None = None,
) -> Plan:
    """`state` is the domain's state as the snapshot records it (the caller knows it)."""
    depth = refuse_deep_chain(view, domain) + 1
    if name is None:
        name = default_name(view, now)
    validate_name(name)
    if view.by_name(name) is not None:
        raise exists(f"Domain {domain!r} already has a snapshot named {name!r}.")
    kind = validate_compression(compression or "none")
    validate_description(description or "")
    import uuid as uuidlib  # here, not at the top: the reading verbs never make an id

    frozen = _live_names(view, domain)
    snap = SnapshotRecord(
        new_id or str(uuidlib.uuid4()), name, view.current, now, description or "", state, kind, frozen
    )
    snap.depth = depth
    fresh = _fresh_names(view)
    intents = [
        meta_write(snap),
        _intent("freeze", snap=snap.id, layers=frozen),
        _new_live(view, snap.id, fresh, frozen),
    ]
    if kind != "none":
        intents.append(
            _intent("recompress", snap=snap.id, layers=frozen, parent=_names_of(view, snap.parent), kind=kind)
        )
    intents.append(state_step(snap.id, fresh))
    return Plan(intents, snap, snap.name)


def default_name(view: MetadataView, now: int) -> str:
    """libvirt's rule: the creation time in seconds, made unique."""
    name, n = str(now), 1
    while view.by_name(name) is not None:
        name, n = f"{now}-{n}", n + 1
    return name


def refuse_deep_chain(view: MetadataView, domain: str) -> int:
    """EMLINK if a new snapshot on the current one would make the chain too deep; else
    the current snapshot's depth (or a bound of it). O(1): the current record's depth at
    creation bounds its depth now; the chain is walked only without one, or near the limit."""
    current = view.snapshots.get(view.current) if view.current else None
    if current is None:
        return 0
    if 0 < current.depth < MAX_CHAIN_SNAPSHOTS:
        return current.depth
    depth, snap_id = 0, view.current
    while snap_id is not None and snap_id in view.snapshots and depth < MAX_CHAIN_SNAPSHOTS:
        depth, snap_id = depth + 1, view.snapshots[snap_id].parent
    if depth >= MAX_CHAIN_SNAPSHOTS:
        raise SnapfsError(
            errno.EMLINK,
            f"Domain {domain!r}: the current snapshot is {MAX_CHAIN_SNAPSHOTS} snapshots deep, the most "
            "one chain may hold (qemu-img slows with the square of a chain's depth); merge some, or revert "
            "to a shallower snapshot first.",
        )
    return depth


def plan_revert(view: MetadataView, domain: str, snap_id: str) -> Plan:
    snap = get(view, snap_id, domain)
    old, fresh = _live_names(view, domain), _fresh_names(view)
    intents = [_new_live(view, snap_id, fresh), state_step(snap_id, fresh), _drop(LIVE, old)]
    return Plan(intents, subject=snap.name)


def plan_discard(view: MetadataView, domain: str, snap_id: str) -> Plan:
    snap = get(view, snap_id, domain)
    deps = dependents(view, snap_id)
    if deps:
        verb = "depends" if len(deps) == 1 else "depend"
        raise DependentsError(
            f"Snapshot {snap.name!r} cannot be discarded: {_names(view, deps)} {verb} on it "
            "(merge it, or discard-force to delete its subtree)."
        )
    intents = [meta_delete(snap_id), _drop(snap_id, _names_of(view, snap_id)), state_step(view.current)]
    return Plan(intents, subject=snap.name)


def plan_merge(view: MetadataView, domain: str, snap_id: str) -> Plan:
    snap = get(view, snap_id, domain)
    deps = dependents(view, snap_id)
    if not deps:
        return plan_discard(view, domain, snap_id)
    _live_names(view, domain)
    intents = [
        _intent(
            "fold",
            snap=snap_id,
            into=deps,
            parent=snap.parent,
            layers=_names_of(view, snap_id),
            into_layers={dep: _names_of(view, dep) for dep in deps},
            parent_layers=_names_of(view, snap.parent),
        )
    ]
    # Clusters moved by commit or rebase arrive uncompressed (a commit even rewrites the
    # child's own clusters and the header's compression type): a surviving child that is
    # compressed is recompressed, so its layer stays entirely in its own setting.
    children = view.children(snap_id)
    intents += [_recompress(view, c.id, snap.parent, c.compression) for c in children if c.compression != "none"]
    intents += [meta_write(replace(child, parent=snap.parent)) for child in children]
    intents.append(meta_delete(snap_id))
    intents.append(state_step(snap.parent if view.current == snap_id else view.current))
    return Plan(intents, subject=snap.name)


def plan_discard_force(view: MetadataView, domain: str, snap_id: str) -> Plan:
    snap = get(view, snap_id, domain)
    doomed = subtree(view, snap_id)
    live_inside = view.current in doomed
    old, fresh = _live_names(view, domain), _fresh_names(view)
    intents = [_new_live(view, snap.parent, fresh)] if live_inside else []
    intents += [meta_delete(node) for node in reversed(doomed)]
    intents += [_drop(node, _names_of(view, node)) for node in doomed]
    if live_inside:
        intents += [state_step(snap.parent, fresh), _drop(LIVE, old)]
    else:
        intents.append(state_step(view.current))
    return Plan(intents, subject=snap.name)


def plan_deactivate(view: MetadataView, domain: str, snap_id: str) -> Plan:
    snap = get(view, snap_id, domain)
    if not live_descends_from(view, snap_id):
        return Plan([])
    rebase = _intent("rebase_live", layers=_live_names(view, domain), onto=_names_of(view, snap.parent))
    return Plan([rebase, state_step(snap.parent)], subject=snap.name)


def plan_rename(view: MetadataView, domain: str, snap_id: str, new_name: str) -> Plan:
    snap = get(view, snap_id, domain)
    validate_name(new_name)
    if new_name == snap.name:
        return Plan([])
    if view.by_name(new_name) is not None:
        raise exists(f"Domain {domain!r} already has a snapshot named {new_name!r}.")
    return Plan([meta_write(replace(snap, name=new_name)), state_step(view.current)], subject=snap.name)


def plan_description(view: MetadataView, domain: str, snap_id: str, text: str) -> Plan:
    snap = get(view, snap_id, domain)
    validate_description(text)
    return Plan([meta_write(replace(snap, description=text)), state_step(view.current)], subject=snap.name)


def plan_compression(view: MetadataView, domain: str, snap_id: str, kind: str) -> Plan:
    snap = get(view, snap_id, domain)
    kind = validate_compression(kind)
    intents = [_recompress(view, snap_id, snap.parent, kind), meta_write(replace(snap, compression=kind))]
    return Plan([*intents, state_step(view.current)], subject=snap.name)


# ---- intents ----------------------------------------------------------------------------------
def _intent(do: str, **args) -> dict:
    return {"do": do, **args}


def _recompress(view: MetadataView, snap_id: str, parent: str | None, kind: str) -> dict:
    layers, parent_layers = _names_of(view, snap_id), _names_of(view, parent)
    return _intent("recompress", snap=snap_id, layers=layers, parent=parent_layers, kind=kind)


def _new_live(view: MetadataView, on: str | None, names: dict[str, str], frozen: dict | None = None) -> dict:
    """A new live layer (real files `names`) on `on`'s layers; `frozen`: the live layers
    this one replaces become L(on) (a create), so an engine holds them as it would A."""
    intent = _intent("new_live", on=on, names=names, backing=frozen or _names_of(view, on))
    if frozen:
        intent["frozen"] = True
    return intent


def _drop(snap_id: str, layers: dict[str, str]) -> dict:
    return _intent("drop", snap=snap_id, layers=layers)


def _names_of(view: MetadataView, snap_id: str | None) -> dict[str, str] | None:
    """{target: basename} of L(S)'s real files, of the live layers for LIVE; None for the base."""
    if snap_id is None:
        return None
    if snap_id == LIVE_DEPENDENT:
        return dict(view.live)
    record = view.snapshots[snap_id]
    return {target: layer_name(record, target) for target in view.targets()}


def _live_names(view: MetadataView, domain: str) -> dict[str, str]:
    """The live layers' real names; a view without them is from a store not carried over
    to this layout (the domain carries it over before any plan)."""
    if not view.live:
        raise SnapfsError(
            errno.EIO, f"Domain {domain!r} has no recorded live layers; reopen the store to carry it over."
        )
    return dict(view.live)


def _fresh_names(view: MetadataView) -> dict[str, str]:
    return {target: fresh_layer_name() for target in view.targets()}


def meta_write(record: SnapshotRecord) -> dict:
    return _intent("meta_write", record=asdict(record))


def meta_delete(snap_id: str) -> dict:
    return _intent("meta_delete", id=snap_id)


def state_step(current: str | None, live: dict[str, str] | None = None) -> dict:
    return _intent("state", current=current, **({"live": live} if live is not None else {}))


def _names(view: MetadataView, ids: list[str]) -> str:
    words = ["the live disk" if i == LIVE_DEPENDENT else repr(view.snapshots[i].name) for i in ids]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
