"""The one in-memory model of the rules (DESIGN section 1), written independently of
snapfs/rules.py: what the user must see after each operation.

A disk's content is opaque here (test_crash.py keeps sorted cluster writes, test_walk.py
keeps the bytes): the model only moves contents between snapshots and the live disk.
Every operation returns a new Model and leaves this one as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Snap:
    parent: str | None
    content: dict  # target -> content
    description: str = ""
    compression: str = "none"


@dataclass
class Model:
    base: dict  # target -> content of the base image
    snaps: dict[str, Snap] = field(default_factory=dict)
    current: str | None = None
    live: dict = field(default_factory=dict)  # target -> content of the live disk

    def __post_init__(self) -> None:
        if not self.live:
            self.live = dict(self.base)

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def children(self, name: str | None) -> list[str]:
        return [n for n, s in self.snaps.items() if s.parent == name]

    def subtree(self, name: str) -> list[str]:
        order = [name]
        for node in order:
            order.extend(self.children(node))
        return order

    def ancestors(self, name: str | None) -> list[str]:
        chain = []
        while name is not None:
            chain.append(name)
            name = self.snaps[name].parent
        return chain

    def content(self, name: str | None) -> dict:
        return dict(self.base) if name is None else dict(self.snaps[name].content)

    def has_dependents(self, name: str) -> bool:
        return bool(self.children(name)) or self.current == name

    def write(self, target: str, content: object) -> Model:
        m = self.copy()
        m.live[target] = content
        return m

    def create(self, name: str, description: str = "", compression: str = "none") -> Model:
        m = self.copy()
        m.snaps[name] = Snap(self.current, dict(self.live), description, compression)
        m.current = name
        return m

    def revert(self, name: str) -> Model:
        m = self.copy()
        m.current, m.live = name, self.content(name)
        return m

    def merge(self, name: str) -> Model:
        m = self.copy()
        gone = m.snaps.pop(name)
        for child in self.children(name):
            m.snaps[child] = replace(m.snaps[child], parent=gone.parent)
        if m.current == name:
            m.current = gone.parent
        return m

    def discard(self, name: str) -> Model:
        assert not self.has_dependents(name), f"discard of {name!r} must be refused"
        return self.merge(name)

    def discard_force(self, name: str) -> Model:
        m = self.copy()
        doomed = self.subtree(name)
        for node in doomed:
            del m.snaps[node]
        if self.current in doomed:
            parent = self.snaps[name].parent
            m.current, m.live = parent, self.content(parent)
        return m

    def deactivate(self, name: str) -> Model:
        m = self.copy()
        if name in self.ancestors(self.current):
            m.current = self.snaps[name].parent
        return m

    def rename(self, old: str, new: str) -> Model:
        m = self.copy()
        m.snaps[new] = m.snaps.pop(old)
        for child in self.children(old):
            m.snaps[child] = replace(m.snaps[child], parent=new)
        if m.current == old:
            m.current = new
        return m

    def describe(self, name: str, text: str) -> Model:
        m = self.copy()
        m.snaps[name] = replace(m.snaps[name], description=text)
        return m

    def compress(self, name: str, kind: str) -> Model:
        m = self.copy()
        m.snaps[name] = replace(m.snaps[name], compression=kind)
        return m
