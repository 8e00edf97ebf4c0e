"""Where composition deviates, and how the facts fare: a complement to `skillkv eval` (docs/EVAL.md).

    .venv/bin/python eval/compose_layers.py --model MODEL [--limit N] [--out FILE.json]

On the multi-skill questions of eval/compose (skills in the labelled order), for every compose repair setting of
`skillkv eval` (DEFAULT_SETTINGS):
  per layer     the relative deviation ||KV_compose - KV_exact|| / ||KV_exact|| of keys and values over the rows of
                the later skills (the preamble and the first skill are exact by construction), with the layer's
                attention type (sliding window or full) — which layers' KV deviate, and how repair reduces it;
  fact-forced   the expected fact teacher-forced after the question (the tokens of `expect`, joined by ", "): the
                mean log-probability of its tokens, the KL to full mode and the top-1 agreement with full over
                those positions, for full, exact, none (no skills) and each compose setting. Unlike `skillkv eval`,
                whose positions follow full's own greedy answer, these positions depend on the skills by
                construction, so they stay informative for a model whose greedy answer does not use them (a base
                model that continues by copying the prompt).
Prints Markdown tables; --out writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from skillkv.measure.evaluate import DEFAULT_SET, DEFAULT_SETTINGS, load_items, parse_settings  # noqa: E402
from skillkv.model import layer_windows  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def fact_forced(kv, prefix, ids: list[int], fact: list[int]) -> torch.Tensor:
    """Log-probabilities [len(fact), vocab] predicting each fact token after `prefix` + `ids`."""
    runner = kv.runner
    cache = runner.new_cache(prefix or None)
    x = torch.tensor([ids + fact[:-1]], dtype=torch.long, device=runner.device)
    with torch.inference_mode():
        out = runner.model(input_ids=x, use_cache=True, logits_to_keep=len(fact), **{runner._cache_kw: cache})
    return torch.log_softmax(out.logits[0].float(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=None, help="only the first N multi-skill questions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from skillkv.api import SkillKV

    items = [i for i in load_items(DEFAULT_SET) if len(i.skills) > 1][: a.limit]
    settings = parse_settings(DEFAULT_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="skillkv-layers-") as tmp:
        kv = SkillKV(model=a.model, store=Path(tmp), skills=DEFAULT_SET / "skills", device="cpu")
        cfg = kv.handle.hf_config
        kinds = ["sliding" if w else "full" for w in layer_windows(cfg)]
        dev = {r.label: {"k": [[] for _ in kinds], "v": [[] for _ in kinds]} for r in settings}
        forced: dict[str, dict[str, list[float]]] = {}
        pre = kv.builder.preamble_ids()
        for n, it in enumerate(items, 1):
            chosen = kv.pick(it.skills)
            q_ids = kv.builder.question_ids(it.q)
            fact = kv.builder.encode(", ".join(it.expect))
            exact = kv.prefix(chosen)[0]
            start = len(pre) + len(kv.builder.skill_ids(chosen[0]))  # the later skills' first row
            modes = {"full": ([], pre + [t for s in chosen for t in kv.builder.skill_ids(s)] + q_ids),
                     "exact": (exact, q_ids), "none": ([], pre + q_ids)}
            for r in settings:
                ckv, _ = kv.composed(chosen, r)
                for i, ((k, v), (ek, ev)) in enumerate(zip(ckv, exact)):
                    dev[r.label]["k"][i].append(_rel(k[start:], ek[start:]))
                    dev[r.label]["v"][i].append(_rel(v[start:], ev[start:]))
                modes[r.label] = (ckv, q_ids)
            ref = None
            for name, (prefix, ids) in modes.items():
                lp = fact_forced(kv, prefix, ids, fact)
                ref = lp if ref is None else ref
                tgt = torch.tensor(fact)
                m = forced.setdefault(name, {"logp": [], "kl": [], "agree": [], "n": []})
                m["logp"].append(float(lp[torch.arange(len(fact)), tgt].mean()))
                m["kl"].append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
                m["agree"].append(int((lp.argmax(-1) == ref.argmax(-1)).sum()))
                m["n"].append(len(fact))
            print(f"[{n}/{len(items)}] {it.id}", file=sys.stderr, flush=True)
    layers = {lab: {"key": [statistics.fmean(x) for x in d["k"]], "value": [statistics.fmean(x) for x in d["v"]]}
              for lab, d in dev.items()}
    summary = {name: {"logp": statistics.fmean(m["logp"]), "kl": statistics.fmean(m["kl"]),
                      "top1": sum(m["agree"]) / sum(m["n"])} for name, m in forced.items()}
    res = {"model": kv.handle.name, "questions": len(items), "layer_kinds": kinds, "layers": layers,
           "fact_forced": summary}
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"Per-layer relative deviation of compose's KV from the exact chain's, later skills' rows, mean over "
          f"{len(items)} multi-skill questions, model `{kv.handle.name}` (value / key):\n")
    print("| layer | type | " + " | ".join(layers) + " |")
    print("|---|---|" + "---|" * len(layers))
    for i, kind in enumerate(kinds):
        print(f"| {i} | {kind} | " + " | ".join(f"{x['value'][i]:.3f} / {x['key'][i]:.3f}" for x in layers.values())
              + " |")
    for kind in dict.fromkeys(kinds):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        print(f"| mean | {kind} | " + " | ".join(
            f"{statistics.fmean(x['value'][i] for i in sel):.3f} / {statistics.fmean(x['key'][i] for i in sel):.3f}"
            for x in layers.values()) + " |")
    print("\nFact-forced (the expected fact teacher-forced after the question):\n")
    print("| mode | mean log-prob of the fact tokens | KL to full | top-1 agreement with full |")
    print("|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['logp']:.3f} | {max(s['kl'], 0.0):.4f} | {s['top1']:.3f} |")


if __name__ == "__main__":
    main()
