"""A small in-process cache whose entries expire: the one helper behind the gateway's short-lived
copies of database rows and platform lists (rate-limit policies, groups, API keys, model lists).

Each worker keeps its own; what must apply at once is not cached here. Not thread-safe beyond what a
dict gives: two threads may both load a missing entry, and the last one wins (loads are idempotent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """Values kept for ``ttl()`` seconds (read at each store, so a setting changed in tests applies);
    past ``max_size`` entries everything is forgotten at once (cheap, and the loads are cheap too)."""

    def __init__(self, ttl: Callable[[], float], max_size: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.max_size, self.clock = ttl, max_size, clock
        self.data: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        """The live value, or None."""
        item = self.data.get(key)
        return item[1] if item is not None and item[0] > self.clock() else None

    def stale(self, key: K) -> V | None:
        """The value even if it expired (to show what was last known), or None."""
        item = self.data.get(key)
        return item[1] if item is not None else None

    def put(self, key: K, value: V) -> V:
        if len(self.data) >= self.max_size and key not in self.data:
            self.data.clear()
        self.data[key] = (self.clock() + self.ttl(), value)
        return value

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        """The live value, or ``load()``'s, kept."""
        item = self.data.get(key)
        if item is not None and item[0] > self.clock():
            return item[1]
        return self.put(key, load())

    def pop(self, key: K) -> None:
        self.data.pop(key, None)

    def clear(self) -> None:
        self.data.clear()
