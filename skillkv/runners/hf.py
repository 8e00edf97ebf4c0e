"""The hf runner: transformers' own forward over DynamicCaches. Any model family, sliding-window models included;
the reference the paged runner is tested against.

Resident prefixes are KV tensors in memory (per layer [tokens, kv_heads, head_dim], the layout of the paged pool
and of snapshots), LRU-evicted beyond `budget_bytes` (never while a sequence holds one; pinned ones last). A
sequence wraps a prefix in a DynamicCache without copying: the cache only concatenates new tensors on later steps,
so a prefix shared by many questions is never written.

Every layer of the runner's caches keeps every token, also for sliding-window layers (Gemma 3, Mistral): the cache
is made without the model's config, so transformers does not give those layers a cache that keeps only the last
window. The model's own sliding-window mask, built from the token positions, still limits what each query sees, so
the result is the model's; and rows read out of a cache are the prefix's KV at every layer, which is what snapshots
and composition assume. Full mode uses the same caches, so exact and full compute the same thing.

No fixed pool: admission never waits for pages (`can_alloc` is always true). A batched `prefill` runs its
sequences one after another, so each one's result is what it would be alone (`batch_invariant`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch

from skillkv.engine.rope import place, rope_layer_types
from skillkv.runners.base import KV, KVSource, Part, ReadyKV, Runner, Seq
from skillkv.runners.hf_masks import recompute_rows


@dataclass
class _Entry:
    kv: KV
    tokens: int
    nbytes: int
    refs: int = 0
    pinned: bool = False


class HFSeq(Seq):
    def __init__(self, cache, key: str | None, length: int):
        self.cache, self.key, self.length = cache, key, length


class HFRunner(Runner):
    name = "hf"
    batch_invariant = True

    def __init__(self, model, budget_bytes: int | None = None):
        from transformers import DynamicCache

        self.model = model
        self._cache_cls = DynamicCache
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x renames `past_key_values` to `cache`; accept both (the GPU host has 5.17).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device
        self.budget_bytes = budget_bytes or (2 << 30)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.evictions = 0
        self._retired: set[str] = set()  # entries to evict once no sequence holds them

    # ------------------------------------------------------------------ residency

    def resident(self, key: str) -> bool:
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        return False

    def admit(self, key: str, sources: list[KVSource], pin: bool = False) -> None:
        per_layer = [[s.wait(i) for s in sources] for i in range(self.model.config.num_hidden_layers)]
        kv = [(self._join([k for k, _ in ps]), self._join([v for _, v in ps])) for ps in per_layer]
        tokens = sum(s.tokens for s in sources)
        nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        self._entries[key] = _Entry(kv, tokens, nbytes, pinned=pin)
        self._evict_over_budget(keep=key)

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0].to(self.device)
        return torch.cat([p.to(self.device) for p in parts], 0)

    def _evict_over_budget(self, keep: str) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for pinned in (False, True):
            for k in [k for k, e in self._entries.items() if e.pinned == pinned and not e.refs and k != keep]:
                if total <= self.budget_bytes:
                    return
                total -= self._entries.pop(k).nbytes
                self.evictions += 1

    def settle(self, key: str) -> None:
        """Admission reads every layer before it returns: nothing is ever still arriving."""

    def pin(self, key: str, pinned: bool = True) -> None:
        self._entries[key].pinned = pinned

    def retire(self, live) -> None:
        self._retired |= {k for k in self._entries if not live(k)}
        self._reap()

    def _reap(self) -> None:
        for k in list(self._retired):
            e = self._entries.get(k)
            if e is None or not e.refs:
                self._entries.pop(k, None)
                self._retired.discard(k)

    # ------------------------------------------------------------------ sequences

    def cache_of(self, kv: KV | None):
        """A DynamicCache holding `kv` without copying it (module docstring)."""
        cache = self._cache_cls()
        for i, (k, v) in enumerate(kv or []):
            k, v = (t.to(self.device).transpose(0, 1).unsqueeze(0) for t in (k, v))
            cache.update(k, v, i)
        return cache

    def open(self, key: str | None) -> HFSeq:
        if key is None:
            return HFSeq(self.cache_of(None), None, 0)
        e = self._entries[key]
        e.refs += 1
        self._entries.move_to_end(key)
        return HFSeq(self.cache_of(e.kv), key, e.tokens)

    def open_composed(self, parts: list[Part], preamble: int) -> HFSeq:
        kvs = []
        for p in parts:  # a snapshot loaded now stays resident for the next question, as `admit` would keep it
            if not self.resident(p.key):
                self.admit(p.key, [ReadyKV(p.load())])
            kvs.append(self._entries[p.key].kv)
        kv, _ = place(kvs, preamble, self.model.model.rotary_emb, [p.context for p in parts],
                      rope_layer_types(self.model.config))
        return HFSeq(self.cache_of(kv), None, kv[0][0].shape[0])

    @torch.inference_mode()
    def prefill(self, seqs: list[HFSeq], ids: list[list[int]], every: bool = False) -> torch.Tensor:
        out = []
        for s, t in zip(seqs, ids):
            x = torch.tensor([t], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=x, use_cache=True, logits_to_keep=len(t) if every else 1,
                                **{self.cache_kw: s.cache}).logits[0]
            s.length += len(t)
            out.append(logits.float() if every else logits[-1:].float())
        return torch.cat(out)

    def recompute(self, seq: HFSeq, ids: list[int], positions: list[int]) -> None:
        if not positions:
            return
        n = seq.length
        rows = recompute_rows(self.model, seq.cache, n, ids, positions, self.cache_kw)
        p = torch.tensor(sorted(set(positions)), dtype=torch.long, device=self.device)
        for layer, (rk, rv) in zip(seq.cache.layers, rows):
            keys, values = layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone()
            keys[0, :, p], values[0, :, p] = rk.transpose(0, 1), rv.transpose(0, 1)
            layer.keys, layer.values = keys, values

    def read(self, seq: HFSeq, start: int, end: int) -> KV:
        return [(layer.keys[0, :, start:end].transpose(0, 1).contiguous(),
                 layer.values[0, :, start:end].transpose(0, 1).contiguous()) for layer in seq.cache.layers]

    def release(self, seq: HFSeq) -> None:
        if seq.key is not None:
            e = self._entries.get(seq.key)
            if e is not None:
                e.refs -= 1
            seq.key = None
            self._reap()
        seq.cache = None

    # ------------------------------------------------------------------ capacity

    def can_alloc(self, pages: int) -> bool:
        return True

    def held_pages(self, seq: HFSeq) -> int:
        return 0

    def usage(self) -> dict:
        return {"resident": len(self._entries), "bytes": sum(e.nbytes for e in self._entries.values()),
                "budget_bytes": self.budget_bytes, "evictions": self.evictions}
