"""A seeded random walk over the async core, checked against a plain in-memory model.

The model (tests/model.py, shared with test_crash.py) holds each disk as bytes: every
snapshot's and the live disk's, with each snapshot's parent and the current one. Each
step is one operation (create, revert, merge,
merge-force, discard (also when it must be refused), discard-force, deactivate, rename,
set_compression) or a write of a random pattern (or zeros) at a random offset into the
live disk. After every step the whole of every snapshot (its layer converted to raw) and
the live disk are compared with the model, and the metadata tree with the model's tree.
Everything runs in one trio.run on the async core (StoreCore / DomainCore).
"""

from __future__ import annotations

import errno
import os
import random
import tempfile

import pytest
import trio
from factory import define_domain, make_base
from helpers import CLUSTER, expected_content, file_digest, layout_problems
from model import Model

import snapfs
from snapfs.catalog import StoreCore
from snapfs.rules import DeactivateFlags

SIZE = 2 * 1024 * 1024  # 32 clusters of 64 KiB
STEPS = 220
MAX_SNAPSHOTS = 9
TARGETS = ("vda", "vdb")
NAMES = ["a", "b", "c", "snap shot", "ünï", "x" * 255, "d.e", "f-1", "g_2", "h", "i", "j", "k", "l", "m"]


