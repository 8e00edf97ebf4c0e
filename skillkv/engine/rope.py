"""RoPE arithmetic on stored keys: moving a skill's KV to another position (compose mode).

Keys are stored after RoPE: k_p = s * R(p * f) k, with R a rotation per frequency pair, f the fixed inverse
frequencies and s the cos/sin scaling (`attention_scaling`, 1 except for YaRN-like types). Rotations of one plane
compose, R(a) R(b) = R(a + b), so R(delta * f) k_p = s * R((p + delta) * f) k is exactly the key the model computes
at position p + delta (`rerotate`). This holds whenever f does not depend on the position or the sequence length:
RoPE types default, linear, llama3 (the 8B shape's scaling) and yarn. Dynamic NTK and longrope change f with the
length and are refused (`check_composable`). The cos/sin of the delta come from the model's own rotary module,
computed in float32 on the keys' device (CPU or CUDA alike).

Models with one RoPE table per layer type (Gemma 3: sliding-window layers with base 10,000, global layers with base
1,000,000, `rope_parameters` keyed by `layer_types`) re-rotate every layer with its own type's table
(`rope_layer_types`).

`place` concatenates snapshots into one contiguous composed prefix (the hf runner's placement); the paged runner
places rows into pool pages with the same `rerotate` (engine/placed.py), so both give the same rows bit for bit.
"""

from __future__ import annotations

from skillkv.errors import SkillkvError
from skillkv.lazy import torch  # compose checks RoPE types without torch (skillkv/lazy.py)

KV = list  # list[tuple[torch.Tensor, torch.Tensor]]

POSITION_INDEPENDENT_ROPE = {"default", "linear", "llama3", "yarn"}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation (NeoX layout, as transformers): [a, b] -> [-b, a] on the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_layer_types(config) -> list[str] | None:
    """The RoPE table name of every layer where the model has one table per layer type (Gemma 3:
    `rope_parameters` = {layer type: parameters}, `layer_types` naming each layer's), else None (one table)."""
    rp = getattr(config, "rope_parameters", None)
    types = getattr(config, "layer_types", None)
    if types and isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        return list(types[: config.num_hidden_layers])
    return None


def check_composable(config) -> None:
    """SkillkvError unless every layer's keys can be re-positioned by one rotation of its RoPE table (module
    docstring). Sliding-window layers are allowed (the HF runner keeps their every token)."""
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    types = rope_layer_types(config)
    if types is not None:
        missing = sorted(set(types) - set(rp))
        if missing:
            raise SkillkvError(f"{config.model_type} has no RoPE parameters for layer type(s) {', '.join(missing)}")
        tables = [rp[t] for t in dict.fromkeys(types)]
    elif isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        raise SkillkvError(f"{config.model_type} has one RoPE table per layer type but no layer_types; use exact mode")
    else:
        tables = [rp]
    for t in tables:
        rope_type = (t.get("rope_type") or t.get("type") or "default") if isinstance(t, dict) else "default"
        if rope_type not in POSITION_INDEPENDENT_ROPE:
            raise SkillkvError(f"compose needs position-independent RoPE frequencies; {rope_type!r} changes them "
                               "with the sequence length; use exact mode")


def rope_delta(rotary, delta: int, device, dtype=None,
               layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [head_dim] of a rotation by `delta` positions, from the model's rotary module, without its
    attention scaling (the stored keys carry it once already). `layer_type` picks the table of a rotary module
    with one per layer type (Gemma 3's takes it as a third argument); None for a single-table module."""
    x = torch.zeros(1, dtype=torch.float32, device=device)
    pos = torch.tensor([[delta]], dtype=torch.long, device=device)
    if layer_type is None:
        cos, sin = rotary(x, pos)
        scale = getattr(rotary, "attention_scaling", 1.0)
    else:
        cos, sin = rotary(x, pos, layer_type)
        scale = getattr(rotary, f"{layer_type}_attention_scaling", 1.0)
    scale, dtype = float(scale or 1.0), dtype or torch.float32
    return (cos[0, 0] / scale).to(dtype), (sin[0, 0] / scale).to(dtype)


def rerotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [tokens, kv_heads, head_dim] (after RoPE) rotated further by the angle whose cos/sin are given
    (from `rope_delta`); computed in float32, returned in the keys' dtype on their device."""
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


def place(snapshots: list[KV], preamble: int, rotary, context: list[int] | None = None,
          layer_types: list[str] | None = None) -> tuple[KV, list[int]]:
    """Concatenate snapshots into one prefix: the first is [preamble][skill 1] at positions 0..n, used whole;
    every later snapshot i holds its skill's rows after `context[i]` rows of context (default `preamble`: a
    single-skill snapshot; preamble + neighbour for a neighbour snapshot), keys re-rotated by (its new start -
    context[i]). Returns (kv, starts): `starts` are the positions where the preamble and each skill begin. Always
    returns new tensors (the snapshots, possibly read-only file mappings, are not touched). Runs on the
    snapshots' device; one rotation table per skill (not per layer), or with `layer_types` (one RoPE table name
    per layer, `rope_layer_types`) one per skill and layer type, each layer rotated with its own.
    """
    if not snapshots:
        raise SkillkvError("nothing to compose")
    layers = len(snapshots[0])
    context = context or [preamble] * len(snapshots)
    starts, pieces = [0], [snapshots[0]]
    pos = snapshots[0][0][0].shape[0]
    for snap, ctx in zip(snapshots[1:], context[1:]):
        n = snap[0][0].shape[0] - ctx
        starts.append(pos)
        dev = snap[0][0].device
        if layer_types is None:
            tables = [rope_delta(rotary, pos - ctx, dev)] * layers
        else:
            by_type = {t: rope_delta(rotary, pos - ctx, dev, layer_type=t) for t in dict.fromkeys(layer_types)}
            tables = [by_type[t] for t in layer_types]
        pieces.append([(rerotate(k[ctx:], *cs), v[ctx:]) for (k, v), cs in zip(snap, tables)])
        pos += n
    starts.insert(1, preamble)  # preamble at 0, first skill at `preamble`
    kv = [(torch.cat([p[i][0] for p in pieces], 0), torch.cat([p[i][1] for p in pieces], 0)) for i in range(layers)]
    return kv, starts
