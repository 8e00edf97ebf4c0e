"""The compose stage: auto mode's choice, and composed sequences on any runner.

    stage = ComposeStage(runner=lambda: kv.runner, chain_kv=..., piece_ids=..., chain_keys=..., record=...)
    mode, repair, reason = stage.choose("auto", skills, stored=compiler.stored(skills))
    seq, info = stage.open(skills, repair)       # placed snapshots, repaired; the caller prefills the question

Placement: the first skill from its single-skill snapshot, every later one from its neighbour snapshot
(skillkv.compose.repair, "Neighbour snapshots"), each loaded through `chain_kv` (stored by `skillkv compile`;
computed and stored on first use otherwise) unless the runner already holds what it needs. The runner places the
rows (Runner.open_composed) and recomputes the repaired ones (Runner.recompute); this module only decides which:
`select_positions` (front tokens, lead tokens, or CacheBlend's deviation probe over the placed rows).

auto (`choose`): exact when there is at most one skill or the ordered combination is stored; otherwise compose,
but only if a measurement of this model meets the bar in skillkv.compose.fidelity (the store's own record for the
exact fingerprint, else the one shipped for the model's weights), with the cheapest passing repair setting; else
exact (the combination is computed once and stored).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable

from skillkv.compose import fidelity
from skillkv.compose.neighbour import NEIGHBOUR
from skillkv.compose.repair import Repair, needs_probe, select_positions
from skillkv.engine.rope import check_composable
from skillkv.runners.base import KV, Part, Runner, Seq
from skillkv.skills import Skill

MODES = ("auto", "exact", "full", "compose")
# --mode compose without --repair-lead/--recompute and without a passing measurement: the most faithful setting
# within the 15% recompute budget in docs/EVAL.md (default model: 15% front tokens over neighbour snapshots, top-1
# 0.982 / 0.988 in the two skill orders, vs 0.957 / 0.963 for CacheBlend's deviation selection over plain ones)
DEFAULT_REPAIR = Repair(recompute=0.15)


class ComposeStage:
    """`runner()` the runner; `chain_kv(skills)` the exact KV of a chain (loaded or computed and stored) with its
    info; `chain_keys(skills)` and `piece_ids(skills, i)` as the compile stage defines them; `record()` the
    fidelity record auto follows (or None)."""

    def __init__(self, runner: Callable[[], Runner], chain_kv: Callable[[list[Skill]], tuple[KV, dict]],
                 chain_keys: Callable[[list[Skill]], list[str]], piece_ids: Callable[[list[Skill], int], list[int]],
                 preamble_ids: Callable[[], list[int]], skill_ids: Callable[[Skill], list[int]],
                 record: Callable[[], dict | None]):
        self.runner, self.chain_kv, self.chain_keys, self.piece_ids = runner, chain_kv, chain_keys, piece_ids
        self.preamble_ids, self.skill_ids, self.record = preamble_ids, skill_ids, record

    # ------------------------------------------------------------------ choosing

    def best(self) -> Repair | None:
        """The measured passing setting that recomputes least, or None."""
        return fidelity.best_setting(self.record())

    def default_repair(self) -> Repair:
        """The repair of an explicit --mode compose without settings: the measured best, else DEFAULT_REPAIR."""
        return self.best() or DEFAULT_REPAIR

    def uses_neighbours(self) -> bool:
        """Whether auto mode composes this model from neighbour snapshots (then `skillkv compile` makes them)."""
        best = self.best()
        return best is not None and best.neighbour

    def choose(self, mode: str, skills: list[Skill], stored: bool,
               repair: Repair | None = None) -> tuple[str, Repair | None, str]:
        """(mode actually used, repair, why) for `mode` over `skills` in this order; `stored`: whether the exact
        chain of this combination is stored or resident."""
        if mode == "compose" and len(skills) <= 1:
            return "exact", None, "compose of one skill is its exact snapshot"
        if mode == "compose":
            return "compose", repair or self.default_repair(), "requested"
        if mode != "auto":
            return mode, None, "requested"
        if len(skills) <= 1:
            return "exact", None, "one skill" if skills else "no skills"
        if stored:
            return "exact", None, "combination stored"
        best = self.best()
        if best is None:
            return "exact", None, "compose fidelity not measured for this model or below the bar"
        return "compose", repair or best, "measured compose fidelity meets the bar"

    # ------------------------------------------------------------------ composing

    def sources(self, skills: list[Skill], repair: Repair) -> list[tuple[list[Skill], int]]:
        """(chain, context rows) each skill is placed from: the first from its single-skill snapshot, later ones
        from their neighbour snapshots (chain [NEIGHBOUR, skill], its last piece) when `repair.neighbour`."""
        pre = len(self.preamble_ids())
        nb = pre + len(self.skill_ids(NEIGHBOUR))
        return [([s], pre) if i == 0 or not repair.neighbour else ([NEIGHBOUR, s], nb) for i, s in enumerate(skills)]

    def open(self, skills: list[Skill], repair: Repair) -> tuple[Seq, dict]:
        """A sequence over the composed, repaired prefix of `skills` (2 or more) in this order, and its info:
        cached / computed token counts (computed = pieces compiled now + recomputed rows), snapshot_load seconds,
        per skill where its KV came from, the recomputed positions and the skill token count."""
        runner = self.runner()
        check_composable(runner.model.config)
        segs = [self.preamble_ids()] + [self.skill_ids(s) for s in skills]
        loaded: dict[str, dict] = {}

        def load(name: str, chain: list[Skill]) -> Callable[[], KV]:
            def go() -> KV:
                kv, loaded[name] = self.chain_kv(chain)
                return kv
            return go
        parts = [Part(self.chain_keys(chain)[-1], ctx + len(seg), ctx, load(s.name, chain))
                 for s, seg, (chain, ctx) in zip(skills, segs[1:], self.sources(skills, repair))]
        seq = runner.open_composed(parts, len(segs[0]))
        try:
            ids = [t for seg in segs for t in seg]
            starts = [0] + list(accumulate(len(seg) for seg in segs[:-1]))
            kv = runner.read(seq, 0, len(ids)) if needs_probe(repair, starts) else None
            positions = select_positions(runner.model, ids, kv, starts, repair)
            runner.recompute(seq, ids, positions)
        except BaseException:
            runner.release(seq)
            raise
        tiers = [loaded[s.name]["tiers"][-1] if s.name in loaded else "l1" for s in skills]
        total = len(ids)
        computed = sum(len(seg) for seg, t in zip(segs[1:], tiers) if t == "computed")
        computed += len(segs[0]) if tiers[0] == "computed" else 0
        computed = min(total, computed + len(positions))
        return seq, {"cached": total - computed, "computed": computed, "tiers": tiers, "recomputed": positions,
                     "snapshot_load": sum(i["snapshot_load"] for i in loaded.values()),
                     "skill_tokens": total - len(segs[0])}

    @staticmethod
    def summary(repair: Repair, info: dict) -> dict:
        """What an answer reports of a composed prefix (`Answer.compose`): the repair, the recomputed tokens and
        their fraction of the skill tokens."""
        rec, total = len(info["recomputed"]), info["skill_tokens"]
        return {"repair": repair.to_json(), "recomputed": rec,
                "recomputed_fraction": round(rec / total, 4) if total else 0.0}
