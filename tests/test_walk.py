"""A seeded random walk over the async core, checked against a plain in-memory model.

The model is {snapshot name: {disk: bytes}} plus the live disk's bytes, the parent of
each snapshot and the current one. Each step is one operation (create, revert, merge,
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
import subprocess
import tempfile

import pytest
import trio
from helpers import CLUSTER, file_digest, layout_problems, make_image

import snapfs
from snapfs.catalog import StoreCore
from snapfs.rules import DeactivateFlags

SIZE = 2 * 1024 * 1024  # 32 clusters of 64 KiB
STEPS = 220
MAX_SNAPSHOTS = 9
TARGETS = ("vda", "vdb")
NAMES = ["a", "b", "c", "snap shot", "ünï", "x" * 255, "d.e", "f-1", "g_2", "h", "i", "j", "k", "l", "m"]


class Model:
    def __init__(self, bases: dict[str, bytes]) -> None:
        self.bases = bases
        self.live = {t: bytearray(b) for t, b in bases.items()}
        self.content: dict[str, dict[str, bytes]] = {}
        self.parent: dict[str, str | None] = {}
        self.current: str | None = None

    def children(self, name: str | None) -> list[str]:
        return [n for n, p in self.parent.items() if p == name]

    def subtree(self, name: str) -> list[str]:
        order = [name]
        for node in order:
            order.extend(self.children(node))
        return order

    def ancestors(self, name: str | None) -> list[str]:
        chain = []
        while name is not None:
            chain.append(name)
            name = self.parent[name]
        return chain

    def state_of(self, name: str | None) -> dict[str, bytes]:
        return dict(self.bases) if name is None else dict(self.content[name])

    def has_dependents(self, name: str) -> bool:
        return bool(self.children(name)) or self.current == name


class Walk:
    def __init__(self, seed: int, workdir: str, bases: dict[str, bytes], base_paths: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.model = Model(bases)
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
        assert set(names) == set(self.model.content), self.where()
        for name, record in names.items():
            parent = view.snapshots[record.parent].name if record.parent else None
            assert parent == self.model.parent[name], f"parent of {name!r}; {self.where()}"
        current = view.snapshots[view.current].name if view.current else None
        assert current == self.model.current, self.where()

        jobs: list[tuple[str, str, bytes]] = []
        for name, record in names.items():
            for t in TARGETS:
                jobs.append((self.dom.layer_path(t, record.id), f"{name!r}/{t}", self.model.content[name][t]))
        for t in TARGETS:
            jobs.append((self.dom.live_path(t), f"live/{t}", bytes(self.model.live[t])))
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
        m.live[target][offset : offset + length] = bytes([pattern]) * length
        self.log.append(f"write {target} {command}")

    async def step_create(self) -> None:
        m = self.model
        free = [n for n in NAMES if n not in m.content]
        if not free or len(m.content) >= MAX_SNAPSHOTS:
            return await self.step_write()
        name = self.rng.choice(free)
        compression = self.rng.choice([None, None, None, "gzip", "zstd"])
        self.log.append(f"create {name!r} compression={compression}")
        await self.dom.create(name, None, compression)
        m.content[name] = {t: bytes(b) for t, b in m.live.items()}
        m.parent[name] = m.current
        m.current = name

    def pick(self) -> str | None:
        return self.rng.choice(sorted(self.model.content)) if self.model.content else None

    async def step_revert(self) -> None:
        name = self.pick()
        if name is None:
            return await self.step_create()
        self.log.append(f"revert {name!r}")
        await self.dom.revert(self.id_of(name))
        self.model.live = {t: bytearray(b) for t, b in self.model.content[name].items()}
        self.model.current = name

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
        for child in m.children(name):
            m.parent[child] = m.parent[name]
        if m.current == name:
            m.current = m.parent[name]
        del m.content[name], m.parent[name]

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
        del m.content[name], m.parent[name]

    async def step_discard_force(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        doomed = m.subtree(name)
        self.log.append(f"discard-force {name!r} (subtree {doomed}, current {m.current!r})")
        await self.dom.deactivate(self.id_of(name), DeactivateFlags.DISCARD_FORCE)
        if m.current in doomed:
            m.current = m.parent[name]
            m.live = {t: bytearray(b) for t, b in m.state_of(m.current).items()}
        for node in doomed:
            del m.content[node], m.parent[node]

    async def step_deactivate(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        self.log.append(f"deactivate {name!r} (current {m.current!r})")
        await self.dom.deactivate(self.id_of(name), DeactivateFlags.NONE)
        if name in m.ancestors(m.current):
            m.current = m.parent[name]

    async def step_rename(self) -> None:
        m = self.model
        name = self.pick()
        if name is None:
            return await self.step_create()
        new = self.rng.choice(NAMES)
        self.log.append(f"rename {name!r} -> {new!r}")
        if new in m.content and new != name:
            with pytest.raises(snapfs.SnapfsError) as info:
                await self.dom.rename(self.id_of(name), new)
            assert info.value.errno == errno.EEXIST
            self.refusals += 1
            return
        await self.dom.rename(self.id_of(name), new)
        if new != name:
            m.content[new] = m.content.pop(name)
            m.parent[new] = m.parent.pop(name)
            for child, parent in m.parent.items():
                if parent == name:
                    m.parent[child] = new
            if m.current == name:
                m.current = new

    async def step_compress(self) -> None:
        name = self.pick()
        if name is None:
            return await self.step_create()
        kind = self.rng.choice(["gzip", "zstd", "none"])
        self.log.append(f"compress {name!r} {kind}")
        await self.dom.set_compression(self.id_of(name), kind)

    async def run(self, store_path: str, steps: int) -> None:
        core = StoreCore(store_path)
        self.dom, _ = await core.define(
            "walk", [("vda", self.base_paths["vda"], "qcow2"), ("vdb", self.base_paths["vdb"], "raw")]
        )
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
    make_image(path, fmt, SIZE)
    data = bytearray(SIZE)
    commands = []
    for cluster in rng.sample(range(SIZE // CLUSTER), 10):
        pattern = rng.randrange(1, 256)
        commands += ["-c", f"write -P {pattern} {cluster * CLUSTER} {CLUSTER}"]
        data[cluster * CLUSTER : (cluster + 1) * CLUSTER] = bytes([pattern]) * CLUSTER
    run = subprocess.run(["qemu-io", "-f", fmt, *commands, path], capture_output=True)
    assert run.returncode == 0, run.stderr
    return path, bytes(data)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [20240601, 7])
def test_random_walk(tmp_path, seed):
    rng = random.Random(seed ^ 0x5EED)
    vda, vda_data = _make_base(str(tmp_path / "vda.qcow2"), "qcow2", rng)
    vdb, vdb_data = _make_base(str(tmp_path / "vdb.img"), "raw", rng)
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    with tempfile.TemporaryDirectory(dir=scratch) as workdir:
        walk = Walk(seed, workdir, {"vda": vda_data, "vdb": vdb_data}, {"vda": vda, "vdb": vdb})
        trio.run(walk.run, str(tmp_path / "store"), STEPS)
    # The walk must have exercised what it claims to.
    for name in ("step_create", "step_revert", "step_merge", "step_discard_force", "step_deactivate", "step_write"):
        assert walk.counts.get(name, 0) >= 3, walk.counts
    assert walk.counts.get("merge-2", 0) >= 1 and walk.counts.get("merge-1", 0) >= 1, walk.counts
