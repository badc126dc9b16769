"""The rules alone: pure planning over metadata, no I/O, no trio, no engine.

The plans are checked as intents (what happens to the layers and records); that the
qemu-img engine carries each intent out safely is the crash matrix's job (test_crash.py).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import uuid  # noqa: F401  (the rules import it when they draw a name; here, so no_io sees no import)

import pytest

from snapfs import rules
from snapfs.errors import DependentsError, SnapfsError
from snapfs.records import LIVE, MetadataView, SnapshotRecord, layer_name

DOM = "vm1"


def view(current: str | None, *snaps: tuple[str, str | None, str]) -> MetadataView:
    """Snapshots as (id, parent id, compression); each is named after its id, created in order."""
    records = {
        snap_id: SnapshotRecord(snap_id, snap_id, parent, 1000 + i, compression=kind)
        for i, (snap_id, parent, kind) in enumerate(snaps)
    }
    return MetadataView(1, current, records, live=dict(LIVE_FILES))


LIVE_FILES = {"vda": "A1.qcow2", "vdb": "A2.qcow2"}  # the live layers' real files


def legacy(snap_id: str) -> dict[str, str]:
    """A snapshot made before layers had names of their own: <id>.qcow2 on every disk."""
    return {"vda": f"{snap_id}.qcow2", "vdb": f"{snap_id}.qcow2"}


# a <- b <- live ; a <- c (zstd) ; c <- d
TREE = view("b", ("a", None, "none"), ("b", "a", "none"), ("c", "a", "zstd"), ("d", "c", "none"))


@pytest.fixture(autouse=True)
def no_io(monkeypatch):
    """Planning must not touch a file: any open fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the rules opened a file: {args}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "stat", refuse)


def kinds(plan: rules.Plan) -> list[str]:
    return [intent["do"] for intent in plan.intents]


def test_create_freezes_live_and_records_the_callers_state():
    plan = rules.plan_create(TREE, DOM, "new", "text", None, state="running", now=2000, new_id="n")
    assert kinds(plan) == ["meta_write", "freeze", "new_live", "state"]
    snap = plan.result
    assert (snap.id, snap.parent, snap.state) == ("n", "b", "running")
    assert (snap.creation_time, snap.description) == (2000, "text")
    assert plan.intents[0]["record"]["state"] == "running"
    assert snap.layers == LIVE_FILES  # the live files become L(S): nothing is renamed
    assert plan.intents[1] == {"do": "freeze", "snap": "n", "layers": LIVE_FILES}
    fresh = plan.intents[2]["names"]
    assert sorted(fresh) == ["vda", "vdb"] and len(set(fresh.values()) | set(LIVE_FILES.values())) == 4
    assert plan.intents[2] == {"do": "new_live", "on": "n", "names": fresh, "backing": LIVE_FILES, "frozen": True}
    assert plan.intents[-1] == {"do": "state", "current": "n", "live": fresh}
    json.dumps(plan.intents)  # the journal records what the engine makes of them


def test_create_compressed_recompresses_the_frozen_layer():
    plan = rules.plan_create(TREE, DOM, "z", None, "zstd", state="shutoff", now=2000, new_id="z")
    assert kinds(plan) == ["meta_write", "freeze", "new_live", "recompress", "state"]
    assert plan.intents[3] == {
        "do": "recompress",
        "snap": "z",
        "layers": LIVE_FILES,
        "parent": legacy("b"),
        "kind": "zstd",
    }


def test_create_refusals_and_default_name():
    with pytest.raises(SnapfsError) as info:
        rules.plan_create(TREE, DOM, "a", None, None, state="shutoff", now=1)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(SnapfsError) as info:
        rules.plan_create(TREE, DOM, "x", None, "lz4", state="shutoff", now=1)
    assert info.value.errno == errno.EINVAL
    taken = view(None, ("2000", None, "none"))
    assert rules.plan_create(taken, DOM, None, None, None, state="shutoff", now=2000).result.name == "2000-1"


