"""The request: one object per question or chat completion, built once and read by every stage (mini-sglang's
`Req`): the prompt as token ids and where they come from, sampling, limits, the mode and why, and its state as the
loop runs it.

    req = Req(ids, params, max_new, skills=chosen, pieces=[...], mode="auto", emit=on_event)
    loop.run(req)                                  # `skillkv ask`: a batch of one (sched/loop.py)
    req.text, req.output, req.tokens               # the answer, its ids, {"prefix_cache", "skill_kv", "computed"}

The prompt `ids` is [skill prefix][the rest]: the skill prefix is ids[:skill_tokens], the pieces of a compiled chain
([preamble + skill 1][skill 2]...; full mode prefills the same pieces, so it is cut where exact mode's snapshots
are); the rest is the question, or a client's whole conversation. Without injected skills `skill_tokens` is 0 (an
agent's conversation, rendered as the chat template renders it) or the preamble's length (`skillkv ask` with no
skill).

Events go to `emit`: ("opened", req) once its prefix is open (the tokens still to compute are `pending`), ("text",
delta) as the answer forms (stop strings held back), ("done", req) or ("error", exception) last.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from skillkv.generate import SamplingParams


def _ignore(event: tuple) -> None:
    pass


@dataclass(eq=False)
class Req:
    ids: list[int]  # the whole prompt
    params: SamplingParams
    max_new: int  # answer tokens at most (max_tokens, within the model's context)
    skills: list = field(default_factory=list)  # Skill: the chain the prompt starts with ([] none)
    pieces: list[list[int]] = field(default_factory=list)  # ids[:skill_tokens] cut into the chain's pieces
    mode: str = "auto"  # asked for; once opened, the mode used (auto resolved)
    asked: str = ""  # the mode asked for (set from `mode`): what a request opened again is opened in
    repair: object = None  # compose's repair setting (compose/repair.Repair), None: the measured default
    stop: list[str] = field(default_factory=list)  # stop strings
    emit: Callable[[tuple], None] = _ignore
    data: object = None  # the owner's per-request state (serve: the HTTP job)
    opener: Callable | None = None  # opens this request instead of the loop's opener (the evaluation's modes)
    logits: list | None = None  # when a list: the logits each answer token was chosen from (the evaluation)
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # set by the stages, in order
    reason: str = ""  # why this mode
    seq: object = None  # the runner's sequence once opened
    pending: list[int] = field(default_factory=list)  # ids to feed at the next step (the prompt's rest, a token)
    reused: dict = field(default_factory=lambda: {"prefix_cache": 0, "skill_kv": 0})
    tiers: list[str] = field(default_factory=list)  # per skill: l1 | host | l2 | computed
    snapshot_load: float = 0.0  # seconds spent making the skills' KV resident
    constraint: object = field(default=None, repr=False)  # sched/grammar.Constraint: the answer's grammar
    spans: list = field(default_factory=list)  # select/spans.Span: compiled skills the prompt holds, where
    prefill_s: float = 0.0  # engine time of the steps that fed its prompt (shared with the requests batched beside)
    compose: dict | None = None  # compose mode: what was placed and repaired
    output: list[int] = field(default_factory=list)
    text: str = ""
    state: str = "waiting"  # waiting | running | done
    cancelled: bool = False
    finish_reason: str = ""  # stop | length | error
    retries: int = 0  # reopened after a damaged snapshot
    error: Exception | None = None  # what failed it (finish_reason "error")
    gen: object = field(default=None, repr=False)  # the loop's: sampling generator, text stream, stop strings
    stream: object = field(default=None, repr=False)
    stop_text: object = field(default=None, repr=False)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0  # opened
    t_first: float = 0.0  # first answer token chosen
    t_end: float = 0.0

    def __post_init__(self):
        self.asked = self.asked or self.mode

    @property
    def skill_tokens(self) -> int:
        return sum(map(len, self.pieces))

    @property
    def cached(self) -> int:
        return self.reused["prefix_cache"] + self.reused["skill_kv"]

    @property
    def tokens(self) -> dict:
        """Where the prompt's KV came from: {"prefix_cache", "skill_kv", "computed"} (they add up to the prompt)."""
        return {**self.reused, "computed": len(self.ids) - self.cached}

    def worst_pages(self, page_size: int, shared: int = 0) -> int:
        """Pages the request may still need of its own: prompt and answer, less `shared` pages it only references."""
        return -(-(len(self.ids) + self.max_new) // page_size) - shared

    def timings_ms(self) -> dict:
        ms = lambda a, b: round((a - b) * 1e3, 1) if a and b else None  # noqa: E731
        return {"queue": ms(self.t_start, self.t_submit), "snapshot_load": round(self.snapshot_load * 1e3, 1),
                "prefill": round(self.prefill_s * 1e3, 1), "ttft": ms(self.t_first, self.t_submit),
                "total": ms(self.t_end, self.t_submit)}
