"""The Python API that the CLI and the server are thin layers over: one SkillKV per model, store and skills folder.

    kv = SkillKV(model="default", store="cache_store", skills="skills")
    kv.compile()                                   # snapshots per skill, incremental (skillkv.compile)
    ans = kv.ask("How big is a KV page?")          # picks skills, reuses their KV, prefills only the question
    print(ans.answer, ans.tokens)

One path for every command (docs/ARCHITECTURE.md): skills are chosen (skillkv.select), a mode is chosen
(compose/stage.py), the prefix is opened on the runner (runners/, one contract), the question is prefilled, the
answer decoded and the ask recorded (skillkv.stats). `skillkv serve` shares `open` and batches the steps itself.

Modes (`Answer.mode` is the one used, `Answer.mode_reason` says why): exact (the skills' KV as an exact prefix:
resident, paged in from the host tier or the store, or computed and stored; identical to full, token for token),
full (no cache: the same pieces prefilled from scratch; the reference), compose (approximate: skills placed in any
order from their own snapshots, boundary tokens repaired), auto (the default: exact, or compose where this model's
measured fidelity meets the bar).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from skillkv import config as cfg
from skillkv.answer import Answer
from skillkv.compile import CompileResult, Compiler, SkillState
from skillkv.compose import fidelity
from skillkv.compose.repair import Repair
from skillkv.compose.stage import MODES, ComposeStage
from skillkv.errors import SkillError, SkillkvError
from skillkv.generate import SamplingParams
from skillkv.model import resolve_model
from skillkv.prompt import PromptBuilder, check_fits
from skillkv.prefixes import Opened, Prefixes
from skillkv.residency import Residency
from skillkv.runners import KERNELS, Runner, Seq, make_runner, resolve_engine
from skillkv.sched.loop import Loop
from skillkv.sched.request import Req
from skillkv.select import choose_skills
from skillkv.skills import LoadResult, Skill, load_skills
from skillkv.store import Store
from skillkv.tiers.tiers import Tiers
from skillkv.verdicts import Verdicts


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
    engine: str = "auto"  # auto | hf | paged (skillkv.runners)
    kv_budget: int | None = None  # bytes of the runner's resident KV (paged: its pool; default: half the free memory)
    pin: list[str] = field(default_factory=list)  # skills kept resident
    host_budget: int | None = None  # bytes of the host tier (default: 4 GiB pinned on CUDA, none on the CPU: tiers/)
    batch_invariant: bool | None = False  # an answer does not depend on its batch: True required, None where it holds
    attention: str = "auto"  # the paged runner's attention backend
    follow_symlinks: bool = False  # load skill folders and files that link outside the skills folder

    def __post_init__(self):
        self.handle = resolve_model(self.model, self.device)
        self.engine = resolve_engine(self.engine, self.handle)
        self.fingerprint = self.handle.fingerprint
        if self.engine != "hf":  # another runner computes other roundings: its snapshots are its own
            self.fingerprint = hashlib.sha256(f"{self.fingerprint}|engine={KERNELS[self.engine]}".encode()).hexdigest()
        self.tag = f"{self.handle.name}-{self.fingerprint[:16]}"
        self.store_root = Path(self.store or cfg.default_store())
        self.snapshots = Store(self.store_root, self.tag, self.fingerprint)
        self.skills_dir = Path(self.skills or cfg.default_skills())
        self.builder = PromptBuilder(self.handle.tokenizer)
        self.compiler = Compiler(self.snapshots, self.builder, self.fingerprint, lambda: self.runner,
                                 self.handle.max_context, self.on_warning)
        host = self.host_budget if self.host_budget is not None else (4 << 30) * self.handle.device.startswith("cuda")
        self.tiers = Tiers(self.snapshots, host, lambda: self.runner, policy=self._policy)
        self.residency = Residency(self.compiler, self.tiers, lambda: self.runner, self.on_warning)
        self.composer = ComposeStage(lambda: self.runner, self.compiler.chain_kv, self.compiler.keys, self.compiler.piece_ids,
                                     self.builder.preamble_ids, self.builder.skill_ids, self.fidelity_record)
        self.prefixes = Prefixes(self)
        self._skills: LoadResult | None = None
        self._runner: Runner | None = None
        self._loop: Loop | None = None
        self._pins_warm = False
        self._stats = None  # skillkv.stats.StatsDB, opened on the first recorded ask

    # ------------------------------------------------------------------ parts

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            verdicts = Verdicts.load(self.snapshots.dir)  # the machine's GEMM check, shared by every command
            self._runner = make_runner(self.engine, self.handle, self.kv_budget, self.batch_invariant,
                                       self.attention, verdicts, self.tiers.host.budget_bytes)
            verdicts.save()
        return self._runner

    def _policy(self):
        """The tier policy on CUDA (measured once per model and store), None on the CPU (loading always wins)."""
        if self.runner.device.type == "cuda":
            from skillkv.tiers.policy import policy_for

            return policy_for(self.runner, self.snapshots, self.handle.kv_bytes_per_token, self.handle.dtype)
        return None

    def fidelity_record(self) -> dict | None:
        """The compose measurement auto follows: this store's for the exact fingerprint, else the shipped one."""
        return fidelity.for_model(self.snapshots.dir, self.fingerprint, self.handle.weights_id)

    def load_skills(self) -> LoadResult:
        if self._skills is None:
            self._skills = load_skills(self.skills_dir, follow_symlinks=self.follow_symlinks)
            for w in self._skills.warnings:
                self.on_warning(w)
        return self._skills

    def reload(self) -> None:
        """Forget the parsed skills (after files changed); the next use reads the folder again."""
        self._skills = None

    def pick(self, names: list[str]) -> list[Skill]:
        """Skills by name, in the given order; SkillError naming the unknown ones."""
        by_name = self.load_skills().by_name()
        unknown = [n for n in names if n not in by_name]
        if unknown:
            known = ", ".join(sorted(by_name)) or "none"
            raise SkillError(f"unknown skill {', '.join(map(repr, unknown))} (known: {known})")
        return [by_name[n] for n in dict.fromkeys(names)]

    def select(self, question: str, names: list[str] | None = None) -> list[Skill]:
        return self.pick(names) if names else choose_skills(question, self.load_skills().skills)

    def check_fits(self, prompt_tokens: int, answer_tokens: int = 1, question_tokens: int | None = None) -> None:
        """PromptTooLong unless the prompt plus `answer_tokens` fit the model's context."""
        check_fits(prompt_tokens, answer_tokens, question_tokens, self.handle.max_context)

    # ------------------------------------------------------------------ compile

    def compile(self, names: list[str] | None = None, compression: str = "none", force: bool = False,
                on_result: Callable[[CompileResult], None] | None = None, neighbours: bool | None = None,
                verify: bool = False) -> list[CompileResult]:
        """Compile every skill (or `names`): skipped folders first, then one result per skill (skillkv.compile).
        `neighbours`: compose's neighbour snapshots too (default: where auto composes); `verify`: see compile.py."""
        loaded = self.load_skills()
        results = [CompileResult(f.name, "skipped", reason=p) for p, f in zip(loaded.problems, loaded.problem_folders)]
        for r in results:
            on_result and on_result(r)
        nb = self.composer.uses_neighbours() if neighbours is None else neighbours
        todo = loaded.skills if names is None else self.pick(names)
        return results + self.compiler.compile(todo, compression, force, nb, on_result, loaded.skills, verify)

    def compile_skill(self, skill: Skill, compression: str = "none") -> CompileResult:
        """Compile one parsed skill (watch: the folder that changed), and the stored combinations it is part of
        (with the other skills as last loaded, where this version replaces its old one); never raises for the
        skill itself (a "skipped" result)."""
        if self._skills is not None:
            self._skills.skills = [skill if s.name == skill.name else s for s in self._skills.skills]
        current = self._skills.skills if self._skills is not None else [skill]
        [r] = self.compiler.compile([skill], compression, False, self.composer.uses_neighbours(), current=current)
        return r

    # ------------------------------------------------------------------ ask

    def open(self, skills: list[Skill], mode: str = "auto", repair: Repair | None = None, settle: bool = False,
             ids: list[int] | None = None, pieces: list[list[int]] | None = None) -> Opened:
        """A sequence over the prefix of `skills` in `mode` (skillkv.prefixes.Prefixes.open)."""
        return self.prefixes.open(skills, mode, repair, settle, ids, pieces)

    def is_resident(self, skills: list[Skill]) -> bool:
        """Whether the exact chain of `skills` is resident in the runner (without loading the model)."""
        keys = self.compiler.keys(skills)
        return bool(keys) and self._runner is not None and self._runner.resident(keys[-1])

    # ------------------------------------------------------------------ requests: the loop (sched/)

    def request(self, skills: list[Skill], rest: list[int], params: SamplingParams | None = None,
                mode: str = "auto", repair: Repair | None = None, stop=(), emit=None, preamble: bool = True) -> Req:
        """A request for the prompt [preamble][skills...][rest], or `rest` alone (`preamble` False, no skills: an
        agent's conversation as the chat template renders it), checked against the model's context; the answer is
        limited to the room left."""
        params = params or SamplingParams()
        if mode not in MODES:
            raise SkillkvError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        pieces = [p for _, p in self.compiler.pieces(skills)] if skills else [self.builder.preamble_ids()] * preamble
        n = sum(map(len, pieces)) + len(rest)
        self.check_fits(n, 1, len(rest))
        return Req([t for p in pieces for t in p] + list(rest), params, min(params.max_tokens, self.handle.max_context - n),
                   skills=list(skills), pieces=pieces, mode=mode, repair=repair, stop=list(stop),
                   **({"emit": emit} if emit else {}))

    def make_loop(self, max_batch: int = 64, max_step_tokens: int = 4096) -> Loop:
        """An engine loop over this SkillKV's runner (`ask` keeps one; serve builds its own)."""
        return Loop(self.runner, self.prefixes.open_request, self.handle.stop_ids, self.handle.tokenizer, max_batch,
                    max_step_tokens, on_damaged=lambda e, req: self.residency.damaged(e, req.skills))

    def ask(self, question: str, skills: list[str] | None = None, mode: str = "auto",
            params: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
            repair: Repair | None = None, on_progress: Callable[[str, int], None] | None = None) -> Answer:
        """Answer one question with the named `skills`, or those chosen from it: a request of one on the engine
        loop. `on_progress(stage, tokens)` hears ("skills", prefix tokens) before their KV is loaded or computed,
        ("question", tokens) before the rest is prefilled."""
        params = params or SamplingParams()
        if not question or not question.strip():
            raise SkillkvError("the question is empty")
        t_start = time.perf_counter()
        chosen = self.select(question, skills)
        if mode in ("auto", "exact") and not self.is_resident(chosen):  # read while the question is tokenized
            stored = [p for p in self.compiler.pieces(chosen) if self.snapshots.contains(p[0])]
            self.tiers.prefetch(stored, self._runner)

        def emit(ev: tuple) -> None:
            if ev[0] == "text" and on_text:
                on_text(ev[1])
            elif ev[0] == "opened" and on_progress:
                on_progress("question", len(ev[1].pending))
        req = self.request(chosen, self.builder.question_ids(question), params, mode, repair, emit=emit)
        if params.max_tokens > req.max_new:
            self.on_warning(f"the answer is limited to {req.max_new:,} tokens by the model's context of "
                            f"{self.handle.max_context:,} (prompt {len(req.ids):,} tokens)")
        t0 = time.perf_counter()
        if self._loop is None:  # loads the model on first use: counted once, in model_load and in total
            self._loop = self.make_loop()
        model_load, t0 = time.perf_counter() - t0, time.perf_counter()
        on_progress and on_progress("skills", req.skill_tokens)
        self._loop.run(req)
        ans = Answer.of(req, question, self.handle.name, model_load, t0, t_start)
        if req.mode == "compose":
            ans.compose = self.composer.summary(req.repair, req.compose)
        self.record(ans, chosen)
        return ans

    def forget_resident(self) -> None:
        """Evict every resident prefix no sequence holds, and empty the host tier: the next exact ask reads its
        snapshots from the store (benchmarks, tests)."""
        self.residency.forget()
        self._pins_warm = False

    def warm_pins(self, again: bool = False) -> list[tuple[str, list[str]]]:
        """Make the pinned skills resident (once, or `again` after skills changed); a pinned entry is evicted only
        after every unpinned one. Returns (skill, tiers its KV came from) per pinned skill warmed now."""
        if not self.pin or (self._pins_warm and not again):
            return []
        self._pins_warm = True
        return [(s.name, self.residency.make_resident([s], pin=True)["tiers"]) for s in self.pick(self.pin)]

    def record(self, ans: Answer, chosen: list[Skill]) -> None:
        """Record this ask in the store's statistics (skillkv.stats); a stats failure never fails an ask."""
        try:
            from skillkv.stats import StatsDB

            if self._stats is None:
                self._stats = StatsDB(self.store_root, on_warning=self.on_warning)
            self._stats.record(ans.record(self.tag, [len(ids) for _, ids in self.compiler.pieces(chosen)]))
        except Exception as e:  # noqa: BLE001 - statistics are never worth a failed ask
            self.on_warning(f"statistics not recorded ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------ store

    def status(self) -> list[SkillState]:
        """Each skill with the state of its single-skill snapshot for this model."""
        return self.compiler.status(self.load_skills().skills)

    def live_keys(self) -> set[str]:
        return self.compiler.live_keys(self.load_skills().skills)

    def gc(self, max_bytes: int | None = None):
        """Remove stale snapshots (and LRU ones beyond `max_bytes`). Returns (removed entries, bytes freed)."""
        return self.snapshots.gc(self.live_keys(), max_bytes)
