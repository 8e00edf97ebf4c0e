"""Text of a bench_gpu result (gpu.json): the short table bench_gpu prints last, and the docs/BENCHMARKS.md GPU
table. Fields a run did not measure (zstd where zstandard is not installed, the profile on the CPU) show as '-'."""

from __future__ import annotations


def _f(v, fmt: str = ".1f", unit: str = "") -> str:
    return "-" if v is None or v != v else f"{v:{fmt}}{unit}"


def summary(res: dict) -> str:
    lines = [f"\n{res['gpu']} | driver {res.get('driver', '-')} | torch {res['torch']} | fa3 {res.get('fa3', '-')} | "
             f"flashinfer {res['flashinfer']} | triton {res.get('triton', '-')} | attention {res['attention']}, "
             f"ops {res.get('ops', '-')}, gemm {res.get('gemm', '-')} | {res['model']} {res.get('dtype', '')}",
             f"{'S':>6} {'full':>7} {'eng_full':>8} {'tok/s':>6} {'hf_pref':>7} {'L1':>6} {'L1 gpu':>6} "
             f"{'host':>5} {'xfull':>6} {'xhf':>5} {'hostT':>6} {'L2':>6} {'L2zstd':>6} same"]
    for s, r in res["sizes"].items():
        p = r.get("l1_profile", {})
        same = [r["check"]["l1_same_argmax_as_engine_full"], r.get("host_same_argmax"), r.get("l2_none_same_argmax"),
                r.get("l2_zstd_same_argmax", "-")]
        lines.append(f"{s:>6} {r['full_ms']:7.1f} {r['engine_full_ms']:8.1f} "
                     f"{_f(r.get('engine_full_tokens_per_s'), '.0f'):>6} {r['hf_prefix_ms']:7.1f} {r['l1_ms']:6.2f} "
                     f"{_f(p.get('gpu_ms'), '.2f'):>6} {_f(p.get('host_ms'), '.2f'):>5} "
                     f"{r['speedup_full_over_l1']:6.1f} {r['speedup_hf_prefix_over_l1']:5.1f} {r['host_ms']:6.1f} "
                     f"{r['l2_none_ms']:6.0f} {_f(r.get('l2_zstd_ms'), '.0f'):>6} {'/'.join(map(str, same))}")
        if p:
            cats = ", ".join(f"{k} {v:.2f}" for k, v in sorted(p["ms_by_category"].items(), key=lambda t: -t[1]))
            lines.append(f"       L1 profile (ms/step): {cats}; busy {p['busy_ms']:.2f}, gaps {p['gaps_ms']:.2f}, "
                         f"{p['kernels_per_step']:.0f} kernels")
        if "l1_gemm" in r:
            lines.append("       L1 by GEMM: " + ", ".join(f"{k} {v['wall_ms']:.2f} wall / {v['gpu_ms']:.2f} gpu"
                                                          for k, v in r["l1_gemm"].items()))
    b = res["batch"]
    lines.append(f"batch {b['questions']} q over {b['prefix_tokens']}: {b['questions_per_s']:.0f} q/s vs full "
                 f"{b['full_questions_per_s']:.2f} q/s = {b['speedup']:.0f}x; prefill tokens "
                 f"{b['prefill_token_ratio']:.0f}x fewer")
    lines.append(f"policy crossovers (tokens): {res['policy']['crossover_tokens']}")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """The GPU table for docs/BENCHMARKS.md from a gpu.json result."""
    lines = [f"{res['gpu']}, driver {res['driver']}, torch {res['torch']} (CUDA {res['cuda']}), transformers "
             f"{res['transformers']}, FlashAttention-3 {res.get('fa3', '-')}, FlashInfer {res['flashinfer']}, "
             f"Triton {res.get('triton', '-')}; model {res['model']} (random weights) in "
             f"{res.get('dtype', 'bfloat16')}; attention `{res['attention']}`, element-wise ops `{res.get('ops', '?')}`, "
             f"GEMMs `{res.get('gemm', '?')}`, page size {res['page_size']}, {res['question_tokens']}-token "
             f"question; medians of {res['reps']} runs after warm-up (L2: of {max(3, res['reps'] // 3)}); "
             f"{res.get('reader_threads', '?')} L2 reader threads on {res.get('cpu_count', '?')} CPUs. "
             f"Regenerate: `python -m skillkv.measure.bench_gpu --out DIR` on the GPU machine.", "",
             "| skill tokens | full prefill (transformers) | engine full prefill (compile; tokens/s) "
             "| transformers prefix reuse | skillkv L1 | L1: GPU + host | host tier (H2D GB/s) "
             "| L2 cold (load GB/s; % of disk) | L2 zstd | L1 vs full | L1 vs prefix reuse | same token as engine's full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in res["sizes"].items():
        p = r.get("l1_profile", {})
        same = all([r["check"]["l1_same_argmax_as_engine_full"], r.get("host_same_argmax", True),
                    r.get("l2_none_same_argmax", True), r.get("l2_zstd_same_argmax", True)])
        lines.append(
            f"| {int(s):,} | {r['full_ms']:.1f} ms | {r['engine_full_ms']:.1f} ms "
            f"({_f(r.get('engine_full_tokens_per_s'), ',.0f')}) | {r['hf_prefix_ms']:.1f} ms | **{r['l1_ms']:.2f} ms** "
            f"| {_f(p.get('gpu_ms'), '.2f')} + {_f(p.get('host_ms'), '.2f')} ms "
            f"| {r['host_ms']:.1f} ms ({r['host_transfer_gbs']:.1f}) "
            f"| {r['l2_none_ms']:.0f} ms ({r['l2_none_gbs']:.2f}; {r.get('l2_none_pct_of_disk', float('nan')):.0f}%) "
            f"| {_f(r.get('l2_zstd_ms'), '.0f', ' ms')} | {r['speedup_full_over_l1']:.1f}x "
            f"| {r['speedup_hf_prefix_over_l1']:.1f}x | {same} |")
    if "policy" in res:
        m, c = res["policy"]["measurements"], res["policy"]["crossover_tokens"]
        lines += ["", f"Tier policy from this run (disk {m['disk_gbs']:.2f} GB/s, host->GPU {m['h2d_gbs']:.1f} GB/s): "
                  "loading beats recomputing from "
                  + ", ".join(f"{k} {v:,} tokens" if v else f"{k} never" for k, v in c.items()) + "."]
    b = res["batch"]
    lines += ["", f"Batch: {b['questions']} questions over one shared {b['prefix_tokens']:,}-token prefix, prefilled "
              f"{b['chunk']} at a time: {b['questions_per_s']:.0f} questions/s vs {b['full_questions_per_s']:.2f} for "
              f"full prefill (**{b['speedup']:.0f}x**), {b['prefill_token_ratio']:.0f}x fewer prefill tokens."]
    return "\n".join(lines)
