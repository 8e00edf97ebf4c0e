"""Masked passes over a transformers model: per-layer attention masks that respect sliding windows, and the
selective recompute of chosen rows (compose repair on the hf runner).

The repair passes run layers or the whole model with explicit masks, so they apply each layer's window themselves:
`layer_masks` limits an allowed-matrix to each layer's window (a key is seen if k > q - window), `model_mask` packs
them the way the model's forward accepts (one 4D mask, or {layer type: mask} for Gemma 3).
"""

from __future__ import annotations

from skillkv.lazy import inference_mode, torch
from skillkv.model import layer_windows

KV = list  # list[tuple[torch.Tensor, torch.Tensor]]


def layer_masks(config, allowed: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list:
    """Each layer's boolean attention mask [1, 1, m, n] (True = attend): `allowed` [m, n] (queries at positions
    `q_pos` [m], keys at `k_pos` [n]) limited to the layer's window, or None for a full-attention layer when
    `allowed` is None (plain causal)."""
    out = []
    for w in layer_windows(config):
        if w is None:
            out.append(None if allowed is None else allowed[None, None])
            continue
        inside = k_pos[None, :] > q_pos[:, None] - w
        base = allowed if allowed is not None else k_pos[None, :] <= q_pos[:, None]
        out.append((base & inside)[None, None])
    return out


def model_mask(config, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The `attention_mask` argument of a whole-model forward: one 4D mask, or where layers of different types
    need different masks, {layer type: mask} (the form Gemma 3's model accepts)."""
    masks = layer_masks(config, allowed, q_pos, k_pos)
    if len(set(layer_windows(config))) == 1:
        return masks[0]
    by_type = {}
    for t, m in zip(config.layer_types, masks):
        by_type.setdefault(t, m)
    return by_type


@inference_mode
def recompute_rows(model, cache, n: int, ids: list[int], positions: list[int], cache_kw: str) -> KV:
    """Run the tokens at sorted, distinct `positions` of `ids` over `cache` (a DynamicCache holding the n rows of
    the prefix), each given everything before it in one forward pass: a chosen token attends to the earlier
    unchosen rows of the cache and to the recomputed rows of earlier chosen tokens (and itself), at its true
    position. Returns the recomputed rows per layer (keys, values) [len(positions), kv_heads, head_dim]; the cache
    grows by those rows (the caller drops or discards them)."""
    dev = next(model.parameters()).device
    sel = sorted(set(positions))
    p = torch.tensor(sel, dtype=torch.long, device=dev)
    chosen = torch.zeros(n, dtype=torch.bool, device=dev)
    chosen[p] = True
    cols = torch.arange(n, device=dev)
    old = (cols[None, :] < p[:, None]) & ~chosen[None, :]  # [m, n]
    new = p[None, :] <= p[:, None]  # [m, m]
    mask = model_mask(model.config, torch.cat([old, new], 1), p, torch.cat([cols, p]))
    x = torch.tensor([[ids[i] for i in sel]], dtype=torch.long, device=dev)
    model(input_ids=x, position_ids=p[None], attention_mask=mask, use_cache=True, logits_to_keep=1,
          **{cache_kw: cache})
    return [(layer.keys[0, :, n:].transpose(0, 1), layer.values[0, :, n:].transpose(0, 1)) for layer in cache.layers]