class Walk:
    def __init__(self, seed: int, workdir: str, bases: dict[str, bytes], base_paths: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.model = Model(bases)  # contents are the disks' bytes
        self.base_paths = base_paths
        self.base_digests = {p: file_digest(p) for p in base_paths.values()}
        self.limit = trio.CapacityLimiter(4)
        self.log: list[str] = []
        self.refusals = 0
        self.counts: dict[str, int] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def id_of(self, name: str) -> str:
        record = self.dom.view().by_name(name)
        assert record is not None, f"snapshot {name!r} is missing"
        return record.id

    async def read(self, path: str, key: str) -> bytes:
        out = os.path.join(self.workdir, f"check-{key}.raw")
        async with self.limit:
            await trio.run_process(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, out])
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
        return data

    async def check(self, full_layout: bool) -> None:
        view = self.dom.view()
        names = {r.name: r for r in view.snapshots.values()}
        assert set(names) == set(self.model.snaps), self.where()
        for name, record in names.items():
            parent = view.snapshots[record.parent].name if record.parent else None
            assert parent == self.model.snaps[name].parent, f"parent of {name!r}; {self.where()}"
        current = view.snapshots[view.current].name if view.current else None
        assert current == self.model.current, self.where()

        jobs: list[tuple[str, str, bytes]] = []
        for name, record in names.items():
            for t in TARGETS:
                jobs.append((self.dom.layer_path(t, record.id), f"{name!r}/{t}", self.model.snaps[name].content[t]))
        for t in TARGETS:
            jobs.append((self.dom.live_path(t), f"live/{t}", self.model.live[t]))
        found: dict[str, bytes] = {}

        async def one(index: int, path: str, label: str) -> None:
            found[label] = await self.read(path, str(index))

        async with trio.open_nursery() as nursery:
            for index, (path, label, _) in enumerate(jobs):
                nursery.start_soon(one, index, path, label)
        for _, label, want in jobs:
            if found[label] != want:
                bad = next(i for i in range(0, len(want), 512) if found[label][i : i + 512] != want[i : i + 512])
                raise AssertionError(f"{label} differs from the model at offset {bad}; {self.where()}")
        if full_layout:
            assert await trio.to_thread.run_sync(layout_problems, snapfs.Domain(self.dom)) == [], self.where()
            for path, digest in self.base_digests.items():
                assert file_digest(path) == digest, f"base image {path} was written"

    def where(self) -> str:
        return "after steps:\n  " + "\n  ".join(self.log[-12:])

    # ---- steps ---------------------------------------------------------------------------
    async def step_write(self) -> None:
        m, rng = self.model, self.rng
        target = rng.choice(TARGETS)
        length = rng.choice([512, 4096, CLUSTER, CLUSTER, 3 * CLUSTER // 2, 2 * CLUSTER])
        offset = rng.randrange(0, SIZE - length + 1, 512)
        pattern = rng.choice([0, *range(1, 256)])
        command = f"write -z {offset} {length}" if pattern == 0 else f"write -P {pattern} {offset} {length}"
        result = await trio.run_process(
            ["qemu-io", "-f", "qcow2", "-c", command, self.dom.live_path(target)], capture_stdout=True
        )
        assert b"error" not in result.stdout.lower(), result.stdout
        live = m.live[target]
        self.model = m.write(target, live[:offset] + bytes([pattern]) * length + live[offset + length :])
        self.log.append(f"write {target} {command}")

    async def step_create(self) -> None:
        m = self.model
        free = [n for n in NAMES if n not in m.snaps]
        if not free or len(m.snaps) >= MAX_SNAPSHOTS:
            return await self.step_write()
        name = self.rng.choice(free)
        compression = self.rng.choice([None, None, None, "gzip", "zstd"])
        self.log.append(f"create {name!r} compression={compression}")
        await self.dom.create(name, None, compression)
        self.model = m.create(name, compression=compression or "none")

    def pick(self) -> str | None:
        return self.rng.choice(sorted(self.model.snaps)) if self.model.snaps else None

    async def step_revert(self) -> None:
        name = self.pick()
        if name is None:
            return await self.step_create()
        self.log.append(f"revert {name!r}")
        await self.dom.revert(self.id_of(name))
        self.model = self.model.revert(name)

    async def step_merge(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        flag = self.rng.choice([DeactivateFlags.MERGE, DeactivateFlags.MERGE_FORCE])
        deps = len(m.children(name)) + (m.current == name)
        self.log.append(f"merge {name!r} ({flag.name}, {deps} dependents)")
        self.counts[f"merge-{min(deps, 2)}"] = self.counts.get(f"merge-{min(deps, 2)}", 0) + 1
        await self.dom.deactivate(self.id_of(name), flag)
        self.model = m.merge(name)

    async def step_discard(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        self.log.append(f"discard {name!r}")
        if m.has_dependents(name):
            with pytest.raises(snapfs.DependentsError) as info:
                await self.dom.deactivate(self.id_of(name), DeactivateFlags.DISCARD)
            assert info.value.errno == errno.EBUSY and repr(name) in str(info.value)
            self.refusals += 1
            return
        await self.dom.deactivate(self.id_of(name), DeactivateFlags.DISCARD)
        self.model = m.discard(name)

    async def step_discard_force(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        doomed = m.subtree(name)
        self.log.append(f"discard-force {name!r} (subtree {doomed}, current {m.current!r})")
        await self.dom.deactivate(self.id_of(name), DeactivateFlags.DISCARD_FORCE)
        self.model = m.discard_force(name)

    async def step_deactivate(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        self.log.append(f"deactivate {name!r} (current {m.current!r})")
        await self.dom.deactivate(self.id_of(name), DeactivateFlags.NONE)
        self.model = m.deactivate(name)

    async def step_rename(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        new = self.rng.choice(NAMES)
        self.log.append(f"rename {name!r} -> {new!r}")
        if new in m.snaps and new != name:
            with pytest.raises(snapfs.SnapfsError) as info:
                await self.dom.rename(self.id_of(name), new)
            assert info.value.errno == errno.EEXIST
            self.refusals += 1
            return
        await self.dom.rename(self.id_of(name), new)
        self.model = m.rename(name, new)

    async def step_compress(self) -> None:
        name = self.pick()
        if name is None:
            return await self.step_create()
        kind = self.rng.choice(["gzip", "zstd", "none"])
        self.log.append(f"compress {name!r} {kind}")
        await self.dom.set_compression(self.id_of(name), kind)
        self.model = self.model.compress(name, kind)

    async def run(self, store_path: str, steps: int) -> None:
        self.dom = StoreCore(store_path).domain("walk")
        table = [
            (self.step_write, 8),
            (self.step_create, 5),
            (self.step_revert, 3),
            (self.step_merge, 3),
            (self.step_discard, 1),
            (self.step_discard_force, 1),
            (self.step_deactivate, 2),
            (self.step_rename, 1),
            (self.step_compress, 1),
        ]
        actions, weights = zip(*table, strict=True)
        await self.check(full_layout=True)
        for index in range(steps):
            action = self.rng.choices(actions, weights)[0]
            self.counts[action.__name__] = self.counts.get(action.__name__, 0) + 1
            await action()
            await self.check(full_layout=index % 10 == 9 or index == steps - 1)


def _make_base(path: str, fmt: str, rng: random.Random) -> tuple[str, bytes]:
    """A base of SIZE with 10 random clusters of random patterns, and its bytes."""
    writes = {cluster * CLUSTER: rng.randrange(1, 256) for cluster in rng.sample(range(SIZE // CLUSTER), 10)}
    make_base(path, fmt, writes, SIZE)
    return path, expected_content(writes, SIZE)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [20240601, 7])
def test_random_walk(tmp_path, seed):
    rng = random.Random(seed ^ 0x5EED)
    vda, vda_data = _make_base(str(tmp_path / "vda.qcow2"), "qcow2", rng)
    vdb, vdb_data = _make_base(str(tmp_path / "vdb.img"), "raw", rng)
    define_domain(str(tmp_path / "store"), "walk", {"vda": (vda, "qcow2"), "vdb": (vdb, "raw")})
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    with tempfile.TemporaryDirectory(dir=scratch) as workdir:
        walk = Walk(seed, workdir, {"vda": vda_data, "vdb": vdb_data}, {"vda": vda, "vdb": vdb})
        trio.run(walk.run, str(tmp_path / "store"), STEPS)
    # The walk must have exercised what it claims to.
    for name in ("step_create", "step_revert", "step_merge", "step_discard_force", "step_deactivate", "step_write"):
        assert walk.counts.get(name, 0) >= 3, walk.counts
    assert walk.counts.get("merge-2", 0) >= 1 and walk.counts.get("merge-1", 0) >= 1, walk.counts
