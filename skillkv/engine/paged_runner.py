"""The paged engine behind the runner interface that SkillKV uses (the same four calls as `HFRunner`).

A "cache" here is a `Request` of the engine: `new_cache(prefix, key)` starts one over the resident prefix `key`
(an L1 hit when it is already in the pool; otherwise `prefix` is loaded into the pool first and stays resident for
the next question), `forward` appends tokens, `slice_kv` copies rows out of its pages, and `release` frees its
private pages. Every piece of a chain is computed by this same engine (compile, exact and full mode alike), so
exact mode equals a from-scratch prefill cut at the same segment boundaries bit for bit, on any device and dtype.
"""

from __future__ import annotations

import torch

from skillkv.engine.hf_runner import KV
from skillkv.engine.paged import PagedEngine, Request


def default_budget(device: torch.device) -> int:
    """Half of the memory left on the device once the weights are loaded (CPU: 2 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


class PagedRunner:
    name = "paged"

    def __init__(self, model, budget_bytes: int | None = None, attention: str = "auto"):
        device = next(model.parameters()).device
        self.engine = PagedEngine(model, budget_bytes or default_budget(device), attention=attention)
        self.device = device

    def resident(self, key: str) -> bool:
        return self.engine.resident(key)

    def pin(self, key: str, tokens: int, load) -> None:
        self.engine.make_resident(key, tokens, load, pin=True)

    def new_cache(self, prefix: KV | None = None, key: str | None = None) -> Request:
        if key is None:
            return self.engine.start(None)
        tokens = prefix[0][0].shape[0] if prefix else 0
        self.engine.make_resident(key, tokens, lambda: prefix)
        return self.engine.start(key)

    def forward(self, ids: list[int], cache: Request) -> torch.Tensor:
        return self.engine.prefill([cache], [ids])[0]

    def slice_kv(self, cache: Request, start: int, end: int) -> KV:
        pool = self.engine.pool
        return [tuple(t[start:end].clone() for t in pool.gather(i, cache.pages, end)) for i in range(pool.layers)]

    def release(self, cache: Request) -> None:
        self.engine.finish(cache)
