"""The lean runner's weight GEMMs, y = x @ W^T (+ b): cuBLAS (torch's F.linear, the default on CUDA), oneDNN on
reordered weights (the default on the CPU, `Linear`), or for skinny CUDA steps a Triton split-K kernel
(`gemm="triton"`, opt-in).

Why a second kernel was tried: a question step multiplies ~100 rows by every weight matrix, so it is a read of the
weights (15 GB for an 8B model) and nothing else; its floor is the HBM read rate. cuBLAS reaches 2.97 TB/s on the
QKV, 2.74 on the o and 3.01 on the down projection of the 8B shape at 104 rows on an H200 (N = 4096-6144 columns
make only 32-48 output tiles of 128 columns for 132 SMs) against a 4.30 TB/s read rate. Measured on that H200 the
kernel below is slower than cuBLAS at 104 rows for every shape (qkv 24-33 us vs 16.9, gate_up 73 vs 65: its
pointer-based loads stream at ~3.2 TB/s at best), level at 1-8 rows (docs/BENCHMARKS.md), so `auto` keeps cuBLAS;
it stays as the measured, deterministic baseline for a TMA/wgmma version. Split-K gives every SM work: each program
computes one [BM, BN] output tile over a slice of K, writes its float32 partial to a workspace, and the *last*
program of a tile to finish (a per-tile counter, acq_rel atomics) sums the partials in split order 0, 1, ... and
writes the output. The sum order never depends on which program came last, so results are deterministic (exact
mode needs the same bits every time); the counter is reset by that program, so graphs replay it.

Shapes: x [M, K] with M <= MAX_ROWS rows (padded to a power of two >= 16 inside the kernel by masking), W [N, K]
row-major (nn.Linear's), N a multiple of BN and K a multiple of BK * split; anything else goes to cuBLAS.
Contract: `linear(x, w, b)` returns F.linear's result up to float32 summation order (different bits, same math);
for a given (M, N, K) the kernel and its configuration are fixed, so a step computed twice gives the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 128


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def skinny(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, M, N, K_SPLIT, sx, sw, sy,
               HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        k0 = pid_s * K_SPLIT
        x_rows = x_ptr + rm[:, None].to(tl.int64) * sx + k0 + rk[None, :]
        w_rows = w_ptr + rn[:, None].to(tl.int64) * sw + k0 + rk[None, :]
        row_ok = rm[:, None] < M
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, K_SPLIT, BK):
            a = tl.load(x_rows + k, mask=row_ok, other=0.0)
            w = tl.load(w_rows + k)
            acc += tl.dot(a, tl.trans(w))
        out = y_ptr + rm[:, None].to(tl.int64) * sy + rn[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok)
        else:
            tile = part_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
            tl.store(tile + pid_s * (BM * N), acc, mask=row_ok)
            tl.debug_barrier()
            done = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:  # the last program of this tile: sum the partials in split order
                total = tl.zeros((BM, BN), dtype=tl.float32)
                for s in tl.static_range(SPLIT):
                    total += tl.load(tile + s * (BM * N), mask=row_ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + rn).to(tl.float32)[None, :]
                tl.store(out, total.to(y_ptr.dtype.element_ty), mask=row_ok)
                tl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")

    return skinny


_KERNEL = None


def config(m: int, n: int, k: int, sms: int = 132) -> tuple[int, int, int, int, int, int] | None:
    """(BM, BN, BK, split, stages, warps) of the skinny kernel for an [m, k] x [k, n] product, or None (cuBLAS).
    Split-K until the output tiles times the split cover the SMs at least once."""
    if m > MAX_ROWS or m < 1:
        return None
    bm = 16
    while bm < m:
        bm *= 2
    bn, bk = 128, 64
    if n % bn or k % bk:
        return None
    tiles, split = n // bn, 1
    while tiles * split < sms and k % (bk * split * 2) == 0 and k // (split * 2) >= 4 * bk:
        split *= 2
    return bm, bn, bk, split, 4, 4


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cfg) -> torch.Tensor:
    """y = x @ w^T (+ b) by the Triton split-K kernel with configuration `cfg` (see `config`)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernels()
    bm, bn, bk, split, stages, warps = cfg
    m, k = x.shape
    n = w.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, bm, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    lock = _locks(x.device, n // bn)
    _KERNEL[(n // bn, split)](x, w, b if b is not None else y, y, part, lock, m, n, k // split,
                              x.stride(0), w.stride(0), y.stride(0), HAS_BIAS=b is not None, BM=bm, BN=bn, BK=bk,
                              SPLIT=split, num_stages=stages, num_warps=warps)
    return y


_LOCKS: dict = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile counters, zero between kernels (each tile's last program resets its own); one buffer per device:
    kernels on one stream never overlap."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        buf = _LOCKS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


class Linear:
    """The GEMM choice of one runner: `cublas` (F.linear everywhere: cuBLAS on CUDA, MKL on the CPU), `triton`
    (the skinny kernel where `config` gives one, F.linear elsewhere) or `onednn` (CPU, float32: oneDNN's GEMM).
    `auto` = onednn on the CPU where torch has it, cublas elsewhere (faster at every shape of an 8B question step on
    an H200, docs/BENCHMARKS.md).

    Why oneDNN on the CPU: torch's CPU wheels link Intel's MKL, which takes slow paths on other vendors' CPUs. On
    the 2-core AMD EPYC (Zen 4, AVX-512) of docs/BENCHMARKS.md, the default model's weight GEMMs over 30 layers,
    2 threads, MKL vs oneDNN: 77 vs 25 ms at 24 rows (a question), 26 vs 15 ms at 1 row (decode; the lm_head alone
    7.2 vs 2.7 ms), 1,869 vs 877 ms at 1,861 rows (a prefill). oneDNN on weights reordered into its blocked layout
    (`_reorder_linear_weight`) was no faster at 1-24 rows and 27% faster at 688, for ~0.2 s of reordering per
    process and a second copy of the weights: not done, the plain weights are used as they are.

    Whether a row's bits depend on the row count is a property of the kernel on the machine, not assumed here:
    engine/invariance.py checks it and picks the mode (and `block`) that holds. `block > 0` computes every call in
    fixed blocks of that many rows (the caller pads to a multiple of it), so every kernel call has the same shape.

    Weights go through `prepare(w)` once (at runner construction); `linear(x, prepared, b)` computes x @ w^T + b."""

    def __init__(self, mode: str, device: torch.device, dtype: torch.dtype = torch.float32, block: int = 0):
        if mode == "auto":
            mode = "onednn" if device.type == "cpu" and dtype == torch.float32 and _has_onednn() else "cublas"
        if mode not in ("cublas", "triton", "onednn"):
            raise ValueError(f"unknown gemm {mode!r} (choose from auto, cublas, triton, onednn)")
        if mode == "onednn" and (device.type != "cpu" or dtype != torch.float32 or not _has_onednn()):
            raise ValueError("gemm onednn runs float32 on the CPU, with torch's oneDNN (mkldnn) build")
        self.mode, self.block = mode, block
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        """What __call__ takes as the weight `w` [N, K] (row-major: oneDNN reads it in place)."""
        return w.contiguous() if self.mode == "onednn" else w

    def __call__(self, x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.block and x.shape[0] > self.block:
            blk = self.block
            return torch.cat([self._call(x[i:i + blk], w, b) for i in range(0, x.shape[0], blk)])
        return self._call(x, w, b)

    def _call(self, x: torch.Tensor, w, b: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
        if self.mode == "triton" and x.is_cuda:
            cfg = config(x.shape[0], w.shape[0], w.shape[1], self.sms)
            if cfg is not None:
                return skinny_linear(x, w, b, cfg)
        return F.linear(x, w, b)


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
