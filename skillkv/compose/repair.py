"""Composition: the KV of any set of compiled skills, in any order, without compiling the combination.

Every skill is compiled as [preamble][skill] at positions 0..n (its single-skill snapshot), so every skill has
seen the same shared preamble. For skills s1..sk in this order the composed KV is

    [preamble][s1]            rows 0..n1 of s1's snapshot, as stored (exact)
    [s2] [s3] ... [sk]        each skill's snapshot rows after the preamble, keys re-rotated by the position
                              delta (new start - compiled start), values as stored (values carry no position)

Re-rotation (`rerotate`). Keys are stored after RoPE: k_p = s * R(p * f) k, with R a rotation per frequency pair,
f the fixed inverse frequencies and s the cos/sin scaling (`attention_scaling`, 1 except for YaRN-like types).
Rotations of one plane compose, R(a) R(b) = R(a + b), so R(delta * f) k_p = s * R((p + delta) * f) k is exactly
the key the model computes at position p + delta. This holds whenever f does not depend on the position or the
sequence length: RoPE types default, linear, llama3 (the 8B shape's scaling) and yarn. Dynamic NTK and longrope
change f with the length and are refused. The cos/sin of the delta come from the model's own rotary module,
computed in float32 on the keys' device (CPU or CUDA alike).

Models with one RoPE table per layer type (Gemma 3: sliding-window layers with base 10,000, global layers with base
1,000,000, `rope_parameters` keyed by `layer_types`) re-rotate every layer with its own type's table. Sliding-window
layers need nothing else from placement: the runner's caches keep every token at every layer (skillkv.engine.
hf_runner), so a snapshot holds every row, and the model's window mask, built from positions, decides what a query
sees. The repair passes below run layers or the model with explicit masks, so they apply each layer's window
themselves (`_layer_masks`).

Neighbour snapshots (the default). A later skill's single-skill snapshot was computed with the preamble as its only
context: its first tokens form their own attention sink and nothing in it has ever had a skill before it. Compose
therefore places later skills from a second snapshot, compiled once per skill after the preamble and a fixed
stand-in skill (`NEIGHBOUR`, ~450 tokens): [preamble][neighbour][skill], its skill rows
re-rotated from their compiled start (preamble + neighbour) like any other. It is the chain piece of [neighbour,
skill] in the store (compiled on first use, verified and collected like every snapshot). The first skill still
comes from its exact single-skill snapshot. On the evaluation (docs/EVAL.md, labelled / reversed skill order) it
cuts the first-token KL to full prefill about 4x (no repair 0.025 / 0.028 -> 0.007 / 0.009; 15% front tokens
0.011 / 0.011 -> 0.003 / 0.002) and lifts top-1 agreement (no repair 0.943 / 0.960 -> 0.965 / 0.973; 15% front
0.975 / 0.973 -> 0.982 / 0.988, the setting that meets the bar).

What re-rotation cannot fix: a later skill's tokens never attended to the skills placed before them. `Repair`
recomputes chosen tokens given the real preceding context, in one forward pass over the composed cache:
  lead N       the first N tokens of every later skill (EPIC: the attention sink a segment start forms);
  recompute F  F of all skill tokens (F x skill tokens in total, lead included), chosen by `select`:
    front      the leading tokens of the later skills, spread evenly over them (rank within the skill, then skill
               order). The default: on the evaluation it beats every per-token score tried at the same budget,
               including CacheBlend's and an oracle that knows the true KV (docs/EVAL.md). A skill's error is
               largest where it has the least context of its own, and recomputed tokens stay contiguous, so on
               the paged engine only a skill's first pages become private copies.
    deviation  the tokens whose values deviate most from a true prefill at a probe layer (CacheBlend). The probe
               runs the first `probe_layer` layers over the whole prompt (about probe_layer / num_layers of a full
               prefill) and compares that layer's values with the composed ones.
Recomputed tokens attend to every earlier token, using the recomputed KV of earlier chosen tokens and the composed
KV of the others (CacheBlend's selective recompute); their new KV replaces the composed rows. Only tokens of
later skills are chosen: the preamble and the first skill are already exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillkv.engine.rope import check_composable, place, rope_layer_types
from skillkv.errors import SkillkvError
from skillkv.model import layer_windows

KV = list[tuple[torch.Tensor, torch.Tensor]]

SELECTIONS = ("front", "deviation")

@dataclass(frozen=True)
class Repair:
    """Boundary repair: `lead` first tokens of every later skill, then up to the `recompute` fraction of all
    skill tokens chosen by `select` (front | deviation at `probe_layer`); see the module docstring."""

    lead: int = 0
    recompute: float = 0.0
    select: str = "front"
    probe_layer: int = 1
    neighbour: bool = True  # later skills from their neighbour snapshots (module docstring); False: plain ones

    def __post_init__(self):
        if self.lead < 0:
            raise SkillkvError(f"--repair-lead must be >= 0 (got {self.lead})")
        if not 0.0 <= self.recompute <= 1.0:
            raise SkillkvError(f"--recompute must be a fraction in [0, 1] (got {self.recompute})")
        if self.select not in SELECTIONS:
            raise SkillkvError(f"unknown repair selection {self.select!r} (choose from {', '.join(SELECTIONS)})")
        if self.probe_layer < 1:
            raise SkillkvError(f"the probe layer must be >= 1 (got {self.probe_layer})")

    @property
    def label(self) -> str:
        rec = f"recompute {self.recompute:g}" + (" by deviation" if self.select == "deviation" else "")
        parts = ([f"lead {self.lead}"] if self.lead else []) + ([rec] if self.recompute else [])
        if self.recompute and self.select == "deviation" and self.probe_layer != 1:
            parts.append(f"probe layer {self.probe_layer}")
        if not self.neighbour:
            parts.insert(0, "plain")
        return "compose (" + (", ".join(parts) or "no repair") + ")"

    def to_json(self) -> dict:
        return {"lead": self.lead, "recompute": self.recompute, "select": self.select,
                "probe_layer": self.probe_layer, "neighbour": self.neighbour}

    @classmethod
    def from_json(cls, d: dict) -> "Repair":
        """Inverse of `to_json`; records written before `select` and `neighbour` existed meant deviation
        selection over plain snapshots."""
        return cls(**{"select": "deviation", "neighbour": False, **d})


@dataclass
class Composed:
    """A composed prefix: its KV, the start of every segment (preamble first), and the repaired positions."""

    kv: KV
    starts: list[int]
    recomputed: list[int]
    skill_tokens: int

    @property
    def recomputed_fraction(self) -> float:
        return len(self.recomputed) / self.skill_tokens if self.skill_tokens else 0.0


# ------------------------------------------------------------------------------------------------ repair


def _model_parts(model):
    inner = model.model
    return inner, inner.layers, inner.rotary_emb


def _layer_masks(config, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list:
    """Each layer's boolean attention mask [1, 1, m, n] (True = attend): `allowed` [m, n] (queries at positions
    `q_pos` [m], keys at `k_pos` [n]) limited to the layer's window (a key is seen if k > q - window), or None
    for a full-attention layer when `allowed` is None (plain causal)."""
    out = []
    for w in layer_windows(config):
        if w is None:
            out.append(None if allowed is None else allowed[None, None])
            continue
        inside = k_pos[None, :] > q_pos[:, None] - w
        base = allowed if allowed is not None else k_pos[None, :] <= q_pos[:, None]
        out.append((base & inside)[None, None])
    return out


def _model_mask(config, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The `attention_mask` argument of a whole-model forward: one 4D mask, or where layers of different types
    need different masks, {layer type: mask} (the form Gemma 3's model accepts)."""
    masks = _layer_masks(config, allowed, q_pos, k_pos)
    windows = layer_windows(config)
    if len(set(windows)) == 1:
        return masks[0]
    by_type = {}
    for t, m in zip(config.layer_types, masks):
        by_type.setdefault(t, m)
    return by_type


