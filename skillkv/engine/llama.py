"""A lean runner for the Llama family (Llama, Mistral, SmolLM, Qwen2, Qwen3) over the paged KV pool.

It loads the very weights of a transformers model (fused QKV and gate/up matrices, the model's own RMSNorm and
rotary-embedding modules, so RoPE scaling variants match transformers exactly), writes each step's new keys and
values into pool slots, and computes attention through an `AttentionBackend`. Only the logits of the positions
asked for are computed. Checked against transformers in tests (fp32 greedy identical, bf16 relative error).

Batch-invariant mode (`row_block > 0`, used by `skillkv serve`): a request's logits are bitwise the same whether it
runs alone or batched with any others. Two things break that in plain mode, both measured on the CPU (MKL sgemm,
torch 2.13): (1) a GEMM's rows depend on the row count M (M = 1, a lone decode token, takes another kernel than
M >= 8: the last bits differ, which can flip a greedy token), and (2) vectorized sin/cos give a scalar-tail element
other bits than a vector-lane one, so RoPE of a position depends on where it sits in the batch. So in this mode
every step's rows are padded with zeros to a multiple of `row_block` (one call per op, as before: on this CPU every
M that is a multiple of 8 gives the same bits per row; tests check it), and cos/sin come from a table built in
fixed chunks of positions, whose values never depend on the batch. Attention is already computed per sequence
(torch backend). Cost: a lone decode token pays for `row_block` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skillkv.engine.attention import AttentionBackend, SeqView
from skillkv.engine.pool import KVPool
from skillkv.errors import SkillkvError

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


ROPE_CHUNK = 1024  # positions per RoPE table chunk (batch-invariant mode)


class LlamaRunner:
    def __init__(self, hf_model, pool: KVPool, backend: AttentionBackend, row_block: int = 0):
        cfg = hf_model.config
        self.row_block = row_block
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.model_type not in SUPPORTED:
            raise SkillkvError(f"the paged engine supports {', '.join(sorted(SUPPORTED))}, not {cfg.model_type}")
        inner = hf_model.model
        self.cfg, self.pool, self.backend = cfg, pool, backend
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = hf_model.lm_head.weight
        self.q_heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.q_heads
        self.layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv_b = None
            if at.q_proj.bias is not None:
                qkv_b = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias])
            self.layers.append(dict(
                ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm,
                qkv=torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]), qkv_b=qkv_b,
                o=at.o_proj.weight, gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                down=mlp.down_proj.weight, q_norm=getattr(at, "q_norm", None), k_norm=getattr(at, "k_norm", None)))

    def _rope_table(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, dim] of `positions` from a table grown in fixed chunks (values independent of the batch)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        have = 0 if self._rope is None else self._rope[0].shape[0]
        while have < need:
            pos = torch.arange(have, have + ROPE_CHUNK, device=x.device)[None]
            c, s = self.rotary(x[:1][None], pos)
            self._rope = (c[0], s[0]) if self._rope is None else (torch.cat([self._rope[0], c[0]]),
                                                                   torch.cat([self._rope[1], s[0]]))
            have += ROPE_CHUNK
        return self._rope[0][positions], self._rope[1][positions]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seqs: list[SeqView],
                logits_at: torch.Tensor) -> torch.Tensor:
        """Run new tokens `ids` [N] at `positions` [N], storing their KV at pool `slots` [N]; return float32
        logits [len(logits_at), vocab] of the rows `logits_at`."""
        self.backend.plan(seqs)
        n = ids.shape[0]
        pad = (-n) % self.row_block if self.row_block else 0
        if pad:
            ids, positions = F.pad(ids, (0, pad)), F.pad(positions, (0, pad))
        x = self.embed(ids)
        if self.row_block:
            cos, sin = self._rope_table(x, positions)
            cos, sin = cos[:, None, :], sin[:, None, :]
        else:
            cos, sin = self.rotary(x[None], positions[None])
            cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        nq, nk, d = self.q_heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        for i, w in enumerate(self.layers):
            h = w["ln1"](x)
            qkv = F.linear(h, w["qkv"], w["qkv_b"])
            q = qkv[:, :nq].view(-1, self.q_heads, d)
            k = qkv[:, nq:nq + nk].view(-1, self.kv_heads, d)
            v = qkv[:, nq + nk:].reshape(-1, self.kv_heads, d)
            if w["q_norm"] is not None:
                q, k = w["q_norm"](q), w["k_norm"](k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.pool.write(i, slots, k[:n], v[:n])
            o = self.backend.run(i, q[:n].contiguous())
            if pad:
                o = F.pad(o, (0, 0, 0, 0, 0, pad))
            x = x + F.linear(o.reshape(-1, nq), w["o"])
            g, u = F.linear(w["ln2"](x), w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, w["down"])
        rows = len(logits_at)
        pad = (-rows) % self.row_block if self.row_block else 0
        h = x[logits_at]
        if pad:
            h = F.pad(h, (0, 0, 0, pad))
        return F.linear(self.norm(h), self.lm_head)[:rows].float()