class CountingRecords(dict):
    """A view's records that count how many the rules look at."""

    looked = 0

    def __getitem__(self, key):
        self.looked += 1
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.looked += 1
        return super().get(key, default)


def chain(length: int, depths: bool) -> MetadataView:
    """s0 <- s1 <- ... <- live, with each record's depth recorded or not (a record from before)."""
    records = CountingRecords()
    for i in range(length):
        parent = f"s{i - 1}" if i else None
        records[f"s{i}"] = SnapshotRecord(f"s{i}", f"s{i}", parent, 1000 + i, depth=i + 1 if depths else 0)
    return MetadataView(1, f"s{length - 1}" if length else None, records, live=dict(LIVE_FILES))


def test_create_records_its_depth_and_checks_it_without_walking_the_chain():
    deep = chain(1000, depths=True)
    plan = rules.plan_create(deep, DOM, "new", None, None, state="shutoff", now=5000, new_id="n")
    assert plan.result.depth == 1001
    assert plan.intents[0]["record"]["depth"] == 1001
    assert deep.snapshots.looked < 10  # not one look per ancestor
    old = chain(1000, depths=False)  # records from before: the chain is walked, and the depth recorded
    assert rules.plan_create(old, DOM, "new", None, None, state="shutoff", now=5000).result.depth == 1001
    assert rules.plan_create(view(None), DOM, "first", None, None, state="shutoff", now=1).result.depth == 1


@pytest.mark.parametrize("depths", [True, False])
def test_create_past_the_deepest_chain_is_refused(depths):
    full = chain(rules.MAX_CHAIN_SNAPSHOTS, depths)
    with pytest.raises(SnapfsError) as info:
        rules.plan_create(full, DOM, "new", None, None, state="shutoff", now=5000)
    assert info.value.errno == errno.EMLINK
    one_less = chain(rules.MAX_CHAIN_SNAPSHOTS - 1, depths)
    assert rules.plan_create(one_less, DOM, "x", None, None, state="shutoff", now=5000).result.depth == 1024


def test_a_depth_recorded_before_a_merge_is_a_bound_walked_only_near_the_limit():
    """Merges take ancestors away, so a recorded depth may exceed the real one: near the
    limit the chain is walked and the real depth recorded."""
    full = chain(rules.MAX_CHAIN_SNAPSHOTS, depths=True)
    del full.snapshots["s5"]
    full.snapshots["s6"].parent = "s4"  # s5 merged away: one less deep than recorded
    plan = rules.plan_create(full, DOM, "new", None, None, state="shutoff", now=5000)
    assert plan.result.depth == rules.MAX_CHAIN_SNAPSHOTS


def test_merge_with_one_dependent_folds_into_it():
    plan = rules.plan_merge(TREE, DOM, "b")  # only the live disk sits on b
    assert plan.intents[0] == {
        "do": "fold",
        "snap": "b",
        "into": [LIVE],
        "parent": "a",
        "layers": legacy("b"),
        "into_layers": {LIVE: LIVE_FILES},
        "parent_layers": legacy("a"),
    }
    assert kinds(plan) == ["fold", "meta_delete", "state"]
    assert plan.intents[-1] == {"do": "state", "current": "a"}
    plan = rules.plan_merge(TREE, DOM, "d")  # no dependent: a discard
    assert kinds(plan) == ["meta_delete", "drop", "state"]


def test_merge_with_two_dependents_reparents_and_recompresses():
    plan = rules.plan_merge(TREE, DOM, "a")
    fold = plan.intents[0]
    assert (fold["snap"], fold["into"], fold["parent"], fold["parent_layers"]) == ("a", ["b", "c"], None, None)
    assert fold["into_layers"] == {"b": legacy("b"), "c": legacy("c")}
    assert plan.intents[1] == {"do": "recompress", "snap": "c", "layers": legacy("c"), "parent": None, "kind": "zstd"}
    writes = [i["record"] for i in plan.intents if i["do"] == "meta_write"]
    assert [(r["id"], r["parent"]) for r in writes] == [("b", None), ("c", None)]
    assert kinds(plan)[-2:] == ["meta_delete", "state"]
    assert plan.intents[-1] == {"do": "state", "current": "b"}


