"""A lean runner for the Llama family (Llama, Mistral, SmolLM, Qwen2, Qwen3) over the paged KV pool.

It runs a checkpoint's weights (engine/weights.py: read by safetensors, no transformers; fused QKV and gate/up
matrices), computes the element-wise parts through `ops` (engine/ops.py: RMSNorm and the rotary embedding of
engine/rotary.py, transformers' arithmetic op for op, or FlashInfer's fused kernels fed by the same rotary table;
engine/triton_ops.py: Triton kernels with RoPE fused into the pool write), writes each step's new keys and values
into pool slots, and computes attention through an `AttentionBackend`. Weight GEMMs go through `gemm`
(engine/gemm.py: cuBLAS, or a Triton split-K kernel for skinny steps). Only the logits of the positions asked for
are computed. Checked against transformers in tests (fp32 greedy identical, bf16 relative error).

Batch-invariant mode (`row_block > 0`, used by `skillkv serve`): a request's logits are bitwise the same whether it
runs alone or batched with any others. Two things break that in plain mode: (1) a GEMM's rows may depend on the
row count M (M = 1, a lone decode token, takes another kernel than M >= 8 everywhere; on some CPUs MKL's rows at
M = 16 differ from M = 8), and (2) vectorized sin/cos give a scalar-tail element other bits than a vector-lane
one, so RoPE of a position depends on where it sits in the batch. So in this mode every step's rows are padded with
zeros to a multiple of `row_block`, the GEMM is one whose rows were *checked on this machine* not to depend on the
row count or their place (engine/invariance.py: oneDNN, MKL, or either in fixed 8-row blocks; `self.gemm` says
which, and whether any holds), and cos/sin come from a table built in fixed chunks of positions, whose values never
depend on the batch. Attention is computed per sequence (engine/attention.py). Cost: a lone decode token pays for
`row_block` rows (on the CPU default model: 60 vs 41 ms a token).

Outside that mode the same rules hold for every step of 8 rows or more (padded to a multiple of 8, at most 7 rows
of waste; the same checked GEMM; the cos/sin table always), and only steps of fewer rows (decode tokens, tiny
questions) run unpadded. So a skill's KV is the same bits whichever command computes it (`skillkv compile`, a
full-mode ask, or the batch-invariant server): exact mode over a snapshot equals full mode in every runner
configuration where the check holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skillkv.engine.attention import AttentionBackend, SeqView
from skillkv.engine.invariance import GemmChoice, choose_gemm
from skillkv.engine.ops import RMSNorm
from skillkv.engine.pool import KVPool
from skillkv.engine.support import SUPPORTED, unsupported  # noqa: F401 - SUPPORTED: re-exported
from skillkv.engine.weights import as_weights
from skillkv.errors import SkillkvError

ROWS = 8  # steps of at least this many rows are padded to a multiple of it (module docstring)


class LlamaRunner:
    """The forward pass over `weights` (engine/weights.py: a checkpoint read by safetensors, or a transformers
    model's parameters, shared)."""

    def __init__(self, weights, pool: KVPool, backend: AttentionBackend, ops: str = "auto", row_block: int = 0,
                 gemm: str | GemmChoice = "auto", verdicts=None):
        weights = as_weights(weights)
        cfg = weights.config
        self.row_block = row_block
        why = unsupported(cfg)
        if why:
            raise SkillkvError(why)
        self.cfg, self.pool, self.backend = cfg, pool, backend
        self.embed_weight = weights.get("model.embed_tokens.weight")
        eps = cfg.rms_norm_eps
        self.norm = RMSNorm(weights.get("model.norm.weight"), eps)
        self.q_heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # the cos/sin table on the CPU (vectorized sin/cos give a scalar tail other bits, module docstring) and in
        # batch-invariant mode; elsewhere the rotary embedding per step, which reads no host value (graph capture)
        self.ops = make_ops(ops, weights.rotary, self.head_dim, cfg, pool.device,
                            fixed_rope=pool.device.type == "cpu" or row_block > 0, attention=backend.name)
        # the GEMM whose rows do not depend on the row count on this machine (engine/invariance.py; cached)
        self.gemm = gemm if isinstance(gemm, GemmChoice) else gemm_for(weights, gemm, verdicts)
        self.linear = lin = self.gemm.linear
        self.lm_head = lin.prepare(weights.lm_head)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            w = weights.layer(i)
            if any(w[k] is not None for k in ("o_b", "gate_b", "up_b", "down_b")):
                raise SkillkvError("the paged engine has no output or MLP biases; use --engine hf")
            qkv_b = torch.cat([w["q_b"], w["k_b"], w["v_b"]]) if w["q_b"] is not None else None
            self.layers.append(dict(
                ln1=RMSNorm(w["ln1"], eps), ln2=RMSNorm(w["ln2"], eps),
                qkv=lin.prepare(torch.cat([w["q"], w["k"], w["v"]])), qkv_b=qkv_b, o=lin.prepare(w["o"]),
                gate_up=lin.prepare(torch.cat([w["gate"], w["up"]])), down=lin.prepare(w["down"]),
                q_norm=RMSNorm(w["q_norm"], eps) if w["q_norm"] is not None else None,
                k_norm=RMSNorm(w["k_norm"], eps) if w["k_norm"] is not None else None))

    def _pad(self, rows: int) -> int:
        """Zero rows to add to a step of `rows` rows (module docstring)."""
        if self.row_block:
            return (-rows) % self.row_block
        return (-rows) % ROWS if rows >= ROWS else 0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seqs: list[SeqView],
                logits_at: torch.Tensor, layer_ready=None) -> torch.Tensor:
        """Run new tokens `ids` [N] at `positions` [N], storing their KV at pool `slots` [N]; return float32
        logits [len(logits_at), vocab] of the rows `logits_at`. `layer_ready(i)`, if given, is called before
        layer i's KV is written or read (layer-pipelined paging, engine/tiers.py)."""
        self.backend.plan(seqs)
        return self.compute(ids, positions, slots, logits_at, layer_ready=layer_ready)

    @torch.inference_mode()
    def compute(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, logits_at: torch.Tensor,
                backend: AttentionBackend | None = None, layer_ready=None) -> torch.Tensor:
        """The forward pass proper, over an already planned `backend` (default: the runner's own). Only device
        work and no host synchronisation, so it can be captured in a CUDA graph (engine/cuda_graph.py)."""
        backend, ops, lin = backend or self.backend, self.ops, self.linear
        rope_store = getattr(ops, "rope_store", None)
        n = ids.shape[0]
        pad = self._pad(n)
        if pad:
            ids, positions = F.pad(ids, (0, pad)), F.pad(positions, (0, pad))
        x = F.embedding(ids, self.embed_weight)
        ops.begin(x, positions)
        nq, nk, d = self.q_heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        h = ops.norm(x, self.layers[0]["ln1"])
        for i, w in enumerate(self.layers):
            if layer_ready is not None:
                layer_ready(i)
            qkv = lin(h, w["qkv"], w["qkv_b"])
            q = qkv[:, :nq].view(-1, self.q_heads, d)
            k = qkv[:, nq:nq + nk].view(-1, self.kv_heads, d)
            v = qkv[:, nq + nk:].view(-1, self.kv_heads, d)
            if w["q_norm"] is not None:
                q, k = ops.norm(q.contiguous(), w["q_norm"]), ops.norm(k.contiguous(), w["k_norm"])
            if rope_store is not None:  # RoPE fused with the pool write (Triton ops)
                q, k = rope_store(q[:n], k[:n], v[:n], self.pool, i, slots)
            else:
                q, k = ops.rope(q, k)
                q, k = q[:n].contiguous(), k[:n]
                self.pool.write(i, slots, k, v[:n])
            o = backend.run(i, q, k, v[:n])
            if pad:
                o = F.pad(o, (0, 0, 0, 0, 0, pad))
            h, x = ops.add_norm(lin(o.reshape(-1, nq), w["o"]), x, w["ln2"])
            m = lin(ops.silu_mul(lin(h, w["gate_up"])), w["down"])
            if i + 1 < len(self.layers):
                h, x = ops.add_norm(m, x, self.layers[i + 1]["ln1"])
            else:
                x = x + m
        rows = len(logits_at)
        pad = self._pad(rows)
        h = x[logits_at]
        if pad:
            h = F.pad(h, (0, 0, 0, pad))
        return lin(ops.norm(h, self.norm), self.lm_head)[:rows].float()


