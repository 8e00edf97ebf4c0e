"""Composition: the KV of any set of compiled skills, in any order, without compiling the combination.

Every skill is compiled as [preamble][skill] at positions 0..n (its single-skill snapshot), so every skill has
seen the same shared preamble. For skills s1..sk in this order the composed KV is

    [preamble][s1]            rows 0..n1 of s1's snapshot, as stored (exact)
    [s2] [s3] ... [sk]        each skill's snapshot rows after the preamble, keys re-rotated by the position
                              delta (new start - compiled start), values as stored (values carry no position)

Re-rotation is exact RoPE arithmetic (engine/rope.py: which RoPE types allow it, one table per layer type for
Gemma 3); each runner places the rows its own way (Runner.open_composed: contiguous on hf, pool pages on paged), bit
for bit the same rows. Sliding-window layers need nothing else from placement: the hf runner's caches keep every
token at every layer, so a snapshot holds every row, and the model's window mask, built from positions, decides
what a query sees; the repair passes apply each layer's window themselves (runners/hf_masks.py).

Neighbour snapshots (the default). A later skill's single-skill snapshot was computed with the preamble as its only
context: its first tokens form their own attention sink and nothing in it has ever had a skill before it. Compose
therefore places later skills from a second snapshot, compiled once per skill after the preamble and a fixed
stand-in skill (`NEIGHBOUR`, ~450 tokens): [preamble][neighbour][skill], its skill rows
re-rotated from their compiled start (preamble + neighbour) like any other. It is the chain piece of [neighbour,
skill] in the store (made by `skillkv compile` where compose may be used, else on first use; verified and
collected like every snapshot). The first skill still
comes from its exact single-skill snapshot. On the evaluation (docs/EVAL.md, labelled / reversed skill order) it
cuts the first-token KL to full prefill about 4x (no repair 0.025 / 0.028 -> 0.007 / 0.009; 15% front tokens
0.011 / 0.011 -> 0.003 / 0.002) and lifts top-1 agreement (no repair 0.943 / 0.960 -> 0.965 / 0.973; 15% front
0.975 / 0.973 -> 0.982 / 0.988, the setting that meets the bar).

What re-rotation cannot fix: a later skill's tokens never attended to the skills placed before them. `Repair`
recomputes chosen tokens given the real preceding context, in one pass over the composed prefix
(Runner.recompute):
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

from skillkv.engine.rope import check_composable, place, rope_layer_types
from skillkv.errors import SkillkvError
from skillkv.lazy import inference_mode, torch
from skillkv.runners.hf_masks import layer_masks, recompute_rows

KV = list  # list[tuple[torch.Tensor, torch.Tensor]]

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


@inference_mode
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
    masks = layer_masks(model.config, None, pos[0], pos[0])
    for blk, pe, mask in zip(layers[:layer], pes, masks):
        h = blk(h, attention_mask=mask, position_ids=pos, use_cache=False, position_embeddings=pe)
        h = h[0] if isinstance(h, tuple) else h
    at = layers[layer].self_attn
    v = at.v_proj(layers[layer].input_layernorm(h))[0].float()
    old = kv[layer][1].reshape(len(ids), -1).to(v.device).float()
    return (v - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-6)


@inference_mode
def recompute(model, ids: list[int], kv: KV, positions: list[int]) -> KV:
    """`kv` (contiguous, the prefix of `ids`) with the rows at `positions` recomputed given everything before them
    (runners/hf_masks.recompute_rows, on the transformers `model`). Returns new tensors; `kv` is not modified."""
    if not positions:
        return kv
    from skillkv.runners.hf import HFRunner

    runner = HFRunner(model)
    rows = recompute_rows(model, runner.cache_of(kv), len(ids), ids, positions, runner.cache_kw)
    p = torch.tensor(sorted(set(positions)), dtype=torch.long, device=kv[0][0].device)
    out = []
    for (k, v), (rk, rv) in zip(kv, rows):
        k2, v2 = k.clone(), v.clone()
        k2[p], v2[p] = rk.to(k.device, k.dtype), rv.to(v.device, v.dtype)
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


def compose(model, snapshots: list[KV], segments: list[list[int]], repair: Repair = Repair(),
            context: list[int] | None = None) -> Composed:
    """The composed KV of `segments` = [preamble, skill 1, ..., skill k] from `snapshots` as one contiguous KV, on
    the transformers `model` (the reference the runners' composed sequences are tested against): snapshot i holds
    `context[i]` rows of context then skill i (default: the preamble, single-skill snapshots; see
    engine.rope.place), with `repair` applied."""
    check_composable(model.config)
    rotary = _model_parts(model)[2]
    kv, starts = place(snapshots, len(segments[0]), rotary, context, rope_layer_types(model.config))
    ids = [t for seg in segments for t in seg]
    if kv[0][0].shape[0] != len(ids):
        raise SkillkvError(f"composed KV has {kv[0][0].shape[0]} rows for {len(ids)} tokens")
    positions = select_positions(model, ids, kv, starts, repair)
    kv = recompute(model, ids, kv, positions)
    return Composed(kv, starts, positions, len(ids) - starts[1])


def select_positions(model, ids: list[int], kv: KV | None, starts: list[int], repair: Repair) -> list[int]:
    """The positions `repair` recomputes in the placed (unrepaired) KV `kv` of `ids` whose segments begin at
    `starts` (preamble first): sorted, all in later skills. Only deviation selection reads `kv` (and probes the
    transformers `model`); front selection and lead need neither (pass None)."""
    deviation = None
    if needs_probe(repair, starts):
        deviation = value_deviation(model, ids, kv, repair.probe_layer)
    return choose_positions(repair, starts, len(ids), deviation)


def needs_probe(repair: Repair, starts: list[int]) -> bool:
    """Whether `select_positions` reads the placed KV (deviation selection over 2+ skills)."""
    return repair.recompute > 0 and repair.select == "deviation" and len(starts) > 2
