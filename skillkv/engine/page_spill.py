"""Prefix-cache pages evicted from the pool, kept in host memory until a prompt needs them again.

When the pool needs room it evicts unheld cached pages (engine/pages.py); with a spill budget each one's KV (every
layer's keys and values of its page_size slots) is first copied to host memory here, under its chained key,
parent key and tokens (engine/prefix_cache.py). A later prompt whose chain continues past the pages still in the
pool finds the next ones here: each is copied back into a fresh pool page and published again, so the prompt's
prefix is served as if it had never left (the same bits). On a GPU this is the host tier of the conversation
cache (HBM is tens of GB, host memory hundreds); on the CPU, where the pool is host memory already, the budget is
0 by default and nothing is spilled.

Contract: `put` keeps at most `budget_bytes` (least recently spilled dropped first; a page larger than the budget
is not kept); `take(key, parent, tokens)` returns and forgets the page only if its parent and tokens match.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Spilled:
    key: int
    parent: int
    tokens: tuple
    k: torch.Tensor  # [layers, page_size, kv_heads, head_dim] on the host
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PageSpill:
    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.nbytes = budget_bytes, 0
        self.pages: OrderedDict[int, Spilled] = OrderedDict()
        self.spilled = self.restored = 0

    def put(self, key: int, parent: int, tokens: tuple, k: torch.Tensor, v: torch.Tensor) -> bool:
        s = Spilled(key, parent, tokens, k, v)
        if s.nbytes > self.budget_bytes:
            return False
        old = self.pages.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        while self.nbytes + s.nbytes > self.budget_bytes:
            self.nbytes -= self.pages.popitem(last=False)[1].nbytes
        self.pages[key] = s
        self.nbytes += s.nbytes
        self.spilled += 1
        return True

    def take(self, key: int, parent: int, tokens: tuple) -> Spilled | None:
        s = self.pages.get(key)
        if s is None or s.parent != parent or s.tokens != tokens:
            return None
        del self.pages[key]
        self.nbytes -= s.nbytes
        self.restored += 1
        return s

    def clear(self) -> None:
        self.pages.clear()
        self.nbytes = 0
