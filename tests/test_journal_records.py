"""Where the journal records progress in a live create (journal._must_record): a disk-only
switch needs no record around it (each record is an fsynced write on the snapshot's path),
a step that is not re-runnable still gets one. The crash matrix (test_live_crash.py) proves
the re-runs right; this pins the records down."""

from __future__ import annotations

from snapfs.journal import _must_record, _side_by_side


def _create(*middle: dict) -> list[dict]:
    meta = {"do": "meta_write", "record": {"id": "s1"}}
    overlays = [{"do": "overlay", "dst": f"{t}/s1.qcow2"} for t in ("vda", "vdb")]
    links = [{"do": "link", "path": f"{t}/live.qcow2"} for t in ("vda", "vdb")]
    return [meta, *overlays, *middle, *links, {"do": "state"}]


def records(steps: list[dict]) -> list[int]:
    """The indexes before which progress is recorded, from a journal written with done = 0."""
    done, made = 0, []
    for index in range(len(steps)):
        if _must_record(steps, done, index):
            done = index
            made.append(index)
    return made


def test_a_disk_only_switch_needs_no_record() -> None:
    assert records(_create({"do": "switch", "disks": []})) == []


def test_a_repoint_after_the_switch_is_recorded_before_and_after() -> None:
    steps = _create({"do": "switch", "disks": []}, {"do": "repoint", "disks": []})
    assert records(steps) == [4, 5]


def test_a_memory_switch_is_recorded_before_and_after() -> None:
    steps = _create({"do": "switch_memory", "disks": []})
    assert records(steps) == [3, 4]


def test_overlays_and_links_go_side_by_side() -> None:
    """One thread hop's wait for each run of them, not one per disk; the others alone."""
    steps = _create({"do": "switch", "disks": []})
    assert [_side_by_side(steps, 0, i) for i in (0, 1, 3, 4, 6)] == [[0], [1, 2], [3], [4, 5], [6]]
    steps = _create({"do": "switch", "disks": []}, {"do": "repoint", "disks": []})
    assert _side_by_side(steps, 5, 5) == [5, 6]  # the links, after the record the repoint needs
    assert _side_by_side(steps, 4, 4) == [4]
