"""`skillkv eval`: how close every mode stays to a full prefill, on facts no model can know (issue 4).

The evaluation set (eval/compose): skills/ holds invented skills (tools, codes, numbers that exist nowhere else);
questions.jsonl one question per line: {"id", "q", "skills": [in prompt order], "needs": [...], "expect": [facts]}.
A question counts as answered when every expected fact appears in the answer (case-insensitive, not inside a
longer word or number).

For each question, the reference is full mode: the whole prompt prefilled from scratch, then a greedy answer A of
at most `max_tokens` tokens, recording the logits at every step. Every other mode then prefills its own prefix and
the question, and is teacher-forced along A (one forward of A's tokens), which gives its logits at the same
positions (the first token, after each token of A, and the end-of-turn position if full stopped there):
  kl_first     KL(full || mode) of the first-token distributions
  kl_mean      the same, averaged over the teacher-forced positions
  top1         fraction of positions where the mode's argmax is full's token (pooled over questions)
  identical    fraction of questions where the mode's greedy answer equals full's. Greedy decoding along A is
               deterministic, so it equals A exactly when every teacher-forced argmax agrees (up to max_tokens);
               no decoding is needed for those.
  facts        fact accuracy of the mode's own greedy answer (decoded only where it differs from full's)
  ttft_ms      first-token time with the skills resident in memory: exact = question over the stored chain;
               compose = placement + repair + question; full = the whole prompt; none = preamble + question
  recomputed   fraction of skill tokens recomputed by compose's repair
Modes: full, exact (must be identical: a check of the harness), none (no skills: how much the skills matter),
and compose at each repair setting. Compose only differs from exact with two or more skills, so the compose
rows (and the fidelity record for `auto` mode, skillkv.compose.fidelity) use the multi-skill questions; `reverse` adds
every multi-skill question again with its skills in reverse order (order independence).

Snapshots are compiled into a temporary store (the evaluation's skills never mix with yours); the fidelity record
goes into `store` (the model's folder there), where `skillkv ask --mode auto` reads it.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from skillkv.compose import fidelity
from skillkv.compose.repair import Repair
from skillkv.generate import SamplingParams
from skillkv.sched.request import Req
from skillkv.errors import SkillkvError

DEFAULT_SET = Path(__file__).resolve().parents[2] / "eval" / "compose"
DEFAULT_SETTINGS = "plain,plain+d0.15,plain+r0.15,0,r0.1,r0.15"
SECTION = "compose"  # the default model's docs section; another model family gets its own (e.g. compose-gemma)
BEGIN, END = "<!-- compose:begin -->", "<!-- compose:end -->"


def markers(section: str = SECTION) -> tuple[str, str]:
    """The begin/end comments of a docs section: `<!-- {section}:begin -->`, `<!-- {section}:end -->`."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", section or ""):
        raise SkillkvError(f"bad docs section name {section!r} (lower-case letters, digits and '-')")
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"


@dataclass
class Item:
    id: str
    q: str
    skills: list[str]
    needs: list[str]
    expect: list[str]


def load_items(folder: Path) -> list[Item]:
    path = Path(folder) / "questions.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SkillkvError(f"cannot read {path} ({e.strerror or e})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            items.append(Item(d["id"], d["q"], list(d["skills"]), list(d.get("needs", d["skills"])),
                              list(d["expect"])))
        except (ValueError, KeyError, TypeError):
            raise SkillkvError(f"{path}:{n}: needs id, q, skills, expect") from None
    return items


