"""Issue 14's GEMM gap, one more family of kernels: the question step's weight GEMMs (104 rows, Llama-3.1-8B shapes,
bf16) through cuBLAS (default and the cuBLASLt preference) and through torch inductor's max-autotune Triton
templates, with and without Hopper's persistent TMA matmul. Weights rotate through more than the H200's L2, each
variant is timed with CUDA events over 200 calls after warm-up; TB/s = weight bytes read / time.

    python3 bench/gemm_inductor.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = 104


def timed(fn, x, ws, calls=200) -> float:
    for w in ws[:4]:
        fn(x, w)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(calls):
        fn(x, ws[i % len(ws)])
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / calls  # us per call


def compiled(persistent: bool):
    import torch._inductor.config as cfg

    opts = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON", "triton.enable_persistent_tma_matmul":
            persistent, "coordinate_descent_tuning": False}
    torch._dynamo.reset()
    cfg.max_autotune_gemm_search_space = "DEFAULT"
    return torch.compile(lambda x, w: F.linear(x, w), options=opts, dynamic=False, fullgraph=True)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(max(4, 400_000_000 //
                                                                                             nbytes))]
        x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0])
        row = {"gemm": name, "n": n, "k": k, "weight_mb": round(nbytes / 1e6, 1)}
        row["cublas_us"] = timed(F.linear, x, ws)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["cublaslt_us"] = timed(F.linear, x, ws)
        torch.backends.cuda.preferred_blas_library("default")
        for label, persistent in (("triton_tma_persistent", True), ("triton_templates", False)):
            t0 = time.perf_counter()
            try:
                fn = compiled(persistent)
                out = fn(x, ws[0])
                row[f"{label}_us"] = timed(fn, x, ws)
                row[f"{label}_max_abs_err"] = float((out.float() - ref.float()).abs().max())
                row[f"{label}_repeatable"] = bool(torch.equal(fn(x, ws[0]), out))
            except Exception as e:  # noqa: BLE001 - record why a variant did not run
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row[f"{label}_compile_s"] = round(time.perf_counter() - t0, 1)
        for key in [k for k in row if k.endswith("_us")]:
            row[key.replace("_us", "_tbs")] = round(nbytes / (row[key] * 1e-6) / 1e12, 2)
            row[key] = round(row[key], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ws
        torch.cuda.empty_cache()
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "gemms": rows},
              open(sys.argv[1], "w"), indent=1)
    print(f"{'gemm':8} {'cublas':>14} {'cublasLt':>14} {'tma persist':>14} {'templates':>14}")
    for r in rows:
        cell = [f"{r.get(v + '_us', '-')} ({r.get(v + '_tbs', '-')})" for v in
                ("cublas", "cublaslt", "triton_tma_persistent", "triton_templates")]
        print(f"{r['gemm']:8} " + " ".join(f"{c:>14}" for c in cell))


if __name__ == "__main__":
    main()
