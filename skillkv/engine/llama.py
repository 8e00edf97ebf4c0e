"""A lean runner for the Llama family (Llama, Mistral, SmolLM, Qwen2, Qwen3) over the paged KV pool.

It loads the very weights of a transformers model (fused QKV and gate/up matrices, the model's own RMSNorm and
rotary-embedding modules, so RoPE scaling variants match transformers exactly), writes each step's new keys and
values into pool slots, and computes attention through an `AttentionBackend`. Only the logits of the positions
asked for are computed. Checked against transformers in tests (fp32 greedy identical, bf16 relative error).
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


class LlamaRunner:
    def __init__(self, hf_model, pool: KVPool, backend: AttentionBackend):
        cfg = hf_model.config
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

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seqs: list[SeqView],
                logits_at: torch.Tensor, layer_ready=None) -> torch.Tensor:
        """Run new tokens `ids` [N] at `positions` [N], storing their KV at pool `slots` [N]; return float32
        logits [len(logits_at), vocab] of the rows `logits_at`. `layer_ready(i)`, if given, is called before
        layer i's KV is written or read (layer-pipelined paging, engine/tiers.py)."""
        self.backend.plan(seqs)
        x = self.embed(ids)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        nq, nk, d = self.q_heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        for i, w in enumerate(self.layers):
            if layer_ready is not None:
                layer_ready(i)
            h = w["ln1"](x)
            qkv = F.linear(h, w["qkv"], w["qkv_b"])
            q = qkv[:, :nq].view(-1, self.q_heads, d)
            k = qkv[:, nq:nq + nk].view(-1, self.kv_heads, d)
            v = qkv[:, nq + nk:].reshape(-1, self.kv_heads, d)
            if w["q_norm"] is not None:
                q, k = w["q_norm"](q), w["k_norm"](k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.pool.write(i, slots, k, v)
            o = self.backend.run(i, q.contiguous())
            x = x + F.linear(o.reshape(-1, nq), w["o"])
            g, u = F.linear(w["ln2"](x), w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, w["down"])
        return F.linear(self.norm(x[logits_at]), self.lm_head).float()
