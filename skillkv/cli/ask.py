"""skillkv ask "question": pick skills, reuse their KV, prefill only the question, stream the answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import (DeviceOpt, EngineOpt, HostBudgetOpt, JsonOpt, KvBudgetOpt, ModelOpt, PinOpt,
                                SkillsOpt, StoreOpt, err, open_kv, print_json)
from skillkv.errors import SkillkvError


def read_batch(path: Path) -> list[dict]:
    """Lines of {"q": str, "skills": [str, ...] (optional)}; every line is checked before any work starts."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SkillkvError(f"cannot read batch file {path} ({getattr(e, 'strerror', None) or e})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise SkillkvError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("q"), str) or not obj["q"].strip():
            raise SkillkvError(f"{path}:{n}: needs a non-empty string field 'q'")
        skills = obj.get("skills")
        if skills is not None and (not isinstance(skills, list) or not all(isinstance(s, str) for s in skills)):
            raise SkillkvError(f"{path}:{n}: 'skills' must be a list of skill names")
        items.append({"q": obj["q"], "skills": skills})
    if not items:
        raise SkillkvError(f"batch file {path} holds no questions")
    return items


def _explain(kv, item: dict) -> None:
    from skillkv.select import explain_skills

    if item["skills"]:
        err.print(f"explain: --skill given ({', '.join(item['skills'])}): selection skipped", markup=False)
        return
    loaded = kv.load_skills()
    cands = explain_skills(item["q"], loaded.skills)
    if not cands:
        err.print("explain: no skills to choose from" + (f" ({len(loaded.problems)} skipped: "
                                                         f"{'; '.join(loaded.problems)})" if loaded.problems else ""),
                  markup=False, soft_wrap=True)
    for c in cands:
        emb = f" embed {c.embed:.2f}" if c.embed is not None else ""
        err.print(f"explain: {'+' if c.chosen else '-'} {c.name}  score {c.score:.3f} (bm25 {c.bm25_raw:.2f}{emb})  "
                  f"{c.why}", markup=False, soft_wrap=True)


def _compose_note(ans) -> str:
    if not ans.compose:
        return ""
    return f" ({ans.compose['recomputed']} tokens recomputed, {ans.compose['recomputed_fraction']:.1%})"


@app.command("ask")
def ask_cmd(
    question: Optional[str] = typer.Argument(None, help="The question (omit with --batch)."),
    skill: Optional[list[str]] = typer.Option(None, "--skill", "-s", help="Use these skills (repeatable)."),
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    model: Optional[str] = ModelOpt,
    mode: str = typer.Option("auto", "--mode", help="auto (exact, or compose where measured good enough) | exact "
                             "(reuse skill KV) | compose (place skills in any order, approximate) | full (no cache, "
                             "the reference)."),
    recompute: Optional[float] = typer.Option(None, "--recompute", min=0.0, max=1.0, help="compose: recompute this "
                                              "fraction of skill tokens (chosen by --repair-select)."),
    repair_select: str = typer.Option("front", "--repair-select", help="compose: which tokens --recompute picks: "
                                      "front (the leading tokens of every later skill) | deviation (CacheBlend)."),
    repair_lead: Optional[int] = typer.Option(None, "--repair-lead", min=0, help="compose: recompute the first N "
                                              "tokens of every later skill."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Answer length limit."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
    batch: Optional[Path] = typer.Option(None, "--batch", help="JSONL file of {\"q\", \"skills\"}; JSON lines out."),
    device: Optional[str] = DeviceOpt,
    engine: str = EngineOpt,
    gpu_kv_budget: Optional[str] = KvBudgetOpt,
    host_kv_budget: Optional[str] = HostBudgetOpt,
    pin: Optional[list[str]] = PinOpt,
    explain: bool = typer.Option(False, "--explain", help="Print the candidate skills, scores and why (stderr)."),
    server: Optional[str] = typer.Option(None, "--server", envvar="SKILLKV_SERVER", show_default=False,
                                         help="Ask a running `skillkv serve` at this URL (env SKILLKV_SERVER)."),
    as_json: bool = JsonOpt,
):
    """Answer a question with the skills it needs, reusing their compiled KV."""
    # everything that can be checked without torch/transformers is checked first: an error costs ~0.3 s, not ~4 s
    if batch is None and (question is None or not question.strip()):
        raise SkillkvError("the question is empty")
    items = read_batch(batch) if batch is not None else [{"q": question, "skills": skill or None}]
    from skillkv.generate import SamplingParams

    if server:
        from skillkv.serve.client import RemoteKV

        kv = RemoteKV(server, model)
    else:
        kv = open_kv(model, store, skills, device, engine, gpu_kv_budget, pin, host_kv_budget)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    repair = None
    if recompute is not None or repair_lead is not None:
        from skillkv.compose.repair import Repair

        repair = Repair(lead=repair_lead or 0, recompute=recompute or 0.0, select=repair_select)
    stream = batch is None and not as_json

    def on_text(t: str) -> None:
        sys.stdout.write(t)
        sys.stdout.flush()

    for item in items:
        if explain:
            _explain(kv, item)
        ans = kv.ask(item["q"], item["skills"], mode=mode, params=params, on_text=on_text if stream else None,
                     repair=repair)
        if not stream:
            print_json(ans.to_json())
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        tk, tm = ans.tokens, ans.timings_ms
        err.print(f"[dim]skills: {', '.join(ans.skills) or 'none'} | mode {ans.mode}{_compose_note(ans)} | "
                  f"prompt {tk['prompt']} tokens "
                  f"({tk['cached']} cached, {tk['computed']} computed) | model load {tm['model_load']:.0f} ms | "
                  f"snapshot load {tm['snapshot_load']:.0f} ms | first token {tm['ttft'] or 0:.0f} ms | "
                  f"total {tm['total'] / 1000:.2f} s[/]", soft_wrap=True)
