"""The Python API that the CLI is a thin layer over.

    kv = SkillKV(model="default", store="cache_store", skills="skills")
    kv.compile()                                   # one snapshot per skill, incremental
    ans = kv.ask("How big is a KV page?")          # picks skills, reuses their KV, prefills only the question
    print(ans.answer, ans.tokens)

Modes
  exact  the skills' KV is reused as an exact prefix; only uncached tokens (the question, and any skill segment
         whose snapshot is missing or stale) are prefilled. The KV of an ordered combination of several skills is
         stored as a chain of segment snapshots (skill i's KV given skills 0..i-1), computed once and reused.
  full   no cache at all: the same token ids prefilled from scratch. The reference exact mode must equal.
  compose  approximate: the skills' single-skill snapshots placed one after another, keys re-rotated to their new
         positions, boundary tokens repaired (skillkv.compose.repair). No combination is compiled or stored. On the paged
         engine the placed skills stay resident in the pool, one entry per (skill, start position), shared by every
         combination that places the skill there; a request copies only the pages where two skills meet and the
         pages holding repaired rows (engine/compose_paged.py).
  auto   (the default) exact when there is at most one skill or the ordered combination is already stored;
         otherwise compose, but only if `skillkv eval` measured this very model (fingerprint) meeting the bar in
         skillkv.compose.fidelity (top-1 agreement >= 0.98 and >= 98% of full's fact accuracy with <= 15% of skill
         tokens recomputed), with the cheapest passing repair setting; otherwise exact (computing and storing
         the combination). `Answer.mode` is the mode actually used, `Answer.mode_reason` says why.

Engines
  hf     transformers over a DynamicCache (the default on the CPU).
  paged  the paged KV pool with FlashInfer, CUDA graphs and fused kernels (engine/, the default on CUDA for the
         Llama family). Skill prefixes stay resident in the pool (L1) between questions of one process; `pin`
         keeps named skills resident. Full mode prefills from scratch in the same segments that exact mode caches,
         so the two agree bit for bit in any dtype. Snapshots are per engine (its name is in the fingerprint).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from skillkv import config as cfg
from skillkv.compose import fidelity
from skillkv.compose.neighbour import NEIGHBOUR
from skillkv.compose.repair import Repair, compose
from skillkv.generate import SamplingParams, decode_loop
from skillkv.runners.hf import KV, HFRunner
from skillkv.errors import PromptTooLong, SkillError, SkillkvError, SnapshotError
from skillkv.model import ModelHandle, layer_windows, resolve_model
from skillkv.prompt import PromptBuilder
from skillkv.select import choose_skills
from skillkv.skills import LoadResult, Skill, load_skills
from skillkv.snapshot import COMPRESSIONS, Snapshot
from skillkv.store import Store, snapshot_key

MODES = ("auto", "exact", "full", "compose")
# --mode compose without --repair-lead/--recompute and without a passing measurement: the most faithful setting
# within the 15% recompute budget in docs/EVAL.md (default model: 15% front tokens over neighbour snapshots, top-1
# 0.982 / 0.988 in the two skill orders, vs 0.957 / 0.963 for CacheBlend's deviation selection over plain ones)
DEFAULT_REPAIR = Repair(recompute=0.15)
ENGINES = ("auto", "hf", "paged")


def resolve_engine(name: str, handle: ModelHandle) -> str:
    """`auto`: paged on CUDA for the Llama family without sliding-window layers, hf otherwise; an explicit
    `paged` for a model it cannot run is a SkillkvError."""
    from skillkv.engine.llama import SUPPORTED

    if name not in ENGINES:
        raise SkillkvError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    model_type = getattr(handle.hf_config, "model_type", None)
    sliding = any(layer_windows(handle.hf_config))
    if name == "paged" and model_type not in SUPPORTED:
        raise SkillkvError(f"the paged engine supports {', '.join(sorted(SUPPORTED))}, not {model_type}")
    if name == "paged" and sliding:
        raise SkillkvError(f"the paged engine does not support sliding-window attention ({model_type}); "
                           "use --engine hf")
    if name == "auto":  # FlashInfer's prefill kernels are built for head dims 64, 128 and 256
        cfg = handle.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cuda = handle.device.startswith("cuda")
        return "paged" if cuda and model_type in SUPPORTED and not sliding and head_dim in (64, 128, 256) else "hf"
    return name


@dataclass
class CompileResult:
    skill: str
    status: str  # compiled | recompiled | up to date | skipped
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class Answer:
    question: str
    answer: str
    output_token_ids: list[int]
    skills: list[str]
    mode: str
    tokens: dict  # prompt, cached, computed
    timings_ms: dict  # model_load, snapshot_load, ttft, total
    model: str
    finish_reason: str = "stop"
    tiers: list = field(default_factory=list)  # per skill: memory | l2 | computed (where its KV came from)
    mode_reason: str = ""  # why this mode was used (auto mode's choice, or "requested")
    compose: dict | None = None  # compose mode: repair setting, recomputed tokens and fraction

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SkillState:
    skill: Skill
    state: str  # current | stale | missing
    tokens: int = 0
    bytes: int = 0


def _cat(pieces: list[KV], device: torch.device) -> KV:
    """One KV from consecutive pieces, on `device` (loaded snapshots are host views, computed pieces are on the
    model's device)."""
    if len(pieces) == 1:
        return pieces[0]
    return [(torch.cat([p[i][0].to(device) for p in pieces], 0), torch.cat([p[i][1].to(device) for p in pieces], 0))
            for i in range(len(pieces[0]))]


def _compose_info(segs: list[list[int]], tiers: list[str], recomputed: list[int], snapshot_load: float) -> dict:
    """`info` of a composed prefix of `segs` (preamble, skills), where skill i's KV came from `tiers[i]`:
    computed = the skills compiled just now (and the preamble with a first skill compiled now) plus the repaired
    rows, counted once; cached = the rest."""
    total = sum(map(len, segs))
    computed = sum(len(seg) for seg, t in zip(segs[1:], tiers) if t == "computed")
    computed += len(segs[0]) if tiers[0] == "computed" else 0
    computed = min(total, computed + len(recomputed))
    return {"cached": total - computed, "computed": computed, "snapshot_load": snapshot_load, "tiers": tiers,
            "recomputed": recomputed, "skill_tokens": total - len(segs[0])}


def _stderr_warning(msg: str) -> None:
    print(f"skillkv: warning: {msg}", file=sys.stderr)


@dataclass
class SkillKV:
    """One model, one store, one skills folder. Loads the model weights on first use."""

    model: str | None = None
    store: str | Path | None = None
    skills: str | Path | None = None
    device: str | None = None
    on_warning: Callable[[str], None] = _stderr_warning
    engine: str = "auto"  # auto | hf | paged
    kv_budget: int | None = None  # bytes of the paged engine's KV pool (default: half the free device memory)
    pin: list[str] = field(default_factory=list)  # skills kept resident in the paged engine's pool
    host_budget: int | None = None  # bytes of the paged engine's host tier (pinned memory; default 4 GiB)
    handle: ModelHandle = field(init=False)

    def __post_init__(self):
        self.handle = resolve_model(self.model, self.device)
        self.engine = resolve_engine(self.engine, self.handle)
        self.fingerprint = self.handle.fingerprint
        if self.engine != "hf":  # another engine computes other roundings: its snapshots are its own
            self.fingerprint = hashlib.sha256(f"{self.fingerprint}|engine={self.engine}".encode()).hexdigest()
        self.tag = f"{self.handle.name}-{self.fingerprint[:16]}"
        self.store_root = Path(self.store or cfg.default_store())
        self.snapshots = Store(self.store_root, self.tag, self.fingerprint)
        self.skills_dir = Path(self.skills or cfg.default_skills())
        self.builder = PromptBuilder(self.handle.tokenizer)
        self._skills: LoadResult | None = None
        self._runner = None  # HFRunner | PagedRunner
        self._memo: dict[str, KV] = {}  # chain key -> concatenated prefix KV (one process, e.g. --batch)
        self._hf_repair = None  # HFRunner over the paged engine's model: compose repair runs on transformers
        self._model_load_pending = True
        self._stats = None  # skillkv.stats.StatsDB, opened on the first recorded ask

    # ------------------------------------------------------------------ parts

    @property
    def runner(self):
        """HFRunner or PagedRunner (same calls: new_cache, forward, slice_kv, release, resident)."""
        if self._runner is None:
            if self.engine == "paged":
                from skillkv.runners.paged import PagedRunner

                self._runner = PagedRunner(self.handle.load(), self.kv_budget, store=self.snapshots,
                                           host_budget=self.host_budget)
            else:
                self._runner = HFRunner(self.handle.load())
        return self._runner

    def load_skills(self) -> LoadResult:
        if self._skills is None:
            self._skills = load_skills(self.skills_dir)
            for w in self._skills.warnings:
                self.on_warning(w)
        return self._skills

    def piece_ids(self, skills: list[Skill], i: int) -> list[int]:
        """Token ids of chain piece i: the preamble plus the first skill, then one skill per piece."""
        ids = self.builder.skill_ids(skills[i])
        return self.builder.preamble_ids() + ids if i == 0 else ids

    def chain_keys(self, skills: list[Skill]) -> list[str]:
        keys, parent = [], ""
        for s in skills:
            parent = snapshot_key(self.fingerprint, parent, s.content_hash)
            keys.append(parent)
        return keys

    def _load_piece(self, key: str, expect: list[int]) -> Snapshot | None:
        """A verified snapshot, or None if it must be computed (missing, or bad: warned and removed)."""
        if not self.snapshots.contains(key):
            return None
        try:
            return self.snapshots.get(key, token_ids=expect)
        except SnapshotError as e:
            self.on_warning(f"{e}; recompiling")
            self.snapshots.remove([key])
            return None

    def prefix(self, skills: list[Skill], compression: str = "none") -> tuple[KV, dict]:
        """The exact KV of preamble + `skills` in this order, loading stored pieces and computing (and storing)
        missing ones. Returns (kv, info) with info = cached/computed token counts and snapshot_load seconds."""
        info = {"cached": 0, "computed": 0, "snapshot_load": 0.0, "tiers": []}
        keys = self.chain_keys(skills)
        if keys and keys[-1] in self._memo:
            info["tiers"] = ["memory"] * len(skills)
            info["cached"] = sum(len(self.piece_ids(skills, i)) for i in range(len(skills)))
            return self._memo[keys[-1]], info
        pieces: list[KV] = []
        start = 0
        for i, (skill, key) in enumerate(zip(skills, keys)):
            ids = self.piece_ids(skills, i)
            t0 = time.perf_counter()
            snap = self._load_piece(key, ids)
            info["snapshot_load"] += time.perf_counter() - t0
            if snap is not None:
                pieces.append(list(zip(snap.keys, snap.values)))
                info["cached"] += len(ids)
                info["tiers"].append("l2")
            else:
                cache = self.runner.new_cache(_cat(pieces, self.runner.device) if pieces else None, key=keys[i - 1] if i else None)
                self.runner.forward(ids, cache)
                kv = self.runner.slice_kv(cache, start, start + len(ids))
                self.runner.release(cache)
                self.snapshots.put(Snapshot(keys=[k for k, _ in kv], values=[v for _, v in kv], token_ids=ids,
                                            fingerprint=self.fingerprint, key=key, skill=skill.name,
                                            content_hash=skill.content_hash, start=start,
                                            parent=keys[i - 1] if i else ""), compression)
                pieces.append(kv)
                info["computed"] += len(ids)
                info["tiers"].append("computed")
            start += len(ids)
        kv = _cat(pieces, self.runner.device) if pieces else []
        if keys and self.engine == "hf":  # the paged engine keeps prefixes resident in its pool instead
            self._memo[keys[-1]] = kv
        return kv, info

    def compose_sources(self, skills: list[Skill], repair: Repair) -> list[tuple[list[Skill], int]]:
        """Where compose places each of `skills` from: (chain, context rows) per skill. The first skill comes from
        its single-skill snapshot; later ones from their neighbour snapshots (chain [NEIGHBOUR, skill], its last
        piece) when `repair.neighbour`, else from their single-skill snapshots (skillkv.compose.repair)."""
        pre = len(self.builder.preamble_ids())
        nb = pre + len(self.builder.skill_ids(NEIGHBOUR))
        return [([s], pre) if i == 0 or not repair.neighbour else ([NEIGHBOUR, s], nb) for i, s in enumerate(skills)]

    def composed(self, skills: list[Skill], repair: Repair, compression: str = "none") -> tuple[KV, dict]:
        """Compose mode's prefix KV for `skills` in this order from their single-skill or neighbour snapshots
        (`compose_sources`; loaded, or compiled and stored through `prefix`), see skillkv.compose. Nothing about
        the combination is stored. Returns (kv, info) like `prefix`, plus info["recomputed"] (positions) and
        info["skill_tokens"]."""
        snaps, tiers, load_s = [], [], 0.0
        segs = [self.builder.preamble_ids()] + [self.builder.skill_ids(s) for s in skills]
        sources = self.compose_sources(skills, repair)
        for chain, _ in sources:
            kv, i = self.prefix(chain, compression)
            snaps.append(kv)
            load_s += i["snapshot_load"]
            tiers.append(i["tiers"][-1])
        # placement and repair run on transformers (a masked forward over the composed cache), on any engine
        hf = self.runner if self.engine == "hf" else HFRunner(self.handle.load())
        c = compose(hf, snaps, segs, repair, [ctx for _, ctx in sources])
        return c.kv, _compose_info(segs, tiers, c.recomputed, load_s)

    def chain_stored(self, skills: list[Skill]) -> bool:
        """Whether the exact KV of this ordered combination is in memory or in the store (no loading)."""
        keys = self.chain_keys(skills)
        return bool(keys) and (keys[-1] in self._memo or all(self.snapshots.contains(k) for k in keys))

    def choose_mode(self, skills: list[Skill]) -> tuple[str, Repair | None, str]:
        """auto mode's choice for `skills` in this order: (mode, repair, reason); see the module docstring."""
        if len(skills) <= 1:
            return "exact", None, "one skill" if skills else "no skills"
        if self.chain_stored(skills):
            return "exact", None, "combination stored"
        best = fidelity.best_setting(self.fidelity_record())
        if best is None:
            return "exact", None, "compose fidelity not measured for this model or below the bar"
        return "compose", best, "measured compose fidelity meets the bar"

    def default_repair(self) -> Repair:
        """The repair used by an explicit --mode compose without settings: the measured best passing one for this
        model, else DEFAULT_REPAIR."""
        return fidelity.best_setting(self.fidelity_record()) or DEFAULT_REPAIR

    def fidelity_record(self) -> dict | None:
        """The compose measurement `auto` follows: this store's for the exact fingerprint, else the one shipped
        with skillkv for the model's weights (skillkv.compose.fidelity)."""
        return fidelity.for_model(self.snapshots.dir, self.fingerprint, self.handle.weights_id)

    # ------------------------------------------------------------------ commands

    def compile(self, names: list[str] | None = None, compression: str = "none", force: bool = False,
                on_result: Callable[[CompileResult], None] | None = None) -> list[CompileResult]:
        """Compile one snapshot per skill (skipping current ones unless `force`)."""
        if compression not in COMPRESSIONS:
            raise SkillkvError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
        loaded = self.load_skills()
        self.snapshots.ensure_writable()
        results = [CompileResult(skill=Path(p.split("SKILL.md")[0]).name, status="skipped", reason=p)
                   for p in loaded.problems]
        for r in results:
            on_result and on_result(r)
        todo = loaded.skills if names is None else self.pick(names)
        for skill in todo:
            key = self.chain_keys([skill])[0]
            ids = self.piece_ids([skill], 0)
            t0 = time.perf_counter()
            existed = self.snapshots.contains(key)
            if not force and existed and self.snapshots.header_matches(key, skill.content_hash, len(ids)):
                e = self.snapshots.entries()[key]
                r = CompileResult(skill.name, "up to date", e.tokens, e.bytes, time.perf_counter() - t0)
            else:
                self.check_fits(len(ids), 1)
                self._memo.pop(key, None)
                if force and existed:
                    self.snapshots.remove([key])
                stale = not existed and self._has_old_snapshot(skill.name)
                self.prefix([skill], compression)
                e = self.snapshots.entries()[key]
                status = "recompiled" if (existed or stale) else "compiled"
                r = CompileResult(skill.name, status, e.tokens, e.bytes, time.perf_counter() - t0)
            results.append(r)
            on_result and on_result(r)
        return results

    def pick(self, names: list[str]) -> list[Skill]:
        """Skills by name, in the given order; SkillError naming the unknown ones."""
        by_name = self.load_skills().by_name()
        unknown = [n for n in names if n not in by_name]
        if unknown:
            known = ", ".join(sorted(by_name)) or "none"
            raise SkillError(f"unknown skill {', '.join(map(repr, unknown))} (known: {known})")
        return [by_name[n] for n in dict.fromkeys(names)]

    def select(self, question: str, names: list[str] | None = None) -> list[Skill]:
        if names:
            return self.pick(names)
        return choose_skills(question, self.load_skills().skills)

    def check_fits(self, prompt_tokens: int, answer_tokens: int, question_tokens: int | None = None) -> None:
        limit = self.handle.max_context
        if prompt_tokens + answer_tokens > limit:
            parts = (f"skills {prompt_tokens - question_tokens} + question {question_tokens}"
                     if question_tokens is not None else f"{prompt_tokens}")
            raise PromptTooLong(f"prompt of {prompt_tokens} tokens ({parts}) plus {answer_tokens} answer tokens "
                                f"exceeds the model's context of {limit} tokens")

    def ask(self, question: str, skills: list[str] | None = None, mode: str = "auto",
            params: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
            compression: str = "none", repair: Repair | None = None) -> Answer:
        """Answer one question. `skills` names them explicitly; otherwise they are chosen from the question.
        `mode`: auto | exact | full | compose (module docstring); `repair` applies to compose."""
        params = params or SamplingParams()
        if not question or not question.strip():
            raise SkillkvError("the question is empty")
        if mode not in MODES:
            raise SkillkvError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        t_start = time.perf_counter()
        chosen = self.select(question, skills)
        reason = "requested"
        if mode == "auto":
            mode, auto_repair, reason = self.choose_mode(chosen)
            repair = repair or auto_repair
        elif mode == "compose" and len(chosen) <= 1:
            mode, reason = "exact", "compose of one skill is its exact snapshot"
        if self.engine == "paged" and mode == "exact" and chosen:  # start reading the snapshots now
            self.runner.prefetch([(k, self.piece_ids(chosen, i)) for i, k in enumerate(self.chain_keys(chosen))
                                  if self.snapshots.contains(k)])
        layout = self.builder.layout(chosen, question)
        q_ids = layout.segments[-1]
        self.check_fits(len(layout.ids), 1, len(q_ids))
        runner = self.runner
        model_load = self.handle.load_seconds if self._model_load_pending else 0.0
        self._model_load_pending = False
        t0 = time.perf_counter()
        if mode == "full":
            cache = runner.new_cache()
            if self.engine == "paged":  # from scratch, cut where exact mode's pieces are cut
                for i in range(len(chosen)):
                    runner.forward(self.piece_ids(chosen, i), cache)
                logits = runner.forward(q_ids if chosen else layout.ids, cache)
            else:
                logits = runner.forward(layout.ids, cache)
            info = {"cached": 0, "computed": len(layout.ids), "snapshot_load": 0.0}
        else:
            self._warm_pins()
            logits = None
            if chosen and self.engine == "paged" and mode == "compose":  # placed entries in the pool
                repair = repair or self.default_repair()
                cache, info = self._paged_composed(chosen, repair, compression)
                try:
                    logits = runner.forward(q_ids, cache)
                except BaseException:
                    runner.release(cache)
                    raise
            if chosen and self.engine == "paged" and mode == "exact":  # L1, or stored pieces paged in
                cache, info = self._paged_prefix(chosen)
                if cache is not None:
                    try:
                        logits = runner.forward(q_ids, cache)
                    except SnapshotError as e:  # a piece found damaged while it streamed in: never served
                        runner.release(cache)
                        self.on_warning(f"{e}; recompiling")
                        self.snapshots.remove(self.chain_keys(chosen))
            if logits is None:
                key = self.chain_keys(chosen)[-1] if chosen else None
                if mode == "compose":
                    repair = repair or self.default_repair()
                    kv, info = self.composed(chosen, repair, compression)  # hf engine
                elif chosen:
                    kv, info = self.prefix(chosen, compression)
                else:
                    kv, info = [], {"cached": 0, "computed": len(layout.segments[0]), "snapshot_load": 0.0}
                    q_ids = layout.segments[0] + q_ids
                cache = runner.new_cache(kv or None, key=key)
                logits = runner.forward(q_ids, cache)
            info["computed"] += len(layout.segments[-1])
        try:
            gen = decode_loop(lambda t: runner.forward([t], cache), logits, params, self.handle.stop_ids,
                              self.handle.tokenizer, on_text, budget=self.handle.max_context - len(layout.ids))
        finally:
            runner.release(cache)
        t_end = time.perf_counter()
        ans = Answer(
            question=question, answer=gen.text, output_token_ids=gen.token_ids, skills=[s.name for s in chosen],
            mode=mode, tokens={"prompt": len(layout.ids), "cached": info["cached"], "computed": info["computed"]},
            timings_ms={"model_load": round(model_load * 1e3, 1),
                        "snapshot_load": round(info["snapshot_load"] * 1e3, 1),
                        "ttft": round((gen.first_token_at - t0) * 1e3, 1) if gen.first_token_at else None,
                        "total": round((t_end - t_start) * 1e3 + model_load * 1e3, 1)},
            model=self.handle.name, finish_reason=gen.finish_reason,
            tiers=info.get("tiers") or ["computed"] * len(chosen), mode_reason=reason)
        if mode == "compose":
            rec = info.get("recomputed", [])
            ans.compose = {"repair": (repair or Repair()).to_json(), "recomputed": len(rec),
                           "recomputed_fraction": round(len(rec) / info["skill_tokens"], 4)
                           if info.get("skill_tokens") else 0.0}
        self._record_stats(ans, chosen)
        return ans

    def _paged_composed(self, chosen: list[Skill], repair: Repair, compression: str = "none"):
        """Compose mode on the paged engine: a request over the first skill's single-skill entry and the later
        skills' placed entries (made resident on demand, from L1 or from their snapshots, loaded or compiled
        through `prefix`), with `repair` applied to the request's own copies of the pages it touches. Returns
        (request, info) with info like `composed`'s; tiers per skill are "l1" when its KV was already in the pool.
        The same positions and rows as `composed` (skillkv.compose.repair), without a contiguous copy of the prefix."""
        from itertools import accumulate

        from skillkv.engine.rope import check_composable
        from skillkv.engine.placed import Part

        model = self.handle.load()
        check_composable(model.config)
        segs = [self.builder.preamble_ids()] + [self.builder.skill_ids(s) for s in chosen]
        loaded: dict[str, dict] = {}  # skill name -> `prefix` info of the snapshots loaded (or compiled) now

        def loader(skill: Skill, chain: list[Skill]):
            def load() -> KV:
                kv, loaded[skill.name] = self.prefix(chain, compression)
                return kv
            return load
        parts = [Part(self.chain_keys(chain)[-1], ctx + len(seg), loader(s, chain), ctx)
                 for s, seg, (chain, ctx) in zip(chosen, segs[1:], self.compose_sources(chosen, repair))]
        composer = self.runner.composer
        cache, _ = composer.open(parts, len(segs[0]))
        try:
            if self._hf_repair is None:
                self._hf_repair = HFRunner(model)
            ids = [t for seg in segs for t in seg]
            starts = [0] + list(accumulate(len(seg) for seg in segs[:-1]))
            positions = composer.repair(cache, self._hf_repair, ids, starts, repair)
        except BaseException:
            self.runner.release(cache)
            raise
        tiers = ["l1" if s.name not in loaded else loaded[s.name]["tiers"][-1] for s in chosen]
        return cache, _compose_info(segs, tiers, positions, sum(i["snapshot_load"] for i in loaded.values()))

    def _paged_prefix(self, chosen: list[Skill]):
        """The paged engine's request over the prefix of `chosen` from L1, or paged in from the host tier or L2
        when every piece is stored and loading beats recomputing; (None, None) otherwise (the caller computes).
        A damaged piece is warned about and removed (then recomputed), never served."""
        keys = self.chain_keys(chosen)
        pieces = [(k, self.piece_ids(chosen, i)) for i, k in enumerate(keys)]
        tokens = sum(len(ids) for _, ids in pieces)
        if self.runner.resident(keys[-1]):
            return self.runner.new_cache(None, key=keys[-1]), {
                "cached": tokens, "computed": 0, "snapshot_load": 0.0, "tiers": ["l1"] * len(chosen)}
        if not all(self.snapshots.contains(k) for k in keys):
            return None, None
        t0 = time.perf_counter()
        try:
            got = self.runner.open_stored(keys[-1], pieces)
        except SnapshotError as e:
            self.on_warning(f"{e}; recompiling")
            self.snapshots.remove(keys)
            return None, None
        if got is None:
            return None, None
        cache, where = got
        return cache, {"cached": tokens, "computed": 0, "snapshot_load": time.perf_counter() - t0,
                       "tiers": [where] * len(chosen)}

    def _warm_pins(self) -> None:
        """Make the pinned skills resident (paged engine) once; a pinned entry is evicted only after every
        unpinned one."""
        if self.engine != "paged" or not self.pin or getattr(self, "_pins_warm", False):
            return
        for skill in self.pick(self.pin):
            key = self.chain_keys([skill])[0]
            if not self.runner.resident(key):
                kv, _ = self.prefix([skill])
                self.runner.pin(key, len(self.piece_ids([skill], 0)), lambda kv=kv: kv)
            else:
                self.runner.pin(key, 0, lambda: None)
        self._pins_warm = True

    def _record_stats(self, ans: Answer, chosen: list[Skill]) -> None:
        """Record this ask in the store's statistics (skillkv.stats); a stats failure never fails an ask."""
        try:
            from skillkv.stats import AskRecord, StatsDB

            if self._stats is None:
                self._stats = StatsDB(self.store_root, on_warning=self.on_warning)
            tm = ans.timings_ms
            self._stats.record(AskRecord(
                model=self.tag, mode=ans.mode, skills=ans.skills, tiers=ans.tiers,
                skill_tokens=[len(self.piece_ids(chosen, i)) for i in range(len(chosen))],
                prompt=ans.tokens["prompt"], cached=ans.tokens["cached"], computed=ans.tokens["computed"],
                snapshot_load_ms=tm["snapshot_load"], ttft_ms=tm["ttft"], total_ms=tm["total"]))
        except Exception as e:  # noqa: BLE001 - statistics are never worth a failed ask
            self.on_warning(f"statistics not recorded ({type(e).__name__}: {e})")

    def _has_old_snapshot(self, name: str) -> bool:
        """Whether some single-skill snapshot of `name` is stored (callers know it is not the current one)."""
        return any(e.skill == name and not e.parent for e in self.snapshots.entries().values())

    def status(self) -> list[SkillState]:
        """Each skill with the state of its single-skill snapshot for this model."""
        entries = self.snapshots.entries()
        out = []
        for s in self.load_skills().skills:
            key = self.chain_keys([s])[0]
            e = entries.get(key)
            if e is not None and self.snapshots.contains(key):
                out.append(SkillState(s, "current", e.tokens, e.bytes))
            elif self._has_old_snapshot(s.name):
                out.append(SkillState(s, "stale"))
            else:
                out.append(SkillState(s, "missing"))
        return out

    def live_keys(self) -> set[str]:
        """Keys whose whole chain still matches current skills (combination pieces included)."""
        by_hash = {s.content_hash for s in self.load_skills().skills} | {NEIGHBOUR.content_hash}
        entries = self.snapshots.entries()
        live: set[str] = set()
        for key, e in entries.items():
            chain, ok, k = [], True, key
            while k:
                x = entries.get(k)
                if x is None or x.content_hash not in by_hash:
                    ok = False
                    break
                chain.append(x)
                k = x.parent
            if ok and snapshot_key(self.fingerprint, e.parent, e.content_hash) == key:
                live.add(key)
        return live

    def gc(self, max_bytes: int | None = None):
        """Remove stale snapshots (and LRU ones beyond `max_bytes`). Returns (removed entries, bytes freed)."""
        return self.snapshots.gc(self.live_keys(), max_bytes)