@torch.inference_mode()
def value_deviation(model, ids: list[int], kv: KV, layer: int) -> torch.Tensor:
    """Per-token relative deviation [tokens] of `kv`'s values at `layer` from those of a true causal prefill of
    `ids`, computed by running only layers 0..layer-1 (plus that layer's value projection)."""
    inner, layers, rotary = _model_parts(model)
    layer = min(layer, len(layers) - 1)
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    pos = torch.arange(len(ids), device=dev)[None]
    h = inner.embed_tokens(x)  # Gemma 3's embedding module applies its embed_scale itself
    types = rope_layer_types(model.config)
    pes = [rotary(h, pos, t) for t in types] if types else [rotary(h, pos)] * len(layers)
    masks = _layer_masks(model.config, None, pos[0], pos[0])
    for blk, pe, mask in zip(layers[:layer], pes, masks):
        h = blk(h, attention_mask=mask, position_ids=pos, use_cache=False, position_embeddings=pe)
        h = h[0] if isinstance(h, tuple) else h
    at = layers[layer].self_attn
    v = at.v_proj(layers[layer].input_layernorm(h))[0].float()
    old = kv[layer][1].reshape(len(ids), -1).to(v.device).float()
    return (v - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-6)


@torch.inference_mode()
def recompute_rows(runner, ids: list[int], kv: KV, positions: list[int]) -> KV:
    """The recomputed rows only: per layer (keys, values) [len(positions), kv_heads, head_dim] for the sorted,
    distinct `positions`, each computed given everything before it (one forward pass): a chosen token attends to
    the earlier unchosen tokens' rows of `kv` and to the recomputed rows of earlier chosen tokens (and itself), at
    its true position. `kv` is not modified; the rows have its dtype and device."""
    model, dev = runner.model, runner.device
    n, sel = len(ids), sorted(set(positions))
    p = torch.tensor(sel, dtype=torch.long, device=dev)
    chosen = torch.zeros(n, dtype=torch.bool, device=dev)
    chosen[p] = True
    cols = torch.arange(n, device=dev)
    old = (cols[None, :] < p[:, None]) & ~chosen[None, :]  # [m, n]
    new = p[None, :] <= p[:, None]  # [m, m]
    mask = _model_mask(model.config, torch.cat([old, new], 1), p, torch.cat([cols, p]))
    cache = runner.new_cache(kv)
    x = torch.tensor([[ids[i] for i in sel]], dtype=torch.long, device=dev)
    model(input_ids=x, position_ids=p[None], attention_mask=mask, use_cache=True, logits_to_keep=1,
          **{runner._cache_kw: cache})
    return [(layer.keys[0, :, n:].transpose(0, 1).to(k.dtype).to(k.device),
             layer.values[0, :, n:].transpose(0, 1).to(v.dtype).to(v.device))
            for (k, v), layer in zip(kv, cache.layers)]


