"""The prefix of a request, opened in its mode: the one place that turns "these skills, this prompt, this mode" into
a sequence on the runner whose KV holds what can be reused, and says where each reused token came from.

    o = prefixes.open(skills, "auto", ids=req.ids, pieces=req.pieces)   # -> Opened(seq, mode, reason, info)
    prefixes.open_request(req)                                         # the loop's admission (sched/loop.py)

Modes: full (no cache: the pieces prefilled from scratch, cut where exact mode's snapshots are cut; the reference),
compose (skills placed from their own snapshots, boundary tokens repaired: compose/stage.py), exact (the skills'
chain as an exact prefix: resident, paged in from the host tier or the store, or computed and stored; and, for a
whole prompt on a chunk-invariant runner, the prefix cache: full pages of earlier prompts and answers, whichever
covers more), auto (exact, or compose where the model's measured fidelity meets the bar: compose/stage.py; on a
runner whose prefix cache is not exact, e.g. FlashInfer / FA3 attention on a GPU, auto also reuses the cache and
says so: mode "cached"). Exact equals full token for token: it reads only KV the runner computes with the same
bits in any chunking.

`kv` is the SkillKV (duck-typed: runner, compiler, builder, residency, composer, warm_pins, is_resident).
"""

from __future__ import annotations

from dataclasses import dataclass

from skillkv.compose.repair import Repair
from skillkv.compose.stage import MODES
from skillkv.errors import SkillkvError, SnapshotError
from skillkv.runners.base import Seq
from skillkv.skills import Skill


@dataclass
class Opened:
    """A sequence over the prefix of `skills`, ready for the rest of the prompt: the mode used and why, the repair
    (compose) and info (cached / computed tokens, snapshot_load seconds, per-skill tiers, compose's recomputed
    positions; with a whole prompt also prefix_cache / skill_kv tokens)."""

    seq: Seq
    skills: list[Skill]
    mode: str
    reason: str
    repair: Repair | None
    info: dict


class Prefixes:
    def __init__(self, kv):
        self.kv = kv

    def open(self, skills: list[Skill], mode: str = "auto", repair: Repair | None = None, settle: bool = False,
             ids: list[int] | None = None, pieces: list[list[int]] | None = None) -> Opened:
        """A sequence over the prefix of `skills` in this order (preamble only with none), in `mode` (module
        docstring). The caller prefills the rest, decodes and releases `opened.seq` on the runner. Stored pieces
        may still be arriving (the prefill waits per layer, and raises SnapshotError for a damaged one); with
        `settle` they have arrived, a damaged one already replaced by a recomputed prefix. With `ids` (a whole
        prompt that starts with `pieces`: a request), exact mode also reuses the runner's prefix cache."""
        kv = self.kv
        if mode not in MODES:
            raise SkillkvError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        ready = kv.is_resident(skills) or kv.compiler.stored(skills)  # the exact chain: resident or stored
        asked = mode
        mode, repair, reason = kv.composer.choose(mode, skills, ready, repair)
        kv.warm_pins()
        runner = kv.runner
        if pieces is None:
            pieces = [p for _, p in kv.compiler.pieces(skills)] if skills else [kv.builder.preamble_ids()]
        approx = asked == "auto" and runner.prefix_cache and not runner.cache_exact
        use_cache = ids is not None and (runner.cache_exact or approx)
        if mode == "full" or (not skills and not use_cache):
            seq = runner.open(None)
            for p in pieces:  # from scratch, cut where exact mode's pieces are cut
                runner.prefill([seq], [p])
            return Opened(seq, skills, mode, reason, None, {"cached": 0, "computed": seq.length,
                                                            "snapshot_load": 0.0, "tiers": ["computed"] * len(skills)})
        if mode == "compose":
            seq, info = kv.composer.open(skills, repair)
            return Opened(seq, skills, mode, reason, repair, info)
        if ids is None:
            seq, info = kv.residency.open(skills, settle)
            return Opened(seq, skills, mode, reason, None, info)
        seq, info = self._open_cached(skills, ids, sum(map(len, pieces)), settle, use_cache)
        if approx and info["prefix_cache"]:
            mode, reason = "cached", (f"auto: {info['prefix_cache']:,} tokens from the prefix cache, KV computed in "
                                      f"other steps: not bit-identical to a full prefill here ({runner.cache_note})")
        return Opened(seq, skills, mode, reason, None, info)

    def _open_cached(self, skills: list[Skill], ids: list[int], n: int, settle: bool,
                     reuse: bool) -> tuple[Seq, dict]:
        """Over the prefix cache (where `reuse`), or over the skills' chain made resident where the cache holds
        less of it (`n` tokens)."""
        kv = self.kv
        runner, key = kv.runner, None
        info = {"cached": 0, "snapshot_load": 0.0, "tiers": ["l1"] * len(skills)}
        for attempt in (0, 1):
            if skills and (not reuse or runner.cached_tokens(ids) < n):
                key, info = kv.compiler.keys(skills)[-1], kv.residency.make_resident(skills, settle=settle)
            try:
                seq, got = runner.open_cached(ids, key, n, reuse)
                break
            except SnapshotError as e:  # its page-in failed already: never served, recomputed
                if attempt:
                    raise
                kv.residency.damaged(e, skills)
        skill_kv = info["cached"] if key is not None else 0
        return seq, {**info, "prefix_cache": got["prefix_cache"], "skill_kv": skill_kv,
                     "cached": got["prefix_cache"] + skill_kv}

    def open_request(self, req) -> None:
        """The loop's admission (sched/loop.py): open `req`'s prefix, say where its reused tokens came from, and
        set what is left to compute (`req.pending`)."""
        o = self.open(req.skills, req.asked, req.repair, settle=True, ids=req.ids, pieces=req.pieces)
        req.seq, req.mode, req.reason, req.repair = o.seq, o.mode, o.reason, o.repair
        req.reused = {"prefix_cache": o.info.get("prefix_cache", 0),
                      "skill_kv": o.info.get("skill_kv", o.info["cached"])}
        req.tiers, req.snapshot_load, req.compose = o.info["tiers"], o.info["snapshot_load"], o.info
        req.pending = req.ids[o.seq.length:]
