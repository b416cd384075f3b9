"""SharedLRU: concurrent callers share one computation; eviction by weight; failures not kept."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.lru import SharedLRU


def test_concurrent_callers_compute_once() -> None:
    lru: SharedLRU[int] = SharedLRU(10)
    calls: list[int] = []

    def slow() -> int:
        calls.append(1)
        time.sleep(0.2)
        return 42

    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(lru.get("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [42] * 4 and len(calls) == 1 and lru.computed == 1


def test_eviction_by_weight_least_recent_first() -> None:
    lru: SharedLRU[bytes] = SharedLRU(10, weight=len)
    for k in "abc":
        lru.get(k, lambda: b"xxxx")  # 4 each: c pushes a out (12 > 10)
    assert len(lru) == 2
    lru.get("b", lambda: b"never")  # b used: c is now the oldest
    lru.get("d", lambda: b"xxxx")
    assert lru.get("b", lambda: b"recomputed") == b"xxxx"
    assert lru.get("c", lambda: b"recomputed") == b"recomputed"  # evicted, computed again; d goes
    assert lru.get("d", lambda: b"again") == b"again"
    lru.discard(lambda k: k in ("b", "c"))
    assert len(lru) == 1


def test_a_failure_is_not_kept() -> None:
    lru: SharedLRU[int] = SharedLRU(3)

    def boom() -> int:
        raise OSError("read failed")

    with pytest.raises(OSError):
        lru.get("k", boom)
    assert lru.get("k", lambda: 7) == 7 and lru.computed == 1
