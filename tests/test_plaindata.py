"""The records' classes (plaindata.dataclass, which does not import dataclasses) behave as
the standard library's decorator makes them: each is compared with its twin, made by
running records.py's own source with `from dataclasses import dataclass, field`."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import sys
import types

import pytest

from snapfs import plaindata, records, rules

TWIN_NAME = "snapfs._records_twin"


@pytest.fixture(scope="module")
def twin() -> types.ModuleType:
    with open(records.__file__) as f:
        source = f.read()
    light = "from .plaindata import dataclass, field\n"
    assert light in source
    module = types.ModuleType(TWIN_NAME)
    module.__package__ = "snapfs"
    sys.modules[TWIN_NAME] = module
    exec(compile(source.replace(light, "from dataclasses import dataclass, field\n"), "twin", "exec"), module.__dict__)
    yield module
    del sys.modules[TWIN_NAME]


def samples(module: types.ModuleType) -> dict[str, list[object]]:
    disk = module.DiskRecord("vda", "/b.qcow2", "qcow2", 1 << 30)
    snap = module.SnapshotRecord("i1", "s1", None, 5)
    full = module.SnapshotRecord("i2", "s2", "i1", 6, "text", "running", "zstd", {"vda": "x.qcow2"}, 2)
    return {
        "DiskRecord": [disk],
        "DomainRecord": [module.DomainRecord("vm1", "u-u", [disk])],
        "SnapshotRecord": [snap, full],
        "MetadataView": [
            module.MetadataView(3, "i1", {"i1": snap}),
            module.MetadataView(4, None, {}, "e", {"vda": "l.qcow2"}),
        ],
    }


CLASSES = ("DiskRecord", "DomainRecord", "SnapshotRecord", "MetadataView")


def outcome(call: object) -> object:
    """What a call returns, or its exception's type name and message."""
    try:
        return call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("name", CLASSES)
def test_a_class_is_made_as_dataclasses_makes_it(twin, name):
    ours, theirs = getattr(records, name), getattr(twin, name)
    assert ours.__doc__ == theirs.__doc__
    assert ours.__match_args__ == theirs.__match_args__
    assert str(inspect.signature(ours)) == str(inspect.signature(theirs))
    assert (ours.__hash__ is None) == (theirs.__hash__ is None)
    assert ours.__init__.__qualname__ == theirs.__init__.__qualname__
    for field in dataclasses.fields(theirs):
        assert getattr(ours, field.name, "absent") == getattr(theirs, field.name, "absent"), field.name
    assert [(f.name, f.type, f.default, f.default_factory) for f in dataclasses.fields(ours)] == [
        (f.name, f.type, f.default, f.default_factory) for f in dataclasses.fields(theirs)
    ]
    assert dataclasses.is_dataclass(ours)
    assert outcome(lambda: ours()) == outcome(lambda: theirs())
    assert outcome(lambda: ours(*range(12))) == outcome(lambda: theirs(*range(12)))


@pytest.mark.parametrize("name", CLASSES)
def test_instances_behave_as_dataclass_instances(twin, name):
    for ours, theirs in zip(samples(records)[name], samples(twin)[name], strict=True):
        assert repr(ours) == repr(theirs)
        assert ours == copy.deepcopy(ours) and ours != theirs and (ours == 1) is False
        assert outcome(lambda o=ours: hash(o)) == outcome(lambda t=theirs: hash(t))
        mine, twins = copy.copy(ours), copy.copy(theirs)  # changed below (when not frozen)
        assert outcome(lambda o=mine: setattr(o, "name", "x")) == outcome(lambda t=twins: setattr(t, "name", "x"))
        assert outcome(lambda o=mine: delattr(o, "name")) == outcome(lambda t=twins: delattr(t, "name"))
        assert _plain(dataclasses.asdict(ours)) == _plain(dataclasses.asdict(theirs))
        changed = dataclasses.replace(ours, **{dataclasses.fields(ours)[0].name: "changed"})
        assert type(changed) is type(ours) and repr(changed).startswith(f"{name}(")
        assert pickle.loads(pickle.dumps(ours)) == ours


def test_a_factory_default_is_fresh_for_each_instance():
    first, second = records.MetadataView(1, None, {}), records.MetadataView(1, None, {})
    assert first.live == {} and first.live is not second.live
    assert "live" not in records.MetadataView.__dict__


def test_plan_and_a_frozen_error(twin):
    plan = rules.Plan()
    assert repr(plan) == "Plan(intents=[], result=None, subject='')" and rules.Plan().intents is not plan.intents
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'generation'"):
        records.MetadataView(1, None, {}).generation = 2


def _plain(value: object) -> object:
    """asdict's output with the twin's classes out of the way (they hold the same data)."""
    return repr(value)


def test_field_with_a_default_or_a_factory():
    @plaindata.dataclass
    class Probe:
        a: int
        b: int = plaindata.field(default=3)
        c: list = plaindata.field(default_factory=list)

    assert repr(Probe(1)).endswith(".<locals>.Probe(a=1, b=3, c=[])") and Probe.b == 3  # qualname, as dataclasses
    assert dataclasses.replace(Probe(1, 2), c=[4]) == Probe(1, 2, [4])
    with pytest.raises(ValueError):
        plaindata.field()
