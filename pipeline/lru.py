"""A thread-safe LRU of computed values that concurrent callers share.

The first caller of `get` for a key computes the value; callers that ask for the same key
meanwhile wait for that result instead of computing it again. Used for decoded COG tiles
(`native_read`) and decoded cube blocks (`tiling`), which several threads need at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SharedLRU(Generic[V]):
    """At most `capacity` units of values, by `weight` (default: 1 per value); the least
    recently used go first. A failed computation is not kept: the next caller tries again."""

    def __init__(self, capacity: float, weight: Callable[[V], float] | None = None) -> None:
        self.capacity = capacity
        self._weight = weight or (lambda v: 1)
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, cf.Future[V]] = OrderedDict()
        self._sizes: dict[Hashable, float] = {}
        self._total = 0.0
        self.computed = 0  # values computed since creation (tests and benchmarks read it)

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            fut = self._items.get(key)
            owner = fut is None
            if fut is None:
                fut = self._items[key] = cf.Future()
            else:
                self._items.move_to_end(key)
        if not owner:
            return fut.result()
        try:
            value = compute()
        except BaseException as e:
            fut.set_exception(e)
            with self._lock:
                if self._items.get(key) is fut:
                    del self._items[key]
            raise
        fut.set_result(value)
        with self._lock:
            self.computed += 1
            if self._items.get(key) is fut:  # not dropped meanwhile
                size = self._sizes[key] = self._weight(value)
                self._total += size
                self._evict(keep=key)
        return value

    def _evict(self, keep: Hashable) -> None:
        for k in list(self._items):
            if self._total <= self.capacity:
                break
            if k == keep or k not in self._sizes:  # the new value, or still being computed
                continue
            del self._items[k]
            self._total -= self._sizes.pop(k)

    def discard(self, pred: Callable[[Hashable], bool]) -> None:
        """Forget every finished or pending value whose key satisfies `pred`."""
        with self._lock:
            for k in [k for k in self._items if pred(k)]:
                del self._items[k]
                self._total -= self._sizes.pop(k, 0.0)

    def clear(self) -> None:
        self.discard(lambda k: True)

    def __len__(self) -> int:
        return len(self._items)