def parse_settings(text: str) -> list[Repair]:
    """'0,lead4,r0.1,lead16+r0.15,plain+d0.15+p3' -> Repair settings: '0' no repair, leadN, rF (recompute F,
    front tokens), dF (recompute F by value deviation), pN (deviation's probe layer N), plain (later skills from
    their single-skill snapshots instead of their neighbour snapshots)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lead, frac, select, probe, neighbour = 0, 0.0, "front", 1, True
        for term in part.split("+"):
            try:
                if term == "0":
                    continue
                if term == "plain":
                    neighbour = False
                    continue
                if term.startswith("lead"):
                    lead = int(term[4:])
                elif term[:1] in ("r", "d"):
                    frac, select = float(term[1:]), ("front" if term[0] == "r" else "deviation")
                elif term.startswith("p"):
                    probe = int(term[1:])
                else:
                    raise ValueError
            except ValueError:
                raise SkillkvError(f"bad repair setting {part!r} (use e.g. 0, lead16, r0.1, lead16+r0.15, "
                                   "d0.15+p3)") from None
        out.append(Repair(lead=lead, recompute=frac, select=select, probe_layer=probe, neighbour=neighbour))
    return out


def has_fact(text: str, fact: str) -> bool:
    return re.search(r"(?<![0-9A-Za-z])" + re.escape(fact) + r"(?![0-9A-Za-z])", text, re.I) is not None


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


class Evaluator:
    """Runs the modes of one question on one SkillKV (its runner and snapshots): every mode opens its prefix with
    SkillKV.open, so full mode is cut into the same pieces exact mode caches (the two agree bit for bit)."""

    def __init__(self, kv, max_tokens: int = 32):
        self.kv, self.runner, self.max_tokens = kv, kv.runner, max_tokens
        self.loop = kv.make_loop()

    def _answer(self, open_: Callable[[], tuple[object, dict]], q_ids: list[int]):
        """The greedy answer on the engine loop (the one decode of ask and serve) over the prefix `open_()` opens,
        with the logits each token was chosen from."""
        def opener(req) -> None:
            req.seq, req.compose = open_()
            req.pending = list(q_ids)
        req = Req(list(q_ids), SamplingParams(max_tokens=self.max_tokens), self.max_tokens, opener=opener, logits=[])
        return self.loop.run(req)

    def full(self, chosen: list, q_ids: list[int]) -> dict:
        t0 = time.perf_counter()
        req = self._answer(lambda: (self.kv.open(chosen, "full").seq, {}), q_ids)
        logits = torch.stack(req.logits)  # one per answer token, and the stop token's
        return {"answer": list(req.output), "text": req.text, "logits": logits, "ttft": req.t_first - t0}

    def mode(self, ref: dict, q_ids: list[int], open_: Callable[[], tuple[object, dict]]) -> dict:
        """`open_()` -> (sequence over the mode's prefix, info); timed together with the question's prefill."""
        t0 = time.perf_counter()
        seq, info = open_()
        try:
            first = self.runner.prefill([seq], [q_ids])[0]
            ttft = time.perf_counter() - t0
            a, n = ref["answer"], ref["logits"].shape[0]
            tf = self.runner.prefill([seq], [a], every=True) if a else first[None][:0]
            logits = torch.cat([first[None], tf])[:n]
        finally:
            self.runner.release(seq)
        agree = logits.argmax(-1) == ref["logits"].argmax(-1)
        kl = _kl(ref["logits"], logits)
        identical = bool(agree.all())
        text = ref["text"]
        if not identical:
            text = self._answer(open_, q_ids).text
        return {"kl_first": float(kl[0]), "kl_mean": float(kl.mean()), "agree": int(agree.sum()), "positions": n,
                "identical": identical, "text": text, "ttft": ttft, **info}


def _summary(rows: list[dict]) -> dict:
    pos = sum(r["positions"] for r in rows)
    return {"questions": len(rows), "kl_first": statistics.fmean(r["kl_first"] for r in rows),
            "kl_mean": statistics.fmean(r["kl_mean"] for r in rows),
            "top1": sum(r["agree"] for r in rows) / pos if pos else 0.0,
            "identical": statistics.fmean(r["identical"] for r in rows),
            "facts": statistics.fmean(r["fact"] for r in rows),
            "ttft_ms": statistics.median(r["ttft"] for r in rows) * 1e3,
            "recomputed": statistics.fmean(r.get("recomputed", 0.0) for r in rows)}


def run_eval(kv_factory: Callable[[Path], object], eval_set: Path = DEFAULT_SET, settings: list[Repair] | None = None,
             limit: int | None = None, max_tokens: int = 32, reverse: bool = True,
             progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate every mode; returns {"summary": {group: {mode: metrics}}, "rows": [...], ...}.

    `kv_factory(store_dir)` makes the SkillKV to use over the evaluation's skills and a scratch store."""
    settings = settings if settings is not None else parse_settings(DEFAULT_SETTINGS)
    items = load_items(eval_set)[:limit] if limit else load_items(eval_set)
    if reverse:
        items += [Item(i.id + "-rev", i.q, i.skills[::-1], i.needs, i.expect) for i in items if len(i.skills) > 1]
    with tempfile.TemporaryDirectory(prefix="skillkv-eval-") as tmp:
        kv = kv_factory(Path(tmp))
        kv.compile()
        ev = Evaluator(kv, max_tokens)
        rows = []
        for n, it in enumerate(items, 1):
            chosen = kv.pick(it.skills)
            layout = kv.builder.layout(chosen, it.q)
            q_ids = layout.segments[-1]
            kv.check_fits(len(layout.ids), max_tokens, len(q_ids))
            kv.runner.release(kv.open(chosen, "exact").seq)  # exact chain resident (computed and stored once)
            ref = ev.full(chosen, q_ids)
            group = ("multi-reversed" if it.id.endswith("-rev") else "multi") if len(chosen) > 1 else "single"
            modes: dict[str, Callable] = {
                "exact": lambda: (kv.open(chosen, "exact").seq, {}),
                "none": lambda: (kv.open([], "exact").seq, {}),
            }
            if len(chosen) > 1:
                for r in settings:
                    def build(r=r):
                        o = kv.open(chosen, "compose", r)
                        return o.seq, {"recomputed": len(o.info["recomputed"]) / o.info["skill_tokens"]}
                    modes[r.label] = build
            if group == "multi-reversed":
                modes.pop("exact"), modes.pop("none")
            out = {"full": {"kl_first": 0.0, "kl_mean": 0.0, "agree": ref["logits"].shape[0],
                            "positions": ref["logits"].shape[0], "identical": True, "text": ref["text"],
                            "ttft": ref["ttft"]}}
            for name, build in modes.items():
                out[name] = ev.mode(ref, q_ids, build)
            for name, r in out.items():
                r["fact"] = all(has_fact(r["text"], f) for f in it.expect)
                rows.append({"id": it.id, "group": group, "mode": name, "skills": it.skills, "expect": it.expect,
                             **{k: v for k, v in r.items()}})
            if progress:
                progress(f"[{n}/{len(items)}] {it.id}: full {'ok' if out['full']['fact'] else 'miss'} | " + ", ".join(
                    f"{m} {r['agree']}/{r['positions']}" for m, r in out.items() if m != "full"))
        summary: dict[str, dict] = {}
        for g in ("single", "multi", "multi-reversed", "all"):
            sel = [r for r in rows if g == "all" and not r["group"].endswith("reversed") or r["group"] == g]
            names = list(dict.fromkeys(r["mode"] for r in sel))
            if sel:
                summary[g] = {m: _summary([r for r in sel if r["mode"] == m]) for m in names}
        try:
            shown = str(Path(eval_set).resolve().relative_to(Path.cwd()))
        except ValueError:
            shown = str(eval_set)
        return {"model": kv.handle.name, "fingerprint": kv.handle.fingerprint,
                "weights_id": kv.handle.weights_id, "eval_set": shown,
                "questions": len(items), "max_tokens": max_tokens,
                "settings": [r.to_json() | {"label": r.label} for r in settings], "summary": summary, "rows": rows}


def fidelity_record(result: dict, settings: list[Repair]) -> dict:
    """The record `auto` mode reads (skillkv.compose.fidelity), from the multi-skill questions of `result`: a setting's
    numbers are the worse of the labelled and the reversed skill order (when both ran), so a setting that passes
    does so in either order."""
    multi = result["summary"].get("multi", {})
    rev = result["summary"].get("multi-reversed", {})
    full = multi.get("full", {}).get("facts", 0.0)
    out = []
    for r in settings:
        m = multi.get(r.label)
        if m:
            runs = [m] + ([rev[r.label]] if r.label in rev else [])
            top1, facts = min(x["top1"] for x in runs), min(x["facts"] for x in runs)
            recomputed = max(x["recomputed"] for x in runs)
            out.append({"repair": r.to_json(), "top1": top1, "fact_accuracy": facts, "recomputed": recomputed,
                        "passes": fidelity.passes(top1, facts, full, recomputed)})
    return {"fingerprint": result["fingerprint"], "weights_id": result.get("weights_id", ""),
            "model": result["model"], "eval_set": result["eval_set"],
            "questions": multi.get("full", {}).get("questions", 0), "full_fact_accuracy": full, "settings": out}


def markdown(result: dict, machine: dict | None = None, command: str = "make eval", section: str = SECTION) -> str:
    """The docs/EVAL.md section between the markers of `section`. The default section (the default model) ends
    with the method notes; another section (a second model family) is titled with its model."""
    s = result["summary"]

    def table(group: str) -> list[str]:
        lines = ["| mode | KL first token | KL mean (32 tok) | top-1 agreement | identical greedy | fact accuracy | "
                 "first token ms (median) | skill tokens recomputed |", "|---|---|---|---|---|---|---|---|"]
        for m, x in s[group].items():
            lines.append(f"| {m} | {max(x['kl_first'], 0.0):.4f} | {max(x['kl_mean'], 0.0):.4f} | "
                         f"{x['top1']:.3f} | {x['identical']:.0%} | "
                         f"{x['facts']:.0%} | {x['ttft_ms']:.0f} | {x['recomputed']:.1%} |")
        return lines

    reps = [Repair.from_json({k: v for k, v in st.items() if k != "label"}) for st in result["settings"]]
    rec = fidelity_record(result, reps)
    best = fidelity.best_setting(rec)
    mc = machine or {}
    begin, end = markers(section)
    title = ("## Composition: fidelity of every mode against a full prefill" if section == SECTION else
             f"## Composition on a second model family: `{result['model']}`")
    out = [begin, title, "",
           f"`{command}` (`skillkv eval`, skillkv/evaluate.py) on `eval/compose/`: 6 invented skills (tools, codes, "
           f"numbers that exist nowhere else, ~310-390 tokens each) and {result['questions']} question runs, model "
           f"`{result['model']}` (fp32, CPU). Reference: full prefill and its greedy answer (at most "
           f"{result['max_tokens']} tokens); other modes are teacher-forced along it. Definitions in the module "
           "docstring. First-token times: "
           f"{mc.get('cpu', 'CPU')}, torch threads: {mc.get('torch_threads', '?')}, **shared with other developers: "
           f"noisy**; rerun `{command}` on an idle machine for timings.", ""]
    if "multi" in s:
        n = s["multi"]["full"]["questions"]
        out += [f"### Multi-skill questions ({n}, skills in the labelled order)", ""] + table("multi") + [""]
    if "multi-reversed" in s:
        n = s["multi-reversed"]["full"]["questions"]
        out += [f"### The same questions with the skills in reverse order ({n})", ""] + table("multi-reversed") + [""]
    if "single" in s:
        n = s["single"]["full"]["questions"]
        out += [f"### Single-skill questions ({n}; compose is exact there)", ""] + table("single") + [""]
    if "multi" in s and "multi-reversed" in s:
        pairs = [(m, s["multi"][m]["top1"], s["multi-reversed"][m]["top1"], s["multi"][m]["facts"],
                  s["multi-reversed"][m]["facts"]) for m in s["multi"] if m in s["multi-reversed"] and m != "full"]
        out += ["Order independence (top-1 / fact accuracy, labelled order vs reversed): " + "; ".join(
            f"{m}: {a:.3f} / {b:.3f}, {c:.0%} / {d:.0%}" for m, a, b, c, d in pairs) + ".", ""]
    budget = [(m, x) for m, x in s.get("multi", {}).items() if m.startswith("compose")
              and x["recomputed"] <= fidelity.MAX_RECOMPUTE]
    if budget:
        m, x = max(budget, key=lambda t: t[1]["top1"])
        out += [f"Best within the {fidelity.MAX_RECOMPUTE:.0%} recompute budget: `{m}` (top-1 {x['top1']:.3f}, "
                f"{x['identical']:.0%} identical answers, fact accuracy {x['facts']:.0%} vs full's "
                f"{s['multi']['full']['facts']:.0%}).", ""]
    out += ["### Policy", "",
            f"Bar: top-1 >= {fidelity.MIN_TOP1}, fact accuracy >= {fidelity.MIN_FACT_RATIO:.0%} of full's, <= "
            f"{fidelity.MAX_RECOMPUTE:.0%} of skill tokens recomputed (multi-skill questions). "
            + (f"Met by `{best.label}`: `--mode auto` composes with it for this model." if best else
               "**No setting meets it on this model**, so `--mode auto` uses exact mode (computing and storing "
               "the combination) whenever the ordered combination is not stored yet."), "",
            *(NOTES if section == SECTION else []), end]
    return "\n".join(out)


NOTES = [
    "### Second model family (Gemma 3 270M)", "",
    "Measured: see the section below (`make eval-gemma`, evaluation only under the Gemma terms).", "",
    "### Method notes", "",
    "Placement: the first skill comes from its exact single-skill snapshot ([preamble][skill]); every later skill "
    "from its *neighbour snapshot*, compiled once per skill after the preamble and a fixed stand-in skill, the "
    "reference of an invented tool (~430 tokens, `skillkv.compose.NEIGHBOUR`), so its tokens were encoded with a skill before "
    "them, as they are in the composed prompt (`plain` rows: from the single-skill snapshots instead). Keys are "
    "re-rotated by the position delta with the model's own rotary module (exact for RoPE types whose frequencies "
    "do not depend on the length: default, linear, llama3, yarn; tested against keys computed at the new "
    "positions). Repair: `lead N` recomputes the first N tokens of every later skill (EPIC); `recompute F` "
    "recomputes F of all skill tokens, the leading tokens of every later skill, spread evenly (front selection, "
    "the default), or `by deviation` the tokens whose values at layer 1 deviate most from a true prefill "
    "(CacheBlend; the probe runs one layer over the whole prompt). Recomputed tokens attend to the real preceding "
    "context in one pass (a custom mask on transformers; on the paged engine front runs are a batched prefill over "
    "the request's pages). The fraction is over all skill tokens (the first skill's are exact and never chosen). "
    "The fidelity record that `--mode auto` follows takes the worse of the two skill orders.",
    "",
    "Selection study (the 20 multi-skill questions in labelled order, plain snapshots, top-1 at a 15% budget; a "
    "development experiment, not part of `make eval`): deviation at probe layer 1 / 2 / 4: 0.957 / 0.961 / 0.963; "
    "attention of the question to the skill tokens: 0.965; attention x deviation: 0.965; an oracle ranking tokens "
    "by their true KV error over all layers: 0.973; front tokens: 0.975. Front tokens beat even the oracle: "
    "recomputing a contiguous run also fixes the context that the run's later tokens attend to. The stand-in "
    "skill was chosen without the evaluation's questions: among three texts, the one whose neighbour snapshots "
    "come closest to a true prefill on the project's own skills/ (`eval/neighbour_criterion.py`: mean relative KV "
    "error 0.130 vs 0.136 for generic answering guidelines and 0.152 without a stand-in). In a development run an "
    "excerpt of skills/git-commit-messages as the stand-in gave 0.988 / 0.983 top-1 at 15% front tokens; it was "
    "not adopted, because picking it would have meant choosing on these questions.",
    "",
    "Margin (default model). The passing setting clears the top-1 bar by 0.002 in the labelled order (about one of "
    "the 487 teacher-forced positions). A run in which the budget was rounded instead of floored (up to one more "
    "recomputed token per question, 15.1%, over the budget) gave 0.979 / 0.985: the pass is real but marginal, "
    "within the variation that the exact choice of tokens causes. `auto` follows the record as measured; rerun "
    "`make eval` after changing the model, the preamble or `NEIGHBOUR`.",
]


def write_section(doc: Path, section: str, name: str = SECTION) -> None:
    """Replace the text between the markers of section `name` in `doc` with `section` (which carries the markers
    itself); append it if they are absent. Other sections are left as they are."""
    begin, end = markers(name)
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if begin in text and end in text:
        a, rest = text.split(begin, 1)
        text = a + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)
