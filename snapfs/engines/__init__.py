"""Engines: what turns the rules' intents (rules.py) into steps on files, and runs them.

The rules decide what must happen to a domain's layers (freeze S, fold S into its
dependents, ...); an engine decides how, for the way the domain is run: qemu_img.py
works on files no process holds (offline); a QMP engine would drive a running QEMU
(DESIGN section 8). The journal (journal.py) records an engine's steps, runs them one by
one through the engine that planned them, and finishes them after a crash; the metadata
steps (meta_write, meta_delete, state) are the journal's own, passed through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

from ..durable import DirSyncs
from ..records import DiskRecord
from ..store import DomainFiles

Progress = Callable[[float], None]  # called with a percentage (0-100) while a long step runs


class Engine(Protocol):
    name: str  # recorded in the journal, so recovery uses the engine that planned the steps
    temporary_suffixes: tuple[str, ...]  # of files it builds beside a layer; removed by recovery

    def snapshot_state(self) -> str:
        """The domain's state as a snapshot taken now records it (libvirt's words)."""
        ...

    def steps(self, intent: dict, files: DomainFiles, disks: list[DiskRecord]) -> list[dict]:
        """The idempotent steps that carry out one layer intent, for every disk."""
        ...

    def hold_layers(self, files: DomainFiles, steps: list[dict]) -> contextlib.AbstractContextManager:
        """Refuse (SnapfsError) before anything is written if the steps cannot run now;
        otherwise hold what they change (no other process may open it for writing) until
        the returned context manager exits: after the last step, in the operation and in
        recovery alike."""
        ...

    async def run(
        self, step: dict, files: DomainFiles, *, recovering: bool, syncs: DirSyncs, progress: Progress | None
    ) -> None:
        """Carry out one step (again, after a crash part-way: every step is idempotent)."""
        ...

    async def new_live_layer(self, path: str, disk: DiskRecord) -> None:
        """The first live layer of a disk just defined, on its base image."""
        ...

    async def probe_format(self, path: str) -> str:
        """The format of a base image, probed (once: define records it)."""
        ...

    async def virtual_size(self, path: str, fmt: str) -> int: ...

    async def has_own_data(self, path: str) -> bool:
        """Whether a layer itself (not its backing chain) holds any data."""
        ...


async def let_go(*engines: object) -> None:
    """End what an engine kept for an operation (the QMP engine's session: QEMU serves one
    client at a time); nothing for the others."""
    for engine in engines:
        close = getattr(engine, "aclose", None)
        if close is not None:
            await close()
