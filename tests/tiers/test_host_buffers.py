"""The host tier recycles unpinned read buffers once nothing uses them (a fresh buffer's page faults cost more than
the read), and never while an entry or a view of it is alive."""

from __future__ import annotations

import torch

from skillkv.tiers.host_cache import RECYCLE_MIN, HostCache, HostKV


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_buffer_is_reused_only_when_nothing_uses_it():
    c = HostCache(0, pin=False)
    n = RECYCLE_MIN * 2
    a = c.alloc(n)
    entry = HostKV("k", [1], 2, [4, 3, 64], torch.float32, buffer=a)
    first = _storage(a)
    del a
    b = c.alloc(n)  # the entry still holds the first buffer
    second = _storage(b)
    assert second != first
    view = entry.keys[1]
    del entry, b
    assert _storage(c.alloc(n)) == second  # the first is still seen through a view
    del view
    again = c.alloc(n // 2)  # a smaller read fits in a recycled buffer
    assert _storage(again) in (first, second) and again.numel() == n // 2
    assert len(c._spares) <= 2


def test_small_and_pinned_requests_are_not_recycled():
    c = HostCache(0, pin=False)
    small = c.alloc(1024)
    assert small.numel() == 1024 and c._spares == []
