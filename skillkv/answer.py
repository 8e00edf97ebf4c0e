"""What an ask returns (`Answer`, also the JSON of `skillkv ask --json`) and how it is recorded in the stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from skillkv.stats import AskRecord


@dataclass
class Answer:
    question: str
    answer: str
    output_token_ids: list[int]
    skills: list[str]
    mode: str
    tokens: dict  # prompt, cached, computed; where the cached came from: prefix_cache, skill_kv
    timings_ms: dict  # model_load, snapshot_load, ttft, total
    model: str
    finish_reason: str = "stop"
    tiers: list = field(default_factory=list)  # per skill: l1 | host | l2 | computed (where its KV came from)
    mode_reason: str = ""  # why this mode was used (auto mode's choice, or "requested")
    compose: dict | None = None  # compose mode: repair setting, recomputed tokens and fraction

    @classmethod
    def of(cls, req, question: str, model: str, model_load: float, t0: float, t_start: float) -> Answer:
        """The answer of a finished request (sched/request.Req) to `question`; `model_load` seconds spent loading
        the model, first-token time measured from `t0` (after the load), total from `t_start`."""
        ms = lambda s: round(s * 1e3, 1)  # noqa: E731
        tokens = {"prompt": len(req.ids), "cached": req.cached, "computed": len(req.ids) - req.cached, **req.reused}
        return cls(question=question, answer=req.text, output_token_ids=list(req.output),
                   skills=[s.name for s in req.skills], mode=req.mode, tokens=tokens,
                   timings_ms={"model_load": ms(model_load), "snapshot_load": ms(req.snapshot_load),
                               "ttft": ms(req.t_first - t0) if req.t_first else None, "total": ms(req.t_end - t_start)},
                   model=model, finish_reason=req.finish_reason, tiers=list(req.tiers), mode_reason=req.reason)

    def to_json(self) -> dict:
        return asdict(self)

    def record(self, model_tag: str, skill_tokens: list[int]) -> AskRecord:
        """The statistics row of this answer (skillkv.stats); `skill_tokens`: tokens of each skill's piece."""
        tm = self.timings_ms
        return AskRecord(model=model_tag, mode=self.mode, skills=self.skills, tiers=self.tiers,
                         skill_tokens=skill_tokens, prompt=self.tokens["prompt"], cached=self.tokens["cached"],
                         computed=self.tokens["computed"], snapshot_load_ms=tm["snapshot_load"], ttft_ms=tm["ttft"],
                         total_ms=tm["total"])
