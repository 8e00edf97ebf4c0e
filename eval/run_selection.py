"""Evaluate skill selection on eval/selection.jsonl: precision, recall, no-skill accuracy and latency per method.

    .venv/bin/python eval/run_selection.py [--verbose]     # prints a Markdown table (docs/EVAL.md)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from skillkv import rank  # noqa: E402
from skillkv.select import choose_skills  # noqa: E402
from skillkv.skills import Skill, load_skills  # noqa: E402


def load_items() -> list[dict]:
    return [json.loads(x) for x in (REPO / "eval" / "selection.jsonl").read_text().splitlines() if x.strip()]


def synthetic(n: int, real: list[Skill]) -> list[Skill]:
    """`n` skills: the real ones plus distractors built from shuffled words of the real bodies (~500 words each)."""
    import random

    rnd = random.Random(0)
    words = " ".join(s.body for s in real).split()
    out = list(real)
    for i in range(n - len(real)):
        body = " ".join(rnd.choice(words) for _ in range(500))
        out.append(Skill(name=f"synthetic-{i:03d}", description=" ".join(rnd.choice(words) for _ in range(30)),
                         body=body, path=REPO))
    return out


def evaluate(select, items) -> dict:
    tp = fp = fn = 0
    none_ok = none_n = exact = 0
    misses = []
    for it in items:
        got = set(select(it["q"]))
        want = set(it["skills"])
        tp += len(got & want)
        fp += len(got - want)
        fn += len(want - got)
        exact += got == want
        if not want:
            none_n += 1
            none_ok += not got
        if got != want:
            misses.append((it["q"], sorted(want), sorted(got)))
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "no_skill_ok": none_ok / none_n if none_n else 1.0, "exact_sets": exact / len(items), "misses": misses}


def timing(select, items, reps=3) -> float:
    ts = []
    for _ in range(reps):
        for it in items:
            t0 = time.perf_counter()
            select(it["q"])
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), sorted(ts)[int(0.95 * len(ts))]


def main() -> None:
    verbose = "--verbose" in sys.argv
    items = load_items()
    skills = load_skills(REPO / "skills").skills
    big = synthetic(100, skills)
    methods = {}
    from skillkv.select import keyword_choose

    methods["keyword (previous)"] = lambda s: (lambda q: [x.name for x in keyword_choose(q, s)])
    for m in ("bm25", "embed", "fused"):
        if m != "bm25" and not rank.embedder_available():
            continue
        methods[m] = (lambda m: lambda s: (lambda q, r=rank.Ranker(s, m): [c.name for c in r.rank(q) if c.chosen]))(m)
    print(f"{len(items)} questions ({sum(1 for i in items if not i['skills'])} need no skill, "
          f"{sum(1 for i in items if len(i['skills']) == 2)} need two); {len(skills)} skills\n")
    print("| method | precision | recall | no-skill -> none | exact set | ms/question (6 skills) | "
          "ms/question (100 skills, median / p95) |")
    print("|---|---|---|---|---|---|---|")
    for name, make in methods.items():
        sel = make(skills)
        r = evaluate(sel, items)
        t6 = timing(sel, items)
        t100 = timing(make(big), items)
        print(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['no_skill_ok']:.0%} | "
              f"{r['exact_sets']:.0%} | {t6[0]:.2f} | {t100[0]:.2f} / {t100[1]:.2f} |")
        if verbose:
            for q, want, got in r["misses"]:
                print(f"    miss: {q!r} want {want} got {got}")


if __name__ == "__main__":
    main()
