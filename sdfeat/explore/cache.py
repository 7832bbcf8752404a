"""A small thread-safe LRU cache bounded by bytes: the explorer keeps the activations of recently viewed images
(and their decoded source images) so that hovering over tokens of one image reads its block once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """get(key, compute, nbytes): the cached value, or compute() stored under key; least recently used entries are
    dropped while the total of nbytes(value) exceeds `max_bytes` (the newest entry is always kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], V], nbytes: Callable[[V], int]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
        value = compute()  # outside the lock: two threads may compute one key; the second result replaces the first
        size = nbytes(value)
        with self._lock:
            if key in self._items:
                self._total -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._total += size
            while self._total > self.max_bytes and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._total -= dropped
        return value

    def __len__(self) -> int:
        return len(self._items)