def gemm_for(weights, mode: str = "auto", verdicts=None) -> GemmChoice:
    """The checked GEMM choice (engine/invariance.py) for `weights` (LlamaWeights): one weight of each shape a step
    multiplies by (layer 0's fused qkv, o, fused gate_up, down) and the lm_head."""
    weights = as_weights(weights)
    w0 = weights.layer(0)
    probe = [torch.cat([w0["q"], w0["k"], w0["v"]]), w0["o"], torch.cat([w0["gate"], w0["up"]]), w0["down"]]
    return choose_gemm(mode, weights.device, weights.dtype, probe, weights.lm_head, verdicts)


def make_ops(name: str, rotary, head_dim: int, cfg, device: torch.device, fixed_rope: bool = False,
             attention: str = ""):
    """`auto` on CUDA: with the fa3 attention backend the Triton kernels (engine/triton_ops.py: the FA3 set has no
    FlashInfer, and RoPE fused into the KV store measured faster), else FlashInfer's fused kernels when installed;
    everywhere else the torch ops (engine/ops.py). `fixed_rope`: the torch version reads cos/sin from a
    table built in fixed chunks (batch-invariant mode)."""
    import importlib.util

    from skillkv.engine.attention import _has_flashinfer
    from skillkv.engine.ops import FlashInferOps, TorchOps

    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            if attention == "fa3" and importlib.util.find_spec("triton") is not None:
                name = "triton"
            elif _has_flashinfer():
                name = "flashinfer"
    if name == "torch":
        return TorchOps(rotary, head_dim, fixed_rope)
    if name in ("flashinfer", "triton") and device.type != "cuda":
        raise SkillkvError(f"the {name} kernels run on CUDA only")
    if name == "flashinfer":
        return FlashInferOps(rotary, head_dim, cfg.max_position_embeddings, device)
    if name == "triton":
        from skillkv.engine.triton_ops import TritonOps

        return TritonOps(rotary, head_dim, cfg.max_position_embeddings, device)
    raise SkillkvError(f"unknown layer ops {name!r} (choose from auto, torch, flashinfer, triton)")
