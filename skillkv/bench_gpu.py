"""GPU benchmark of the paged engine (issue 3 scenarios), Llama-3.1-8B shape with `dummy:` weights, bf16.

    python -m skillkv.bench_gpu --out DIR [--sizes 2048,8192,20480] [--reps 10]

Per skill size S (random prefix ids) and a 100-token question, medians of `reps` timed runs after warm-up,
all in one process and one run:
  full            transformers forward over S+100 tokens (SDPA), last-token logits only
  hf_prefix       transformers forward of the question over a DynamicCache holding the prefix KV
  l1              skillkv: prefix resident in the pool, question prefilled by the lean runner + attention backend
  host            prefix in pinned host memory -> pool (one copy per layer and tensor), then the question
  l2_cold         snapshot file (page cache dropped with posix_fadvise) -> verify -> pool, then the question
  l2_zstd         the same from a zstd snapshot (per-layer frames decompressed in parallel threads)
plus the raw disk read bandwidth of the same file, correctness checks (lean vs transformers logits, L1 vs a
full prefill on the engine), and a batch of 1000 questions over a shared prefix. Writes JSON and prints a table.
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


def cuda_ms(fn, reps: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_gbs(path: Path) -> float:
    drop_cache(path)
    buf = bytearray(1 << 26)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    return n / (time.perf_counter() - t0) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--sizes", default="2048,8192,20480")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--attention", default="flashinfer")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import DynamicCache

    from skillkv.engine.paged import PagedEngine
    from skillkv.model import resolve_model
    from skillkv.snapshot import Snapshot, decode, write_snapshot

    sizes = [int(s) for s in args.sizes.split(",")]
    qn = 100
    h = resolve_model(args.model, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    model = h.load()
    torch.cuda.synchronize()
    print(f"model {h.name} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    cfg = model.config
    kv_bytes_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    budget = int(sum(sizes) * kv_bytes_tok * 1.2 + (args.batch // 10 + 8) * 128 * kv_bytes_tok + (1 << 30))
    eng = PagedEngine(model, budget_bytes=budget, attention=args.attention, page_size=16)
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    import flashinfer
    import transformers

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "flashinfer": flashinfer.__version__,
           "driver": os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip(),
           "model": h.name, "attention": eng.backend.name, "page_size": 16, "pool_bytes": eng.pool.nbytes,
           "budget_bytes": budget, "question_tokens": qn, "reps": args.reps, "sizes": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "skillkv-bench-gpu"
    tmp.mkdir(parents=True, exist_ok=True)

    for S in sizes:
        print(f"size {S}", file=sys.stderr, flush=True)
        prefix = torch.randint(0, 32000, (S,), generator=g).tolist()
        q = torch.randint(0, 32000, (qn,), generator=g).tolist()
        all_ids = torch.tensor([prefix + q], device="cuda")
        r = {}
        with torch.inference_mode():
            full_logits = model(input_ids=all_ids, logits_to_keep=1).logits[0, -1].float()
            r["full_ms"], _ = cuda_ms(lambda: model(input_ids=all_ids, logits_to_keep=1), args.reps)
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
            r["hf_prefix_ms"], _ = cuda_ms(hf_prefix, args.reps)

        key = f"p{S}"
        eng.make_resident(key, S, lambda: kv)

        def l1():
            req = eng.start(key)
            out = eng.prefill([req], [q])
            eng.finish(req)
            return out
        l1_logits = l1()[0]
        r["l1_ms"], _ = cuda_ms(l1, args.reps)
        graphs, eng.graphs = eng.graphs, None  # the same, without CUDA graphs (eager kernel launches)
        l1_eager_logits = l1()[0]
        r["l1_eager_ms"], _ = cuda_ms(l1, args.reps)
        eng.graphs = graphs
        r["l1_graph_vs_eager_rel_err"] = rel_err(l1_logits, l1_eager_logits)
        # the engine's own full prefill: exact mode must pick the same token
        req = eng.start(None)
        eng_full = eng.prefill([req], [prefix + q])[0]
        eng.finish(req)
        r["check"] = {"lean_vs_hf_full_rel_err": rel_err(eng_full, full_logits),
                      "l1_vs_engine_full_rel_err": rel_err(l1_logits, eng_full),
                      "l1_same_argmax_as_engine_full": int(l1_logits.argmax()) == int(eng_full.argmax()),
                      "hf_prefix_vs_hf_full_rel_err": rel_err(hf_logits, full_logits)}

        # host tier: pinned host copy of the prefix -> pool
        host = [(k.cpu().pin_memory(), v.cpu().pin_memory()) for k, v in kv]
        nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in host)

        def host_load_only():
            eng.table.evict(key)
            eng.make_resident(key, S, lambda: host)
        r["host_transfer_ms"], _ = cuda_ms(host_load_only, args.reps)
        r["host_transfer_gbs"] = nbytes / (r["host_transfer_ms"] / 1e3) / 1e9

        def host_hit():
            host_load_only()
            return l1()
        r["host_ms"], _ = cuda_ms(host_hit, args.reps)
        r["host_same_argmax"] = int(host_hit()[0].argmax()) == int(eng_full.argmax())

        # L2: snapshot files on disk
        snap = Snapshot(keys=[k for k, _ in host], values=[v for _, v in host], token_ids=prefix,
                        fingerprint=h.fingerprint, key=key, skill="bench", content_hash="-")
        for comp in ("none", "zstd"):
            path = tmp / f"{key}-{comp}.safetensors"
            t0 = time.perf_counter()
            size = write_snapshot(path, snap, comp)
            r[f"write_{comp}_s"] = time.perf_counter() - t0
            r[f"file_{comp}_bytes"] = size
            if comp == "none":
                r["disk_read_gbs"] = statistics.median(disk_read_gbs(path) for _ in range(3))

            def l2_hit(path=path):
                drop_cache(path)
                eng.table.evict(key)
                loaded = {}

                def load():
                    s = decode(path.read_bytes(), path.name)
                    loaded["kv"] = list(zip(s.keys, s.values))
                    return loaded["kv"]
                eng.make_resident(key, S, load)
                return l1()
            ms, _ = cuda_ms(l2_hit, max(3, args.reps // 3), warmup=1)
            r[f"l2_{comp}_ms"] = ms
            r[f"l2_{comp}_gbs"] = size / (ms / 1e3) / 1e9
            r[f"l2_{comp}_same_argmax"] = int(l2_hit()[0].argmax()) == int(eng_full.argmax())
            path.unlink()
        r["speedup_full_over_l1"] = r["full_ms"] / r["l1_ms"]
        r["speedup_hf_prefix_over_l1"] = r["hf_prefix_ms"] / r["l1_ms"]
        r["kv_bytes"] = nbytes
        res["sizes"][str(S)] = r
        del kv, host, snap
        torch.cuda.empty_cache()

    # a batch of questions over one shared prefix (the largest size), batched prefill of the questions
    S = sizes[-1]
    key = f"p{S}"
    qs = [torch.randint(0, 32000, (qn,), generator=g).tolist() for _ in range(args.batch)]
    chunk = 64

    def run_batch():
        for i in range(0, len(qs), chunk):
            reqs = [eng.start(key) for _ in qs[i:i + chunk]]
            eng.prefill(reqs, qs[i:i + chunk])
            for rq in reqs:
                eng.finish(rq)
    ms, _ = cuda_ms(run_batch, 3, warmup=1)
    full_q_s = 1e3 / res["sizes"][str(S)]["full_ms"]
    res["batch"] = {"questions": args.batch, "prefix_tokens": S, "chunk": chunk, "seconds": ms / 1e3,
                    "questions_per_s": args.batch / (ms / 1e3), "full_questions_per_s": full_q_s,
                    "speedup": args.batch / (ms / 1e3) / full_q_s,
                    "prefill_tokens_skillkv": args.batch * qn + S, "prefill_tokens_full": args.batch * (S + qn)}
    res["batch"]["prefill_token_ratio"] = res["batch"]["prefill_tokens_full"] / res["batch"]["prefill_tokens_skillkv"]
    res["pool_within_budget"] = eng.pool.nbytes <= budget
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1))

    print(f"\n{res['gpu']} | torch {res['torch']} | flashinfer {res['flashinfer']} | {res['model']} bf16")
    print(f"{'S':>6} {'full':>8} {'hf_pref':>8} {'L1':>7} {'host':>7} {'h2d GB/s':>8} {'L2':>7} {'L2 GB/s':>7} "
          f"{'disk':>6} {'L2zstd':>7} {'xfull':>6} {'xhf':>5} argmax")
    for S, r in res["sizes"].items():
        c = r["check"]
        print(f"{S:>6} {r['full_ms']:8.1f} {r['hf_prefix_ms']:8.1f} {r['l1_ms']:7.2f} {r['host_ms']:7.1f} "
              f"{r['host_transfer_gbs']:8.1f} {r['l2_none_ms']:7.0f} {r['l2_none_gbs']:7.2f} {r['disk_read_gbs']:6.2f} "
              f"{r['l2_zstd_ms']:7.0f} {r['speedup_full_over_l1']:6.1f} {r['speedup_hf_prefix_over_l1']:5.1f} "
              f"{c['l1_same_argmax_as_engine_full']} lean/hf={c['lean_vs_hf_full_rel_err']:.2e}")
    b = res["batch"]
    print(f"batch {b['questions']} q over {b['prefix_tokens']}: {b['questions_per_s']:.0f} q/s vs full "
          f"{b['full_questions_per_s']:.2f} q/s = {b['speedup']:.0f}x; prefill tokens {b['prefill_token_ratio']:.0f}x fewer")


if __name__ == "__main__":
    main()


def markdown(res: dict) -> str:
    """The GPU table for docs/BENCHMARKS.md from a gpu.json result."""
    lines = [f"{res['gpu']}, driver {res['driver']}, torch {res['torch']} (CUDA {res['cuda']}), transformers "
             f"{res['transformers']}, FlashInfer {res['flashinfer']}; model {res['model']} (random weights) in bf16, "
             f"attention backend `{res['attention']}`, page size {res['page_size']}, {res['question_tokens']}-token "
             f"question; medians of {res['reps']} runs after warm-up (L2: of {max(3, res['reps'] // 3)}). "
             f"Regenerate: `python -m skillkv.bench_gpu --out DIR` on the GPU machine.", "",
             "| skill tokens | full prefill | transformers prefix reuse | skillkv L1 | host tier (H2D GB/s) "
             "| L2 cold (GB/s; disk GB/s) | L2 zstd | L1 vs full | L1 vs prefix reuse | same token as engine's full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in res["sizes"].items():
        lines.append(
            f"| {int(s):,} | {r['full_ms']:.1f} ms | {r['hf_prefix_ms']:.1f} ms | {r['l1_ms']:.1f} ms | "
            f"{r['host_ms']:.1f} ms ({r['host_transfer_gbs']:.1f}) | {r['l2_none_ms']:.0f} ms ({r['l2_none_gbs']:.2f}; "
            f"{r['disk_read_gbs']:.2f}) | {r['l2_zstd_ms']:.0f} ms | {r['speedup_full_over_l1']:.1f}x | "
            f"{r['speedup_hf_prefix_over_l1']:.1f}x | {r['check']['l1_same_argmax_as_engine_full']} |")
    b = res["batch"]
    lines += ["", f"Batch: {b['questions']} questions over one shared {b['prefix_tokens']:,}-token prefix, prefilled "
              f"{b['chunk']} at a time: {b['questions_per_s']:.0f} questions/s vs {b['full_questions_per_s']:.2f} for "
              f"full prefill (**{b['speedup']:.0f}x**), {b['prefill_token_ratio']:.0f}x fewer prefill tokens."]
    return "\n".join(lines)
