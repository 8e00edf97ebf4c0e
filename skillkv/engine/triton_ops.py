"""The element-wise parts of a Llama-family layer as Triton kernels (`ops="triton"`; CUDA; triton ships with
torch's CUDA wheels). What `ops="auto"` picks with the fa3 attention backend (the FA3 wheel set has no FlashInfer):
12.3 us a layer at 104 rows on an H200 against 91.9 for the torch modules (docs/BENCHMARKS.md).

Four kernels a layer instead of FlashInfer's five plus two KV-write copies:
  add_norm    x += a; a = RMSNorm(x)              (one pass over the row, in place, like FlashInfer's)
  rope_store  RoPE of q and k from the fused QKV GEMM's output, the rotated q and k written contiguous, and the
              rotated k and v written straight into their pool slots (replaces rope + 2 index_copy + contiguous)
  silu_mul    silu(gate) * up
  norm        RMSNorm (the first layer's, the final one, Qwen3's per-head q/k norms)
Rounding follows transformers' modules (RMSNorm: normalised row rounded to the dtype, then times the weight; SiLU
rounded before the product); RoPE is computed in float32 and rounded once (as FlashInfer does). cos/sin come from
a table built once by the model's own rotary module (every RoPE variant transformers implements, its attention
scaling included), float32 [max_position_embeddings, head_dim].

Contract (as engine/ops.py): `begin(x, positions)` once per forward; `norm(x, ln)`; `add_norm(a, x, ln)` ->
(RMSNorm(x + a), x + a) reusing the storage of `a` and `x`; `silu_mul(gu)`; and, in place of `rope`,
`rope_store(q, k, v, pool, layer, slots)` -> (q rotated [n, q_heads, d], k rotated [n, kv_heads, d]), both
contiguous, with rotated k and v stored at pool `slots` of `layer`. Inputs may be row-strided views (the fused QKV
output); the last dimension must be contiguous. No host synchronisation: everything can be captured in a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_row(x, w_ptr, cols, mask, H, eps, dtype: tl.constexpr):
    var = tl.sum(x * x, axis=0) / H
    y = (x * tl.math.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return (w.to(tl.float32) * y.to(tl.float32)).to(dtype)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, sx, so, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    y = _norm_row(x, w_ptr, cols, mask, H, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * so + cols, y, mask=mask)


@triton.jit
def _add_rmsnorm_kernel(a_ptr, x_ptr, w_ptr, sa, sx, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    a = tl.load(a_ptr + row * sa + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + a).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * sx + cols, s, mask=mask)
    y = _norm_row(s.to(tl.float32), w_ptr, cols, mask, H, eps, a_ptr.dtype.element_ty)
    tl.store(a_ptr + row * sa + cols, y, mask=mask)


@triton.jit
def _rotate(x_ptr, row_off, h, d, partner, sign, cos, sin, mask):
    x = tl.load(x_ptr + row_off + h[:, None] * d.shape[0] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + row_off + h[:, None] * d.shape[0] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    return x * cos[None, :] + sign[None, :] * xp * sin[None, :]


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, sq, sk, sv, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
                       qo_ptr, ko_ptr, pk_ptr, pv_ptr,
                       HQ: tl.constexpr, HK: tl.constexpr, HQP: tl.constexpr, HKP: tl.constexpr, D: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + m).to(tl.int64)
    slot = tl.load(slot_ptr + m).to(tl.int64)
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d)
    sin = tl.load(sin_ptr + pos * D + d)
    hq = tl.arange(0, HQP)
    mq = (hq < HQ)[:, None]
    q = _rotate(q_ptr, m * sq, hq, d, partner, sign, cos, sin, mq)
    tl.store(qo_ptr + m * (HQ * D) + hq[:, None] * D + d[None, :], q.to(qo_ptr.dtype.element_ty), mask=mq)
    hk = tl.arange(0, HKP)
    mk = (hk < HK)[:, None]
    k = _rotate(k_ptr, m * sk, hk, d, partner, sign, cos, sin, mk).to(ko_ptr.dtype.element_ty)
    off = hk[:, None] * D + d[None, :]
    tl.store(ko_ptr + m * (HK * D) + off, k, mask=mk)
    tl.store(pk_ptr + slot * (HK * D) + off, k, mask=mk)
    v = tl.load(v_ptr + m * sv + off, mask=mk, other=0.0)
    tl.store(pv_ptr + slot * (HK * D) + off, v, mask=mk)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, sg, so, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gu_ptr + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * sg + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape, rows contiguous in their last dimension)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        H = x2.shape[1]
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), H, eps,
                                       BLOCK=triton.next_power_of_2(H), num_warps=_warps(H))
    return out.view(shape)


def add_rmsnorm_(a: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """x += a; a = RMSNorm(x), in place; a and x are [rows, H]."""
    if a.shape[0]:
        H = a.shape[1]
        _add_rmsnorm_kernel[(a.shape[0],)](a, x, weight, a.stride(0), x.stride(0), H, eps,
                                           BLOCK=triton.next_power_of_2(H), num_warps=_warps(H))


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor):
    """Rotated (q, k) as new contiguous tensors; rotated k and v also stored at flat `slots` of `pool_k`/`pool_v`
    ([pages, page_size, kv_heads, d] of one layer). q [n, HQ, d], k and v [n, HK, d], rows strided."""
    n, HQ, D = q.shape
    HK = k.shape[1]
    qo = torch.empty((n, HQ, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((n, HK, D), dtype=k.dtype, device=k.device)
    if n:
        _rope_store_kernel[(n,)](q, k, v, q.stride(0), k.stride(0), v.stride(0), positions, slots, cos, sin,
                                 qo, ko, pool_k, pool_v, HQ=HQ, HK=HK, HQP=triton.next_power_of_2(HQ),
                                 HKP=triton.next_power_of_2(HK), D=D, num_warps=4)
    return qo, ko


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    rows, two_i = gu.shape
    inner = two_i // 2
    out = torch.empty((rows, inner), dtype=gu.dtype, device=gu.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(inner, block))](gu, out, inner, gu.stride(0), out.stride(0),
                                                            BLOCK=block, num_warps=4)
    return out


class TritonOps:
    name = "triton"

    def __init__(self, rotary, head_dim: int, max_positions: int, device: torch.device):
        pos = torch.arange(max_positions, device=device)
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = rotary(probe[None], pos[None])  # the model's own RoPE, float32: [1, P, d] each
        if cos.shape[-1] != head_dim:
            raise ValueError(f"partial rotary ({cos.shape[-1]} of {head_dim} dims) is not supported by triton ops")
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self.head_dim = head_dim

    def begin(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        self.positions = positions

    def norm(self, x: torch.Tensor, ln) -> torch.Tensor:
        return rmsnorm(x, ln.weight, ln.variance_epsilon)

    def add_norm(self, a: torch.Tensor, x: torch.Tensor, ln) -> tuple[torch.Tensor, torch.Tensor]:
        add_rmsnorm_(a, x, ln.weight, ln.variance_epsilon)
        return a, x

    def rope_store(self, q, k, v, pool, layer: int, slots: torch.Tensor):
        n = q.shape[0]
        return rope_store(q, k, v, self.positions[:n], slots, self.cos, self.sin, pool.k[layer], pool.v[layer])

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        return silu_mul(gu)
