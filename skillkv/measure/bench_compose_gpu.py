"""GPU benchmark of compose mode on the paged engine (issue 4 goal: compose first-token time <= 1.3x exact mode with
the same skills resident; GPU, Llama-3.1-8B shape, 4 skills of 5k tokens).

    python -m skillkv.measure.bench_compose_gpu --out DIR [--skills 4] [--skill-tokens 5000] [--reps 20]
    python -m skillkv.measure.bench_compose_gpu --out /tmp/x --tiny               # CPU smoke test (dummy:tiny, torch)

`dummy:llama-3.1-8b` weights (random, seeded) in bf16, FlashInfer attention, CUDA graphs as the engine uses them,
random token ids for a preamble, the skills and a question of 32 tokens, as skillkv.measure.bench_gpu does. Every skill's
single-skill snapshot ([preamble][skill]) is computed by the engine and made resident (L1); so is the exact KV of
the 4-skill chain ([preamble][s1]..[s4], one entry, what exact mode serves from L1). Medians of `reps` timed runs
after warm-up, device synchronized around each run (bench_gpu.timed_ms); a run = open the request, prefill the
question (its logits are the first token), finish:
  exact             the resident chain entry
  compose           compose over the resident single-skill entry of s1 and the resident placed entries of s2..s4
                    (engine/compose_paged.py), no repair
  compose_first     the same with the placed entries evicted before each run (untimed): placement from the
                    resident single-skill entries (gather, re-rotate, store: one copy per skill) is timed
  compose_lead32    compose, then repair of the first 32 tokens of every later skill (copy-on-write of the
                    touched pages, the runs prefilled by the engine in one batch), then the question
  compose_front15   the same with --mode compose's default repair (recompute 0.15, front: 15% of the skill tokens,
                    the leading ones of every later skill; 3,000 tokens here)
  compose_dev15     recompute 0.15 chosen by value deviation (CacheBlend): gather of the prefix, a one-layer probe
                    and the transformers recompute with a custom mask (the path deviation selection takes)
  compose_open_only opening and finishing the composed request without a question (compose's own overhead)
Checks: the composed request's KV equals skillkv.compose.place bit for bit; its logits vs the same KV as one
contiguous entry (same engine); compose vs exact logits (informational: compose is approximate; random weights).
Writes DIR/compose_gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from skillkv.measure.timing import kv_bytes_per_token, load_model, rel_err, sync, timed_ms, versions


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--skills", type=int, default=4)
    ap.add_argument("--skill-tokens", type=int, default=5000)
    # 37: every skill boundary (37 + i * 5000) and the prefix's end fall inside a page of 16, the most copying case
    ap.add_argument("--preamble-tokens", type=int, default=37)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--attention", default="flashinfer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: dummy:tiny, fp32, torch attention, "
                    "4 skills of 45 tokens, 2 reps")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.attention, args.device, args.dtype = "dummy:tiny", "torch", "cpu", "float32"
        args.skill_tokens, args.preamble_tokens, args.question_tokens = 45, 7, 8
        args.reps, args.warmup, args.page_size = 2, 1, 4
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    from skillkv.compose.repair import Repair, needs_probe, select_positions
    from skillkv.engine.paged import PagedEngine
    from skillkv.engine.placed import PagedComposer, placed_key
    from skillkv.runners.base import Part
    from skillkv.engine.rope import check_composable, place

    dtype = getattr(torch, args.dtype)
    h, model = load_model(args.model, args.device, dtype)
    cfg = model.config
    check_composable(cfg)
    kv_bytes_tok = kv_bytes_per_token(cfg, dtype)
    P, S, K, qn = args.preamble_tokens, args.skill_tokens, args.skills, args.question_tokens
    chain = P + K * S
    # single-skill entries + placed entries + the exact chain + a contiguous copy for the check + requests' pages
    budget = int((K * (P + S) + (K - 1) * S + 2 * chain + 64 * args.page_size * K) * kv_bytes_tok * 1.1) + (256 << 20)
    eng = PagedEngine(model, budget_bytes=budget, attention=args.attention, page_size=args.page_size)
    comp = PagedComposer(eng, model.model.rotary_emb)
    res = {**versions(cuda), "model": h.name, "dtype": args.dtype, "attention": eng.backend.name, "cuda_graphs": eng.graphs is not None,
           "page_size": args.page_size, "skills": K, "skill_tokens": S, "preamble_tokens": P, "question_tokens": qn,
           "prefix_tokens": chain, "reps": args.reps, "warmup": args.warmup, "pool_bytes": eng.pool.nbytes}

    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    pre, skills, q = rand(P), [rand(S) for _ in range(K)], rand(qn)

    def engine_kv(pieces: list[list[int]]) -> list:
        """The engine's exact KV of the concatenation of `pieces`, prefilled piece by piece (as compile does)."""
        r = eng.start(None)
        for ids in pieces:
            eng.prefill([r], [ids])
        kv = [eng.pool.gather(i, r.pages, r.length) for i in range(eng.pool.layers)]
        eng.finish(r)
        return kv

    t0 = time.perf_counter()
    snaps = []
    for i, ids in enumerate(skills):
        kv = engine_kv([pre + ids])
        snaps.append(kv)
        eng.make_resident(f"skill{i}", P + S, lambda kv=kv: kv, pin=True)
    exact_kv = engine_kv([pre + skills[0]] + skills[1:])
    eng.make_resident("exact", chain, lambda: exact_kv, pin=True)
    del exact_kv
    sync(dev)
    res["setup_s"] = time.perf_counter() - t0

    def never():
        raise RuntimeError("the benchmark keeps every single-skill entry resident")
    parts = [Part(f"skill{i}", P + S, P, never) for i in range(K)]
    ids = pre + [t for s in skills for t in s]
    starts = [0, P] + [P + i * S for i in range(1, K)]
    placed = [placed_key(f"skill{i}", P + i * S) for i in range(1, K)]

    def exact():
        r = eng.start("exact")
        out = eng.prefill([r], [q])[0]
        eng.finish(r)
        return out

    def composed(repair: Repair | None = None):
        r, _ = comp.open(parts, P)
        if repair is not None:  # as the compose stage does (skillkv.compose.stage)
            kv = comp.gather(r) if needs_probe(repair, starts) else None
            comp.prefill_runs(r, ids, select_positions(model, ids, kv, starts, repair))
        out = eng.prefill([r], [q])[0]
        eng.finish(r)
        return out

    def open_only():
        r, _ = comp.open(parts, P)
        eng.finish(r)

    def evict_placed():
        for key in placed:
            if key in eng.table.entries:
                eng.table.evict(key)

    # checks (first use places the entries)
    req, where = comp.open(parts, P)
    res["check"] = {"first_open_sources": where, "placements": comp.placements,
                    "request_private_pages": len(req.owned) + len(req.private), "request_pages": len(req.pages)}
    ref, _ = place(snaps, P, model.model.rotary_emb)
    got = comp.gather(req)
    res["check"]["placed_kv_bitwise_equal"] = all(torch.equal(a, b) and torch.equal(c, d)
                                                  for (a, c), (b, d) in zip(got, ref))
    del got
    c_logits = eng.prefill([req], [q])[0]
    eng.finish(req)
    eng.make_resident("contiguous", chain, lambda: ref)
    del ref
    r = eng.start("contiguous")
    whole = eng.prefill([r], [q])[0]
    eng.finish(r)
    eng.table.evict("contiguous")
    e_logits = exact()
    res["check"].update(compose_vs_contiguous_rel_err=rel_err(c_logits, whole),
                        compose_same_argmax_as_contiguous=int(c_logits.argmax()) == int(whole.argmax()),
                        compose_vs_exact_rel_err=rel_err(c_logits, e_logits),
                        compose_same_argmax_as_exact=int(c_logits.argmax()) == int(e_logits.argmax()))
    if cuda:
        torch.cuda.empty_cache()

    t = {}
    t["exact"], _ = timed_ms(exact, args.reps, args.warmup, dev)
    n0 = comp.placements
    t["compose"], _ = timed_ms(composed, args.reps, args.warmup, dev)
    res["check"]["placements_during_resident_runs"] = comp.placements - n0
    t["compose_open_only"], _ = timed_ms(open_only, args.reps, args.warmup, dev)  # no question: the overhead
    t["compose_first"], _ = timed_ms(composed, args.reps, args.warmup, dev, setup=evict_placed)
    composed()  # placed entries resident again for the repaired runs
    for name, rep in (("compose_lead32", Repair(lead=32)), ("compose_front15", Repair(recompute=0.15)),
                      ("compose_dev15", Repair(recompute=0.15, select="deviation"))):
        reps = max(3, args.reps // 2) if name != "compose_dev15" else 3
        t[name], _ = timed_ms(lambda rep=rep: composed(rep), reps, 1 if name == "compose_dev15" else args.warmup, dev)
    res["ttft_ms"] = t
    res["ratio_to_exact"] = {k: v / t["exact"] for k, v in t.items()}
    res["goal_compose_le_1.3x_exact"] = res["ratio_to_exact"]["compose"] <= 1.3
    eng.table.check()
    res["pool_within_budget"] = eng.pool.nbytes <= budget
    (args.out / "compose_gpu.json").write_text(json.dumps(res, indent=1))

    print(f"\n{res['gpu']} | torch {res['torch']} | flashinfer {res['flashinfer']} | {res['model']} {args.dtype} | "
          f"{K} skills x {S} tokens + {P} preamble, {qn}-token question, page {args.page_size}, "
          f"{'CUDA graphs' if res['cuda_graphs'] else 'eager'}")
    print(f"{'run':<18} {'TTFT ms':>9} {'x exact':>8}")
    for k, v in t.items():
        print(f"{k:<18} {v:9.2f} {res['ratio_to_exact'][k]:8.2f}")
    c = res["check"]
    print(f"placed KV == compose.place: {c['placed_kv_bitwise_equal']}; compose vs contiguous rel err "
          f"{c['compose_vs_contiguous_rel_err']:.2e}; placements while resident: "
          f"{c['placements_during_resident_runs']}; private pages per request {c['request_private_pages']} of "
          f"{c['request_pages']}; goal (compose <= 1.3x exact): {res['goal_compose_le_1.3x_exact']}")
    return res


if __name__ == "__main__":
    main()