def test_discard_with_dependents_is_refused_naming_them():
    with pytest.raises(DependentsError) as info:
        rules.plan_discard(TREE, DOM, "a")
    assert "'b' and 'c' depend on it" in info.value.message
    with pytest.raises(DependentsError) as info:
        rules.plan_discard(TREE, DOM, "b")
    assert "the live disk depends on it" in info.value.message


def test_discard_force_with_live_inside_resets_the_live_disk_first():
    plan = rules.plan_discard_force(TREE, DOM, "a")
    fresh = plan.intents[0]["names"]
    assert plan.intents[0] == {"do": "new_live", "on": None, "names": fresh, "backing": None}
    deletes = [i["id"] for i in plan.intents if i["do"] == "meta_delete"]
    drops = [(i["snap"], i["layers"]) for i in plan.intents if i["do"] == "drop"]
    assert deletes == ["d", "c", "b", "a"]
    assert drops == [(s, legacy(s)) for s in "abcd"] + [(LIVE, LIVE_FILES)]  # the old live file last
    assert plan.intents[-2] == {"do": "state", "current": None, "live": fresh}
    outside = rules.plan_discard_force(TREE, DOM, "c")
    assert "new_live" not in kinds(outside) and outside.intents[-1] == {"do": "state", "current": "b"}


def test_revert_makes_a_fresh_live_file_and_drops_the_old_one_last():
    plan = rules.plan_revert(TREE, DOM, "c")
    fresh = plan.intents[0]["names"]
    assert not set(fresh.values()) & set(LIVE_FILES.values())
    assert plan.intents == [
        {"do": "new_live", "on": "c", "names": fresh, "backing": legacy("c")},
        {"do": "state", "current": "c", "live": fresh},
        {"do": "drop", "snap": LIVE, "layers": LIVE_FILES},
    ]


def test_layers_are_named_by_the_record_and_the_view():
    named = SnapshotRecord("n", "n", None, 1, layers={"vda": "x.qcow2", "vdb": "y.qcow2"})
    tree = MetadataView(1, "n", {"n": named, "o": SnapshotRecord("o", "o", "n", 2)}, live={"vda": "a", "vdb": "b"})
    assert layer_name(named, "vdb") == "y.qcow2" and layer_name(tree.snapshots["o"], "vda") == "o.qcow2"
    assert rules.plan_revert(tree, DOM, "n").intents[0]["backing"] == {"vda": "x.qcow2", "vdb": "y.qcow2"}
    # o.qcow2 is in both disks' directories: not a name the mount may show for one disk
    assert tree.layer_files() == {"x.qcow2": "vda", "y.qcow2": "vdb", "a": "vda", "b": "vdb"}
    with pytest.raises(SnapfsError):  # a store not carried over to this layout yet
        rules.plan_revert(MetadataView(1, None, {"n": named}), DOM, "n")


def test_deactivate_rebases_live_only_when_it_descends():
    assert rules.plan_deactivate(TREE, DOM, "c").intents == []
    plan = rules.plan_deactivate(TREE, DOM, "a")
    assert plan.intents == [
        {"do": "rebase_live", "layers": LIVE_FILES, "onto": None},
        {"do": "state", "current": None},
    ]


def test_unknown_snapshot_and_order():
    with pytest.raises(SnapfsError) as info:
        rules.plan_revert(TREE, DOM, "nosuch")
    assert info.value.errno == errno.ENOENT
    assert [s.name for s in TREE.in_order()] == ["a", "b", "c", "d"]
    assert rules.subtree(TREE, "a") == ["a", "b", "c", "d"]
    assert rules.dependents(TREE, "b") == [LIVE]
