"""A runner over a transformers causal LM with an explicit, reusable KV prefix.

KV layout everywhere in skillkv: one (keys, values) pair per layer, each [tokens, kv_heads, head_dim] (NHD, the
layout of the paged pool and of snapshots) in the model's dtype. The runner turns such a prefix into a transformers
DynamicCache without copying (the cache only concatenates new tensors on later steps, so a prefix shared by many
questions is never mutated).

Every layer of the runner's caches keeps every token, also for sliding-window layers (Gemma 3, Mistral): the cache
is made without the model's config, so transformers does not give those layers a cache that keeps only the last
window. The model's own sliding-window mask, built from the token positions, still limits what each query sees, so
the result is the model's; and a prefix sliced out of the cache is the prefix's KV at every layer, which is what
snapshots and composition assume. Full mode uses the same caches, so exact and full compute the same thing.
"""

from __future__ import annotations

import inspect

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


class HFRunner:
    """Prefill and decode steps of `model` (a transformers CausalLM) over a DynamicCache. Nothing stays resident
    between questions (`resident` is always False); SkillKV memoizes prefixes itself."""

    name = "hf"

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self._cache_cls = DynamicCache
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x renames `past_key_values` to `cache`; accept both (the GPU host has 5.17).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device

    def new_cache(self, prefix: KV | None = None, key: str | None = None):
        """A cache holding `prefix` (which it never modifies in place), every layer keeping every token (module
        docstring); `key` is unused here."""
        cache = self._cache_cls()
        for i, (k, v) in enumerate(prefix or []):
            k, v = (t.to(self.device).transpose(0, 1).unsqueeze(0) for t in (k, v))
            cache.update(k, v, i)
        return cache

    @torch.inference_mode()
    def forward(self, ids: list[int], cache) -> torch.Tensor:
        """Run `ids` after the tokens already in `cache` (which grows by len(ids)); return last-position
        logits as float32 [vocab]."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[0, -1].float()

    def resident(self, key: str) -> bool:
        return False

    def release(self, cache) -> None:
        """Nothing to free: the cache is garbage-collected."""

    @staticmethod
    def cache_len(cache) -> int:
        return int(cache.get_seq_length())

    @staticmethod
    def slice_kv(cache, start: int, end: int) -> KV:
        """Copy positions [start, end) of every layer out of `cache` as [n, kv_heads, head_dim] tensors."""
        return [(layer.keys[0, :, start:end].transpose(0, 1).contiguous(),
                 layer.values[0, :, start:end].transpose(0, 1).contiguous())
                for layer in cache.layers]