@torch.inference_mode()
def recompute(runner, ids: list[int], kv: KV, positions: list[int]) -> KV:
    """`kv` with the rows at `positions` recomputed given everything before them (`recompute_rows`).
    Returns new tensors; `kv` is not modified."""
    if not positions:
        return kv
    rows = recompute_rows(runner, ids, kv, positions)
    p = torch.tensor(sorted(set(positions)), dtype=torch.long, device=kv[0][0].device)
    out = []
    for (k, v), (rk, rv) in zip(kv, rows):
        k2, v2 = k.clone(), v.clone()
        k2[p], v2[p] = rk, rv
        out.append((k2, v2))
    return out


def choose_positions(repair: Repair, starts: list[int], end: int, deviation: torch.Tensor | None) -> list[int]:
    """Positions to recompute: the first `lead` of every later skill, then tokens of later skills by
    `repair.select` until `recompute` of all skill tokens (positions starts[1]..end) are chosen: the front ones
    (rank within the skill first, then skill order), or the most deviating (`deviation` [end] is required)."""
    later = list(range(starts[2], end)) if len(starts) > 2 else []
    spans = list(zip(starts[2:], starts[3:] + [end]))
    chosen = set()
    for a, b in spans:
        chosen.update(range(a, min(b, a + repair.lead)))
    want = min(int(repair.recompute * (end - starts[1]) + 1e-9), len(later))  # never more than the fraction
    if want > len(chosen) and repair.select == "front":
        for rank in range(max((b - a for a, b in spans), default=0)):
            for a, b in spans:
                if len(chosen) >= want:
                    return sorted(chosen)
                if a + rank < b:
                    chosen.add(a + rank)
    elif want > len(chosen) and deviation is not None and later:
        rest = torch.tensor([i for i in later if i not in chosen], dtype=torch.long)
        if len(rest):
            top = torch.topk(deviation.cpu()[rest], min(want - len(chosen), len(rest))).indices
            chosen.update(rest[top].tolist())
    return sorted(chosen)


def compose(runner, snapshots: list[KV], segments: list[list[int]], repair: Repair = Repair(),
            context: list[int] | None = None) -> Composed:
    """The composed KV of `segments` = [preamble, skill 1, ..., skill k] from `snapshots`: snapshot i holds
    `context[i]` rows of context then skill i (default: the preamble, single-skill snapshots; see `place`), with
    `repair` applied (its positions and rows; which snapshots to pass is the caller's choice)."""
    check_composable(runner.model.config)
    rotary = _model_parts(runner.model)[2]
    kv, starts = place(snapshots, len(segments[0]), rotary, context, rope_layer_types(runner.model.config))
    ids = [t for seg in segments for t in seg]
    if kv[0][0].shape[0] != len(ids):
        raise SkillkvError(f"composed KV has {kv[0][0].shape[0]} rows for {len(ids)} tokens")
    positions = select_positions(runner, ids, kv, starts, repair)
    kv = recompute(runner, ids, kv, positions)
    return Composed(kv, starts, positions, len(ids) - starts[1])


def select_positions(runner, ids: list[int], kv: KV, starts: list[int], repair: Repair) -> list[int]:
    """The positions `repair` recomputes in the placed (unrepaired) KV `kv` of `ids` whose segments begin at
    `starts` (preamble first): sorted, all in later skills. Shared by every engine (the paged engine gathers its
    composed pages into `kv` for it)."""
    deviation = None
    if repair.recompute > 0 and repair.select == "deviation" and len(starts) > 2:
        deviation = value_deviation(runner.model, ids, kv, repair.probe_layer)
    return choose_positions(repair, starts, len(ids), deviation)
