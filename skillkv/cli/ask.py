"""skillkv ask "question": pick skills, reuse their KV, prefill only the question, stream the answer.

  --compare   answer, then answer again with a full prefill (no cache): both answers and both times side by
              side, and whether they are the same token for token (what the product is for, in one command)
  --batch F   JSON lines in, JSON lines out, one output line per question line: a line that cannot be answered
              (not JSON, no "q", an unknown skill, too long for the context) gets {"error": {...}} and the others
              are answered; exit code 1 if any line failed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app, error_type
from skillkv.cli.common import (DeviceOpt, EngineOpt, FollowOpt, HostBudgetOpt, JsonOpt, KvBudgetOpt, ModelOpt, PinOpt,
                                SkillsOpt, StoreOpt, err, human_seconds, open_kv, out, print_json, printable, warn)
from skillkv.cli.progress import Waiting
from skillkv.cli.table import Col, print_table
from skillkv.errors import SkillkvError


def read_batch(path: Path) -> list[dict]:
    """One item per non-empty line: {"line", "q", "skills"} or {"line", "error"} for a line that is not a question
    ({"q": str, "skills": [str, ...] (optional)}). An unreadable or empty file is an error of the whole command."""
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
            items.append({"line": n, "error": f"{path}:{n}: not a JSON object"})
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("q"), str) or not obj["q"].strip():
            items.append({"line": n, "error": f"{path}:{n}: needs a non-empty string field 'q'"})
            continue
        skills = obj.get("skills")
        if skills is not None and (not isinstance(skills, list) or not all(isinstance(s, str) for s in skills)):
            items.append({"line": n, "error": f"{path}:{n}: 'skills' must be a list of skill names"})
            continue
        items.append({"line": n, "q": obj["q"], "skills": skills})
    if not items:
        raise SkillkvError(f"batch file {path} holds no questions")
    return items


def _explain(kv, item: dict) -> None:
    from skillkv.select import explain_skills

    if item["skills"]:
        err.print(f"explain: --skill given ({printable(', '.join(item['skills']))}): selection skipped", markup=False)
        return
    loaded = kv.load_skills()
    cands = explain_skills(item["q"], loaded.skills)
    if not cands:
        err.print("explain: no skills to choose from" + (f" ({len(loaded.problems)} skipped: "
                                                         f"{printable('; '.join(loaded.problems))})"
                                                         if loaded.problems else ""), markup=False, soft_wrap=True)
    for c in cands:
        emb = f" embed {c.embed:.2f}" if c.embed is not None else ""
        err.print(f"explain: {'+' if c.chosen else '-'} {printable(c.name)}  score {c.score:.3f} (bm25 "
                  f"{c.bm25_raw:.2f}{emb})  {printable(c.why)}", markup=False, soft_wrap=True)


def _compose_note(ans) -> str:
    if not ans.compose:
        return ""
    return f" ({ans.compose['recomputed']} tokens recomputed, {ans.compose['recomputed_fraction']:.1%})"


def _status(ans) -> str:
    tk, tm = ans.tokens, ans.timings_ms
    load = f"model load {tm['model_load']:.0f} ms | " if tm["model_load"] else ""
    return (f"skills: {printable(', '.join(ans.skills)) or 'none'} | mode {ans.mode}{_compose_note(ans)} | prompt "
            f"{tk['prompt']:,} tokens ({tk['cached']:,} cached, {tk['computed']:,} computed)\n{load}snapshot load "
            f"{tm['snapshot_load']:.0f} ms | first token {tm['ttft'] or 0:.0f} ms | total {tm['total'] / 1000:.2f} s")


def _flag_truncated(ans, max_tokens: int) -> None:
    if ans.finish_reason == "length":
        n = len(ans.output_token_ids)
        why = f"--max-tokens {max_tokens}" if n >= max_tokens else "the model's context"
        warn(f"the answer was cut at {n:,} tokens by {why} (finish_reason: length)")


def _progress(wait: Waiting, label: str = "", full: bool = False):
    def say(stage: str, n: int) -> None:
        skills = f"prefilling the skills ({n:,} tokens)" if full else f"preparing the skills' KV ({n:,} tokens)"
        wait.update(label + (skills if stage == "skills" else f"prefilling the question ({n:,} tokens)"))
    return say


def _compare(kv, item: dict, mode: str, params, repair, as_json: bool, on_text) -> None:
    """The answer in `mode`, then with a full prefill of the same skills: both, side by side."""
    wait = Waiting(enabled=not as_json)

    def first_text(t: str) -> None:
        wait.stop()
        on_text(t)
    try:
        a = kv.ask(item["q"], item["skills"], mode=mode, params=params, on_text=None if as_json else first_text,
                   repair=repair, on_progress=_progress(wait))
    finally:
        wait.stop()
    wait = Waiting(enabled=not as_json, quiet=0.5)
    if not as_json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    try:
        b = kv.ask(item["q"], a.skills, mode="full", params=params,
                   on_progress=_progress(wait, "for comparison, no cache: ", full=True))
    finally:
        wait.stop()
    same = a.output_token_ids == b.output_token_ids
    speedup = (b.timings_ms["ttft"] / a.timings_ms["ttft"]) if a.timings_ms["ttft"] and b.timings_ms["ttft"] else None
    if as_json:
        print_json({"answer": a.to_json(), "full": b.to_json(), "identical": same,
                    "first_token_speedup": round(speedup, 2) if speedup else None})
        return
    ms = lambda x: human_seconds((x or 0) / 1e3)  # noqa: E731
    out.print()
    print_table([Col(""), Col(f"{a.mode} (skill KV reused)"), Col("full prefill (no cache)")], [
        ["prompt", f"{a.tokens['prompt']:,} tokens", f"{b.tokens['prompt']:,} tokens"],
        ["computed", f"{a.tokens['computed']:,} tokens", f"{b.tokens['computed']:,} tokens"],
        ["first token", ms(a.timings_ms["ttft"]), ms(b.timings_ms["ttft"])],
        ["answer", f"{len(a.output_token_ids):,} tokens in {ms(a.timings_ms['total'] - a.timings_ms['model_load'])}",
         f"{len(b.output_token_ids):,} tokens in {ms(b.timings_ms['total'])}"]])
    out.print()
    if same:
        verdict = "Same answer as a full prefill, token for token"
    else:
        at = next((i for i, (x, y) in enumerate(zip(a.output_token_ids, b.output_token_ids)) if x != y),
                  min(len(a.output_token_ids), len(b.output_token_ids)))
        verdict = f"The answers differ from token {at} on ({a.mode} mode is approximate)"
    faster = f"; first token {speedup:.1f}x sooner" if speedup and a.tokens["cached"] else ""
    out.print(f"{verdict}{faster}.", markup=False, soft_wrap=True, style="bold")
    if a.skills and a.tokens["cached"]:
        out.print(f"{a.tokens['cached']:,} of {a.tokens['prompt']:,} prompt tokens reused from compiled skill KV "
                  f"({printable(', '.join(a.skills))}).", markup=False, soft_wrap=True)
    elif a.skills:
        out.print("The skills' KV was not compiled yet: it was computed (and stored) by this ask. Ask again, or run "
                  "skillkv compile first.", markup=False, soft_wrap=True)
    else:
        out.print("No skill was used: there was nothing to reuse.", markup=False)
    if not same:
        out.print(f"full prefill's answer: {b.answer}", markup=False, soft_wrap=True)
    _flag_truncated(a, params.max_tokens)


def _batch(kv, path: Path, items: list[dict], mode: str, params, repair, explain: bool) -> None:
    failed = 0
    for item in items:
        if "error" in item:
            print_json({"error": {"message": item["error"], "type": "bad_line", "line": item["line"]}})
            failed += 1
            continue
        if explain:
            _explain(kv, item)
        try:
            ans = kv.ask(item["q"], item["skills"], mode=mode, params=params, repair=repair)
        except SkillkvError as e:
            print_json({"error": {"message": f"{path}:{item['line']}: {e}", "type": error_type(e),
                                  "line": item["line"]}})
            failed += 1
            continue
        print_json(ans.to_json())
    if failed:
        raise typer.Exit(1)


@app.command("ask")
def ask_cmd(
    question: Optional[str] = typer.Argument(None, help="The question (omit with --batch)."),
    skill: Optional[list[str]] = typer.Option(None, "--skill", "-s", metavar="SKILL", help="Use these skills, in "
                                              "this order (repeatable); default: chosen from the question.",
                                              show_default=False),
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    model: Optional[str] = ModelOpt,
    mode: str = typer.Option("auto", "--mode", metavar="MODE", help="auto (exact, or compose where measured good "
                             "enough) | exact (reuse skill KV) | compose (place skills in any order, approximate) | "
                             "full (no cache, the reference)."),
    compare: bool = typer.Option(False, "--compare", help="Also answer with a full prefill (no cache) and show both "
                                 "answers and times side by side."),
    recompute: Optional[float] = typer.Option(None, "--recompute", min=0.0, max=1.0, help="compose: recompute this "
                                              "fraction of skill tokens (chosen by --repair-select).",
                                              show_default=False),
    repair_select: str = typer.Option("front", "--repair-select", metavar="HOW", help="compose: which tokens "
                                      "--recompute picks: front (the leading tokens of every later skill) | "
                                      "deviation (CacheBlend)."),
    repair_lead: Optional[int] = typer.Option(None, "--repair-lead", min=0, help="compose: recompute the first N "
                                              "tokens of every later skill.", show_default=False),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Answer length limit."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
    batch: Optional[Path] = typer.Option(None, "--batch", metavar="FILE", help="JSONL file of {\"q\", \"skills\"}; "
                                         "one JSON line out per question (an {\"error\"} line for a bad one).",
                                         show_default=False),
    device: Optional[str] = DeviceOpt,
    engine: str = EngineOpt,
    gpu_kv_budget: Optional[str] = KvBudgetOpt,
    host_kv_budget: Optional[str] = HostBudgetOpt,
    pin: Optional[list[str]] = PinOpt,
    explain: bool = typer.Option(False, "--explain", help="Print the candidate skills, scores and why (stderr)."),
    server: Optional[str] = typer.Option(None, "--server", envvar="SKILLKV_SERVER", metavar="URL",
                                         show_default=False,
                                         help="Ask a running `skillkv serve` at this URL (env SKILLKV_SERVER)."),
    as_json: bool = JsonOpt,
):
    """Answer a question with the skills it needs, reusing their compiled KV."""
    # everything that can be checked without torch/transformers is checked first: an error costs ~0.3 s, not ~4 s
    if batch is None and (question is None or not question.strip()):
        raise SkillkvError("the question is empty")
    if compare and (batch is not None or server):
        raise SkillkvError("--compare answers one question on this machine (not with --batch or --server)")
    if compare and mode == "full":
        raise SkillkvError("--compare compares a mode with --mode full; choose auto, exact or compose")
    items = read_batch(batch) if batch is not None else [{"q": question, "skills": skill or None}]
    from skillkv.generate import SamplingParams

    if server:
        from skillkv.serve.client import RemoteKV

        kv = RemoteKV(server, model)
    else:
        kv = open_kv(model, store, skills, device, engine, gpu_kv_budget, pin, host_kv_budget, follow_symlinks)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    repair = None
    if recompute is not None or repair_lead is not None:
        from skillkv.compose.repair import Repair

        repair = Repair(lead=repair_lead or 0, recompute=recompute or 0.0, select=repair_select)
    if batch is not None:
        return _batch(kv, batch, items, mode, params, repair, explain)
    item = items[0]
    if explain:
        _explain(kv, item)

    def on_text(t: str) -> None:
        sys.stdout.write(t)
        sys.stdout.flush()
    if compare:
        return _compare(kv, item, mode, params, repair, as_json, on_text)
    wait = Waiting(enabled=not as_json and not server)

    def first_text(t: str) -> None:
        wait.stop()
        on_text(t)
    kw = {} if server else {"on_progress": _progress(wait, full=mode == "full")}
    try:
        ans = kv.ask(item["q"], item["skills"], mode=mode, params=params, on_text=None if as_json else first_text,
                     repair=repair, **kw)
    finally:
        wait.stop()
    if as_json:
        print_json(ans.to_json())
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(_status(ans), markup=False, style="dim", soft_wrap=True)
    _flag_truncated(ans, max_tokens)
