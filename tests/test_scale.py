"""A create's cost independent of the number of snapshots (issue 16): the metadata view
carried forward by its changes (records.Layered), and the large directories listed for
temporaries only when they may hold one (DomainFiles.remove_temporaries)."""

from __future__ import annotations

import os
import random

import pytest
import trio
from factory import new_domain
from failfixtures import assert_store_clean

from snapfs.catalog import StoreCore
from snapfs.records import Layered, MetadataView, SnapshotRecord, carry_name_index
from snapfs.store import DomainFiles

DOM = "vm1"


def test_layered_behaves_as_the_dict_it_stands_for():
    """Hundreds of generations of adds, changes and removals (folds included): every
    reading equals a plain dict's with the same updates applied, and no generation alters
    the one before it."""
    rng = random.Random(16)
    model: dict[str, int] = {f"k{i}": i for i in range(300)}
    mapping = Layered.carried(dict(model), {})
    history = []
    for generation in range(400):
        updates: dict[str, int | None] = {}
        for _ in range(rng.randint(0, 3)):
            key = f"k{rng.randrange(360)}"
            updates[key] = None if rng.random() < 0.3 else generation * 1000 + rng.randrange(1000)
        history.append((mapping, dict(model)))
        mapping = Layered.carried(mapping, updates)
        for key, value in updates.items():
            if value is None:
                model.pop(key, None)
            else:
                model[key] = value
        assert len(mapping) == len(model)
        assert dict(mapping.items()) == model
        assert sorted(mapping) == sorted(model)
        assert sorted(mapping.values()) == sorted(model.values())
        probe = f"k{rng.randrange(360)}"
        assert (probe in mapping) == (probe in model)
        assert mapping.get(probe, "absent") == model.get(probe, "absent")
        if probe not in model:
            with pytest.raises(KeyError):
                mapping[probe]
    for old, seen in history[::37]:
        assert dict(old.items()) == seen


def test_a_changed_key_keeps_its_place_as_in_a_dict():
    mapping = Layered.carried({"a": 1, "b": 2, "c": 3}, {"b": 20, "d": 4, "a": None})
    assert list(mapping) == ["b", "c", "d"]
    assert mapping.items() == [("b", 20), ("c", 3), ("d", 4)]


def _view(generation: int, records: list[SnapshotRecord]) -> MetadataView:
    return MetadataView(generation, None, {r.id: r for r in records})


def test_the_name_index_follows_renames_and_swaps():
    """The index carried generation after generation (renames, two snapshots swapping
    names in one change, removals) equals one built from scratch."""
    records = {f"i{n}": SnapshotRecord(f"i{n}", f"s{n}", None, n) for n in range(200)}
    view = _view(1, list(records.values()))
    view.by_name("s0")  # the index is built, so the next views carry it
    rng = random.Random(7)
    for generation in range(2, 300):
        a, b = rng.sample(sorted(records), 2)
        if generation % 3 == 0:  # swap two names in one change
            ra, rb = records[a], records[b]
            records[a] = SnapshotRecord(a, rb.name, None, ra.creation_time)
            records[b] = SnapshotRecord(b, ra.name, None, rb.creation_time)
            changed = [a, b]
        elif generation % 3 == 1:
            records[a] = SnapshotRecord(a, f"r{generation}", None, records[a].creation_time)
            changed = [a]
        else:
            del records[a]
            records[f"n{generation}"] = SnapshotRecord(f"n{generation}", f"new{generation}", None, generation)
            changed = [a, f"n{generation}"]
        new = MetadataView(generation, None, Layered.carried(view.snapshots, {i: records.get(i) for i in changed}))
        carry_name_index(view, new, changed)
        view = new
        fresh = _view(generation, list(records.values()))
        for record in records.values():
            assert view.by_name(record.name) is record
        assert view.by_name(f"r{generation - 3}") is fresh.by_name(f"r{generation - 3}")
        assert len(view._by_name) == len(records)


class Listing(DomainFiles):
    """The domain's files, counting which directories remove_temporaries lists."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.listed: list[str] = []

    def _remove_in(self, directory: str, layer_suffixes: tuple[str, ...]) -> None:
        self.listed.append(directory)
        super()._remove_in(directory, layer_suffixes)


@pytest.fixture
def core(tmp_path):
    new_domain(str(tmp_path), DOM)
    core = StoreCore(str(tmp_path / "store")).domain(DOM)
    core.files = Listing(core.files.path)
    return core


def _large(files: DomainFiles) -> set[str]:
    return {files.snapshots_dir, files.layers_dir("vda"), files.layers_dir("vdb")}


def test_a_long_lived_core_lists_the_large_directories_only_after_a_change_it_did_not_make(core, tmp_path):
    files: Listing = core.files
    trio.run(core.create, "s1")  # the first operation of the process lists everything
    assert _large(files) <= set(files.listed)
    files.listed.clear()
    trio.run(core.create, "s2")
    assert not _large(files) & set(files.listed), "seen clean after s1 and unchanged since"
    # Another process's change (here: a temporary planted) changes a directory: it is listed.
    planted = [files.layer_path("vda", "x.qcow2.new"), os.path.join(files.snapshots_dir, "x.json.tmp4242.1")]
    for path in planted:
        open(path, "wb").close()
    files.listed.clear()
    trio.run(core.create, "s3")
    assert {files.layers_dir("vda"), files.snapshots_dir} <= set(files.listed)
    assert [p for p in planted if os.path.exists(p)] == []
    assert_store_clean(str(tmp_path / "store"))


def test_a_pending_journal_lists_every_directory(core):
    """An operation left unfinished may have left temporaries anywhere: everything is listed,
    however clean the directories were seen."""
    files: Listing = core.files
    trio.run(core.create, "s1")
    planted = files.layer_path("vdb", "y.qcow2.rebase")
    open(planted, "wb").close()
    files.remember_clean()  # as if the planted file had come in the same clock tick
    files.write_journal({"operation": "create", "subject": "x", "engine": "qemu-img", "steps": [], "done": 0})
    files.listed.clear()
    trio.run(core.create, "s2")
    assert _large(files) <= set(files.listed)
    assert not os.path.exists(planted)


def test_a_failed_operation_forgets_what_it_saw(core):
    files: Listing = core.files
    trio.run(core.create, "s1")
    with pytest.raises(Exception):  # noqa: B017  (a refusal: the name is taken)
        trio.run(core.create, "s1")
    files.listed.clear()
    trio.run(core.create, "s2")
    assert _large(files) <= set(files.listed)
