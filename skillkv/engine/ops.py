"""The element-wise parts of a Llama-family layer (RMSNorm, residual add, RoPE, SiLU-and-mul): the torch and
FlashInfer versions (a third, Triton kernels with RoPE fused into the KV store, is engine/triton_ops.py).

  torch       `RMSNorm` below and the rotary embedding of engine/rotary.py: the arithmetic of transformers' modules,
              op for op, so bit-for-bit what transformers computes (tests compare); CPU and CUDA. The reference.
  flashinfer  FlashInfer's fused kernels (one kernel each instead of ~6 for a norm, ~12 for RoPE), CUDA only.
              RoPE reads a cos/sin table computed once by the rotary embedding (engine/rotary.py), so every RoPE
              variant it computes (default, linear, llama3, yarn) is the same table as the torch version's.
              Math in float32 inside the kernels: results differ from the torch version by bf16 rounding only.

Contract (all): `begin(positions)` once per forward; `norm(x, ln)` -> RMSNorm(x); `add_norm(a, x, ln)` ->
(RMSNorm(x + a), x + a), where the flashinfer version may reuse the storage of `a` and `x`; `rope(q, k)` -> rotated
(q [n, q_heads, d], k [n, kv_heads, d]); `silu_mul(gu)` -> silu(gu[:, :m]) * gu[:, m:].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skillkv.engine.rope import rotate_half


ROPE_CHUNK = 1024  # positions per cos/sin table chunk (fixed_rope)
# torch runs an element-wise op of more than GRAIN elements as an OpenMP parallel region. Under the CLI's
# OMP_WAIT_POLICY=PASSIVE that wakes the sleeping worker thread, which costs more than the work in the MLP's
# SiLU-and-mul of a question step: 100-108 vs 22 us at 24 x 1,536 on 2 cores (docs/BENCHMARKS.md). So on the CPU
# `silu_mul` of up to SERIAL_MAX elements runs in row blocks of at most GRAIN elements, on the calling thread; the
# bits are the same either way (element-wise; tests/engine/test_lean_modules.py checks it).
GRAIN = 32768
SERIAL_MAX = 1 << 17


class RMSNorm:
    """transformers' LlamaRMSNorm (Qwen2/3, Mistral: the same), op for op: in float32, x * rsqrt(mean(x^2) + eps),
    back to x's dtype, times the weight. `weight` and `variance_epsilon` as on the module (the fused kernels read
    them)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.variance_epsilon = weight, float(eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class TorchOps:
    """`fixed_rope`: cos/sin come from a table built in fixed chunks of positions, so a position's values never
    depend on where it sits in a batch (vectorized sin/cos give a scalar-tail element other bits than a vector
    lane); used by the batch-invariant mode of engine/llama.py."""

    name = "torch"

    def __init__(self, rotary, head_dim: int, fixed_rope: bool = False):
        self.rotary, self.head_dim, self.fixed_rope = rotary, head_dim, fixed_rope
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _rope_table(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1 if positions.numel() else 0
        have = 0 if self._table is None else self._table[0].shape[0]
        while have < need:
            c, s = self.rotary(x[:1][None], torch.arange(have, have + ROPE_CHUNK, device=x.device)[None])
            self._table = (c[0], s[0]) if self._table is None else (torch.cat([self._table[0], c[0]]),
                                                                     torch.cat([self._table[1], s[0]]))
            have += ROPE_CHUNK
        return self._table[0][positions], self._table[1][positions]

    def begin(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        if self.fixed_rope:
            cos, sin = self._rope_table(x, positions)
            self.cos, self.sin = cos[:, None, :], sin[:, None, :]
            return
        cos, sin = self.rotary(x[None], positions[None])
        self.cos, self.sin = cos[0, :, None, :], sin[0, :, None, :]

    def norm(self, x: torch.Tensor, ln) -> torch.Tensor:
        return ln(x)

    def add_norm(self, a: torch.Tensor, x: torch.Tensor, ln) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + a
        return ln(x), x

    def rope(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q * self.cos + rotate_half(q) * self.sin, k * self.cos + rotate_half(k) * self.sin

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        n = g.numel()
        if gu.device.type != "cpu" or gu.dim() != 2 or not GRAIN < n <= SERIAL_MAX:
            return F.silu(g) * u
        out = torch.empty(g.shape, dtype=g.dtype)  # in row blocks below torch's grain: no parallel region
        step = max(1, GRAIN // g.shape[1])
        for i in range(0, g.shape[0], step):
            torch.mul(F.silu(g[i:i + step]), u[i:i + step], out=out[i:i + step])
        return out


class FlashInferOps:
    name = "flashinfer"

    def __init__(self, rotary, head_dim: int, max_positions: int, device: torch.device):
        import flashinfer

        self.fi, self.head_dim = flashinfer, head_dim
        pos = torch.arange(max_positions, device=device)
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = rotary(probe[None], pos[None])  # the model's own RoPE, float32: [1, P, d] each
        half = cos.shape[-1] // 2
        self.cos_sin = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).float().contiguous()

    def begin(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        self.positions = positions

    def norm(self, x: torch.Tensor, ln) -> torch.Tensor:
        return self.fi.rmsnorm(x, ln.weight, ln.variance_epsilon)

    def add_norm(self, a: torch.Tensor, x: torch.Tensor, ln) -> tuple[torch.Tensor, torch.Tensor]:
        self.fi.fused_add_rmsnorm(a, x, ln.weight, ln.variance_epsilon)  # x += a; a = norm(x)
        return a, x

    def rope(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = q.contiguous(), k.contiguous()
        self.fi.apply_rope_with_cos_sin_cache_inplace(self.positions, q.view(q.shape[0], -1),
                                                      k.view(k.shape[0], -1), self.head_dim, self.cos_sin)
        return q, k

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        return self.fi.silu_and_mul(gu)
