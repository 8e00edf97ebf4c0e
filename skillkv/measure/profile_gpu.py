"""Where a question step's time goes on the GPU (used by bench_gpu): GPU time of the captured forward alone,
host time around it, device time per kernel category from torch's profiler, and the same step with each GEMM
choice (engine/gemm.py), all in the calling process and run.

Categories (by kernel name): attention (FA3, FlashInfer, SDPA kernels and their split combines), gemm (cuBLAS,
CUTLASS, the Triton skinny kernel), norm_rope_silu (fused element-wise kernels; Triton's RoPE kernel also writes
the KV rows), copies (KV writes, index/copy/fill kernels, memcpy), other. Busy time is the sum of kernel times;
the rest of the GPU time is launch gaps between dependent kernels.
"""

from __future__ import annotations

import statistics

import torch

CATEGORIES = (
    ("attention", ("flash", "fwd_combine", "prepare_varlen", "batchprefill", "prefill", "attention", "fmha",
                   "sdpa", "merge_state")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "skinny", "cublas", "splitk")),
    ("norm_rope_silu", ("rmsnorm", "norm", "rope", "silu", "act_and_mul")),
    ("copies", ("index", "copy", "memcpy", "memset", "fill", "scatter", "gather", "cat")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Median GPU milliseconds of one replay of `graph` (events around the replay alone)."""
    times = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[2:])


def kernel_times(step, reps: int = 5) -> dict:
    """Device milliseconds per step of `step()` by category, and the ten costliest kernels (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    by_cat: dict[str, float] = {}
    kernels = []
    count = 0
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if not t:
            continue
        ms = t / 1e3 / reps
        by_cat[category(e.key)] = by_cat.get(category(e.key), 0.0) + ms
        kernels.append((e.key[:120], ms, e.count // reps))
        count += e.count
    kernels.sort(key=lambda k: -k[1])
    return {"ms_by_category": by_cat, "busy_ms": sum(by_cat.values()), "kernels_per_step": count / reps,
            "top_kernels": [{"name": n, "ms": m, "calls": c} for n, m, c in kernels[:12]]}


def gpu_step(eng, step, wall_ms: float) -> dict:
    """GPU time of the graph `step()` last replayed, the host time around it (`wall_ms` - GPU), and the kernel
    breakdown. Empty when the step did not replay a graph."""
    graphs = getattr(eng, "graphs", None)
    if graphs is None or getattr(graphs, "last", None) is None:
        return {}
    step()
    g = graphs.graphs[graphs.last]
    gpu = replay_ms(g.graph)
    out = {"graph_key": list(graphs.last), "gpu_ms": gpu, "host_ms": wall_ms - gpu}
    out.update(kernel_times(step))
    out["gaps_ms"] = gpu - out["busy_ms"]
    return out


def compare_gemm(eng, step, timer, reps: int) -> dict:
    """The step's wall and GPU milliseconds with each GEMM choice (graphs recaptured for each); the engine's own
    choice is restored afterwards."""
    from skillkv.engine.gemm import Linear

    own = eng.runner.linear
    out = {}
    try:
        for mode in ("cublas", "triton"):
            eng.runner.linear = Linear(mode, eng.device)
            if eng.graphs is not None:
                eng.graphs.reset()
            step()
            wall, _ = timer(step, reps)
            gpu = replay_ms(eng.graphs.graphs[eng.graphs.last].graph) if eng.graphs is not None else float("nan")
            out[mode] = {"wall_ms": wall, "gpu_ms": gpu}
    finally:
        eng.runner.linear = own
        if eng.graphs is not None:
            eng.graphs.reset()
    return out
