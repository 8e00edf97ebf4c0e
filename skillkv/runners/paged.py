"""The paged engine behind the runner interface that SkillKV uses (the same four calls as `HFRunner`).

A "cache" here is a `Request` of the engine: `new_cache(prefix, key)` starts one over the resident prefix `key`
(an L1 hit when it is already in the pool; otherwise `prefix` is loaded into the pool first and stays resident for
the next question), `forward` appends tokens, `slice_kv` copies rows out of its pages, and `release` frees its
private pages. `open_stored(key, pieces)` goes through the tiers instead (engine/tiers.py): stored snapshots are
paged L2 -> host -> pool layer by layer while the question's first layers already compute, when the tier policy
says loading beats recomputing (on CUDA, measured once per model and store; on the CPU loading always wins: a
CPU prefills hundreds of tokens per second and reads snapshots at GB/s). `composer` opens compose mode's requests
over placed entries (engine/compose_paged.py). Every piece of a chain is computed by this same engine (compile, exact and full mode alike), so
exact mode equals a from-scratch prefill cut at the same segment boundaries bit for bit, on any device and dtype.
"""

from __future__ import annotations

import torch

from skillkv.runners.hf import KV
from skillkv.engine.paged import PagedEngine, Request


def default_budget(device: torch.device) -> int:
    """Half of the memory left on the device once the weights are loaded (CPU: 2 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


class PagedRunner:
    name = "paged"

    def __init__(self, model, budget_bytes: int | None = None, attention: str = "auto", store=None,
                 host_budget: int | None = None):
        device = next(model.parameters()).device
        self.engine = PagedEngine(model, budget_bytes or default_budget(device), attention=attention)
        self.device = device
        self.store, self.host_budget = store, host_budget
        self._tiers = None
        self._composer = None
        self._rotary = model.model.rotary_emb

    @property
    def tiers(self):
        if self._tiers is None:
            from skillkv.tiers.policy import policy_for
            from skillkv.tiers.tiers import Tiers

            policy = policy_for(self.engine, self.store) if self.device.type == "cuda" else None
            self._tiers = Tiers(self.engine, self.store, self.host_budget or (4 << 30), policy=policy)
        return self._tiers

    @property
    def composer(self):
        """Compose mode over this engine (engine/compose_paged.py); entries still being paged in by the tiers
        are waited for before their pages are read."""
        if self._composer is None:
            from skillkv.engine.placed import PagedComposer

            self._composer = PagedComposer(self.engine, self._rotary, settle=self._settle)
        return self._composer

    def _settle(self, key: str) -> None:
        if self._tiers is not None:
            self._tiers.wait(key)

    def prefetch(self, pieces) -> None:
        """Start reading the stored snapshots of `pieces` [(key, ids)] into the host tier in the background."""
        if self.store is not None:
            self.tiers.prefetch(pieces)

    def open_stored(self, key: str, pieces) -> tuple[Request, str] | None:
        """A request over the prefix `key` made of the stored snapshots `pieces`, paged in through the tiers, and
        the tier it came from (l1 | host | l2); None when the policy says recomputing is faster. Raises
        SnapshotError for a damaged, foreign or stale snapshot (nothing is left resident)."""
        if self.store is None:
            return None
        tiers = self.tiers
        where = tiers.choose(key, pieces)
        if where == "recompute":
            return None
        where = tiers.make_resident(key, pieces)
        return tiers.start(key), where

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
        if self._tiers is not None:  # waits per layer for a prefix still being paged in
            return self._tiers.prefill([cache], [ids])[0]
        return self.engine.prefill([cache], [ids])[0]

    def slice_kv(self, cache: Request, start: int, end: int) -> KV:
        pool = self.engine.pool
        return [tuple(t[start:end].clone() for t in pool.gather(i, cache.pages, end)) for i in range(pool.layers)]

    def release(self, cache: Request) -> None:
        if self._tiers is not None:
            self._tiers.finish(cache)
        else:
            self.engine.finish(cache)
