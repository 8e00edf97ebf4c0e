"""GPU benchmark of the paged engine (issue 3 scenarios), Llama-3.1-8B shape with `dummy:` weights, bf16.

    python -m skillkv.measure.bench_gpu --out DIR [--sizes 2048,8192,20480] [--reps 10] [--reader-threads 8]
    python -m skillkv.measure.bench_gpu --out /tmp/x --sizes 2048 --reps 2 --batch 8 --attention torch \
        --model dummy:tiny --device cpu                                   # CPU smoke test

Per skill size S (random prefix ids) and a 100-token question, medians of `reps` timed runs after warm-up,
all in one process and one run:
  full            transformers forward over S+100 tokens (SDPA), last-token logits only
  hf_prefix       transformers forward of the question over a DynamicCache holding the prefix KV
  engine_full     the engine's own full prefill of S+100 tokens: what a tier must beat ("recompute")
  l1              skillkv: prefix resident in the pool, question prefilled by the lean runner + attention backend
  host            host tier hit: snapshot in the pinned host cache -> pool, copies pipelined layer by layer with
                  the question's prefill (tiers/tiers.py, engine/page_in.py); host_transfer: the same without the question
  l2_none         L2 cold hit (page cache dropped with posix_fadvise): file -> pinned host buffer (reader threads,
                  crc per tensor) -> pool, pipelined with the question; l2_none_load: the same without the question
  l2_zstd         the same from a zstd snapshot (frames decompressed in the reader threads)
plus the raw disk read bandwidth of the same file (one thread, 64 MiB reads, as before; and with the reader
threads), the tier policy's measurements and crossovers (tiers/policy.py), correctness checks (lean vs
transformers logits, every tier vs a full prefill on the engine), and a batch of 1000 questions over a shared
prefix. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from skillkv.measure.timing import (disk_read_gbs, drop_cache, kv_bytes_per_token, load_model, rel_err, timed_ms,
                                     version_of, versions)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--sizes", default="2048,8192,20480")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--gemm", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reader-threads", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    from transformers import DynamicCache

    from skillkv.runners.paged import PagedRunner
    from skillkv.tiers.policy import Measurements, TierPolicy, disk_gbs, zstd_gbs
    from skillkv.tiers.tiers import Tiers
    from skillkv.snapshot import Snapshot
    from skillkv.store import Store

    sizes = [int(s) for s in args.sizes.split(",")]
    qn = 100
    dtype = getattr(torch, args.dtype)
    h, model = load_model(args.model, args.device, dtype)
    cfg = model.config
    vocab = cfg.vocab_size
    kv_bytes_tok = kv_bytes_per_token(cfg, dtype)
    budget = int(sum(sizes) * kv_bytes_tok * 1.2 + (args.batch // 10 + 8) * 128 * kv_bytes_tok + (1 << 30))
    runner = PagedRunner(model, budget, attention=args.attention, gemm=args.gemm)
    eng = runner.engine  # L1 rows time the engine itself; the tier rows go through the runner and the tiers
    import importlib.util

    comps = ("none", "zstd") if importlib.util.find_spec("zstandard") else ("none",)  # the FA3 wheel set has none
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    res = {**versions(cuda),
           "driver": (os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip()
                      if cuda else "-"),
           "fa3": version_of("tokenspeed-fa3"), "triton": version_of("triton"), "ops": eng.runner.ops.name,
           "gemm": eng.runner.linear.mode,
           "model": h.name, "attention": eng.backend.name, "page_size": 16, "pool_bytes": eng.pool.nbytes,
           "budget_bytes": budget, "question_tokens": qn, "dtype": args.dtype, "reps": args.reps,
           "reader_threads": args.reader_threads,
           "cpu_count": os.cpu_count(), "sizes": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "skillkv-bench-gpu"
    tmp.mkdir(parents=True, exist_ok=True)
    store = Store(tmp / "store", h.tag, h.fingerprint)
    host_budget = int(max(sizes) * kv_bytes_tok * 1.1) + (1 << 20)
    tiers = Tiers(store, host_budget, lambda: runner, reader_threads=args.reader_threads)
    ms = lambda fn, reps, warmup=2: timed_ms(fn, reps, warmup, dev)  # noqa: E731

    for S in sizes:
        print(f"size {S}", file=sys.stderr, flush=True)
        prefix = torch.randint(0, vocab, (S,), generator=g).tolist()
        q = torch.randint(0, vocab, (qn,), generator=g).tolist()
        all_ids = torch.tensor([prefix + q], device=dev)
        r = {}
        with torch.inference_mode():
            full_logits = model(input_ids=all_ids, logits_to_keep=1).logits[0, -1].float()
            r["full_ms"], _ = ms(lambda: model(input_ids=all_ids, logits_to_keep=1), args.reps)
            c = DynamicCache(config=cfg)
            model(input_ids=all_ids[:, :S], use_cache=True, **{cache_kw: c})
            kv = [(layer.keys[0].transpose(0, 1).contiguous(), layer.values[0].transpose(0, 1).contiguous())
                  for layer in c.layers]
            del c
            q_ids = all_ids[:, S:]

            def hf_prefix():
                cc = DynamicCache(config=cfg)
                for i, (k, v) in enumerate(kv):
                    cc.update(k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), i)
                return model(input_ids=q_ids, use_cache=True, logits_to_keep=1, **{cache_kw: cc}).logits
            hf_logits = hf_prefix()[0, -1].float()
            r["hf_prefix_ms"], _ = ms(hf_prefix, args.reps)

        key = f"p{S}"
        eng.make_resident(key, S, lambda: kv)

        def l1():
            req = eng.start(key)
            out = eng.prefill([req], [q])
            eng.finish(req)
            return out
        l1_logits = l1()[0]
        r["l1_ms"], _ = ms(l1, args.reps)
        if cuda:  # GPU time of the captured step, host time around it, kernel breakdown; GEMM choices side by side
            from skillkv.measure.profile_gpu import compare_gemm, gpu_step

            r["l1_profile"] = gpu_step(eng, l1, r["l1_ms"])
            if S == sizes[-1]:
                r["l1_gemm"] = compare_gemm(eng, l1, ms, args.reps)
        graphs, eng.graphs = eng.graphs, None  # the same, without CUDA graphs (eager kernel launches)
        l1_eager_logits = l1()[0]
        r["l1_eager_ms"], _ = ms(l1, args.reps)
        eng.graphs = graphs
        r["l1_graph_vs_eager_rel_err"] = rel_err(l1_logits, l1_eager_logits)

        def engine_full():
            req = eng.start(None)
            out = eng.prefill([req], [prefix + q])[0]
            eng.finish(req)
            return out
        # the engine's own full prefill: exact mode must pick the same token; also the "recompute" baseline
        eng_full = engine_full()
        r["engine_full_ms"], _ = ms(engine_full, args.reps)
        r["engine_full_tokens_per_s"] = (S + qn) / (r["engine_full_ms"] / 1e3)
        r["hf_full_tokens_per_s"] = (S + qn) / (r["full_ms"] / 1e3)
        r["check"] = {"lean_vs_hf_full_rel_err": rel_err(eng_full, full_logits),
                      "l1_vs_engine_full_rel_err": rel_err(l1_logits, eng_full),
                      "l1_same_argmax_as_engine_full": int(l1_logits.argmax()) == int(eng_full.argmax()),
                      "hf_prefix_vs_hf_full_rel_err": rel_err(hf_logits, full_logits)}
        eng.table.evict(key)

        # snapshots in the store (L2), one per compression
        snap = Snapshot(keys=[k.cpu() for k, _ in kv], values=[v.cpu() for _, v in kv], token_ids=prefix,
                        fingerprint=h.fingerprint, key="", skill="bench", content_hash="-")
        nbytes = snap.nbytes
        skeys = {}
        for comp in comps:
            snap.key = f"{S:08d}{comp[0]}".ljust(32, "0")
            t0 = time.perf_counter()
            e = store.put(snap, comp)
            r[f"write_{comp}_s"] = time.perf_counter() - t0
            r[f"file_{comp}_bytes"] = e.bytes
            skeys[comp] = snap.key
        path = {c: store.snap_dir / store.entries()[k].file for c, k in skeys.items()}
        r["disk_read_gbs"] = statistics.median(disk_read_gbs(path["none"]) for _ in range(3))
        r["disk_read_threads_gbs"] = disk_gbs(path["none"], args.reader_threads)
        del snap

        def hit(pieces, question=True):
            tiers.make_resident(key, pieces)
            if not question:
                runner.settle(key)
                return None
            seq = runner.open(key)
            out = runner.prefill([seq], [q])
            runner.release(seq)
            return out

        def unload():
            runner.settle(key)
            runner.retire(lambda k: k != key)

        # host tier: the snapshot in the pinned host cache (read once from L2), pipelined into the pool
        pieces = [(skeys["none"], prefix)]
        tiers.make_resident(key, pieces)
        unload()
        assert tiers.host.contains(skeys["none"])

        def host_load_only():
            hit(pieces, question=False)
            unload()
        r["host_transfer_ms"], _ = ms(host_load_only, args.reps)
        r["host_transfer_gbs"] = nbytes / (r["host_transfer_ms"] / 1e3) / 1e9

        def host_hit():
            out = hit(pieces)
            unload()
            return out
        r["host_ms"], _ = ms(host_hit, args.reps)
        r["host_same_argmax"] = int(host_hit()[0].argmax()) == int(eng_full.argmax())

        # L2 cold: page cache dropped, host cache emptied, pool entry evicted before every run
        for comp in comps:
            pieces = [(skeys[comp], prefix)]

            def cold():
                tiers.host.evict(skeys[comp])
                drop_cache(path[comp])

            def l2_load_only():
                cold()
                hit(pieces, question=False)
                unload()

            def l2_hit():
                cold()
                out = hit(pieces)
                unload()
                return out
            reps = max(3, args.reps // 3)
            r[f"l2_{comp}_load_ms"], times = ms(l2_load_only, reps, warmup=1)
            r[f"l2_{comp}_first_load_ms"] = times[0]  # includes pinned allocation on first use
            r[f"l2_{comp}_ms"], _ = ms(l2_hit, reps, warmup=1)
            size = r[f"file_{comp}_bytes"]
            r[f"l2_{comp}_gbs"] = size / (r[f"l2_{comp}_load_ms"] / 1e3) / 1e9
            r[f"l2_{comp}_same_argmax"] = int(l2_hit()[0].argmax()) == int(eng_full.argmax())
        r["l2_none_pct_of_disk"] = 100 * r["l2_none_gbs"] / r["disk_read_gbs"]
        if "zstd" in comps:
            r["zstd_ratio"] = r["file_zstd_bytes"] / r["file_none_bytes"]
        for comp in comps:
            path[comp].unlink()
        store.remove(list(skeys.values()))
        r["speedup_full_over_l1"] = r["full_ms"] / r["l1_ms"]
        r["speedup_hf_prefix_over_l1"] = r["hf_prefix_ms"] / r["l1_ms"]
        r["kv_bytes"] = nbytes
        res["sizes"][str(S)] = r
        (args.out / "gpu.json").write_text(json.dumps(res, indent=1))  # what a run that stops later leaves
        eng.make_resident(key, S, lambda: kv)  # the batch below runs over the largest prefix, resident
        del kv
        if cuda:
            torch.cuda.empty_cache()

    # tier policy from this run's numbers: load only when faster than recomputing; crossovers per tier
    per_tensor = max(sizes) * kv_bytes_tok // (2 * cfg.num_hidden_layers)
    zgbs, zratio = (zstd_gbs(dtype, nbytes=min(128 << 20, max(8 << 20, 2 * cfg.num_hidden_layers * per_tensor)),
                             threads=args.reader_threads, tensor_bytes=min(8 << 20, per_tensor))
                    if "zstd" in comps else (0.0, float("nan")))
    last = res["sizes"][str(sizes[-1])]
    m = Measurements(device=res["gpu"], bytes_per_token=kv_bytes_tok, disk_gbs=last["disk_read_threads_gbs"],
                     h2d_gbs=last["host_transfer_gbs"], zstd_gbs=zgbs,
                     prefill=[[float(int(s) + qn), rr["engine_full_ms"] / 1e3] for s, rr in res["sizes"].items()],
                     measured_at=time.time())
    pol = TierPolicy(m)
    res["policy"] = {"measurements": m.to_json(), "zstd_random_ratio": zratio,
                     "crossover_tokens": {"host": pol.crossover("host"), "l2_none": pol.crossover("l2")},
                     "decisions": {s: {"host": pol.should_load("host", int(s)),
                                       "l2_none": pol.should_load("l2", int(s), rr["file_none_bytes"])}
                                   for s, rr in res["sizes"].items()}}
    if "zstd" in comps:
        res["policy"]["crossover_tokens"]["l2_zstd"] = pol.crossover("l2", "zstd", last["zstd_ratio"])
        for s, rr in res["sizes"].items():
            res["policy"]["decisions"][s]["l2_zstd"] = pol.should_load("l2", int(s), rr["file_zstd_bytes"], "zstd")
    tiers.close()

    # a batch of questions over one shared prefix (the largest size), batched prefill of the questions
    S = sizes[-1]
    key = f"p{S}"
    qs = [torch.randint(0, vocab, (qn,), generator=g).tolist() for _ in range(args.batch)]
    chunk = 64

    def run_batch():
        for i in range(0, len(qs), chunk):
            reqs = [eng.start(key) for _ in qs[i:i + chunk]]
            eng.prefill(reqs, qs[i:i + chunk])
            for rq in reqs:
                eng.finish(rq)
    bms, _ = ms(run_batch, 3, warmup=1)
    full_q_s = 1e3 / res["sizes"][str(S)]["full_ms"]
    res["batch"] = {"questions": args.batch, "prefix_tokens": S, "chunk": chunk, "seconds": bms / 1e3,
                    "questions_per_s": args.batch / (bms / 1e3), "full_questions_per_s": full_q_s,
                    "speedup": args.batch / (bms / 1e3) / full_q_s,
                    "prefill_tokens_skillkv": args.batch * qn + S, "prefill_tokens_full": args.batch * (S + qn)}
    res["batch"]["prefill_token_ratio"] = res["batch"]["prefill_tokens_full"] / res["batch"]["prefill_tokens_skillkv"]
    res["pool_within_budget"] = eng.pool.nbytes <= budget
    res["host_cache"] = {"budget_bytes": host_budget, "held_bytes": tiers.host.nbytes, "within_budget":
                         tiers.host.nbytes <= host_budget}
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if cuda and stats is not None:  # pinned bytes torch really holds (its caching host allocator may round up)
        try:
            res["host_cache"]["torch_host_memory_stats"] = {k: v for k, v in stats().items() if "bytes" in k}
        except Exception as e:  # noqa: BLE001 - diagnostics only
            res["host_cache"]["torch_host_memory_stats"] = repr(e)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1))

    from skillkv.measure.gpu_report import summary

    print(summary(res))

if __name__ == "__main__":
    main()
