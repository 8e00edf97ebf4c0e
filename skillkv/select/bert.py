"""A BERT encoder over a Hugging Face folder's config.json and model.safetensors, in plain torch: what automatic
skill selection embeds questions with (select/embed.py, all-MiniLM-L6-v2), so `skillkv ask` never imports
transformers (importing it and its BertModel cost ~1.8 s of a cold ask's 3.4 s on the 2-core CPU).

It computes what transformers' BertModel (absolute positions, post-LayerNorm, no pooler) returns as
last_hidden_state, op for op: embeddings (word + position + token type) -> LayerNorm; per layer, self-attention
with an additive mask (padding keys get the dtype's most negative value, as transformers' eager attention does)
-> dense -> residual -> LayerNorm, then dense -> exact (erf) GELU -> dense -> residual -> LayerNorm.
tests/select/test_bert.py compares it with transformers on real texts (max abs difference ~1e-6 in fp32).
Contract: `BertEncoder.load(folder)` raises ValueError for a config it does not implement (another activation,
relative positions, a decoder); `encoder(ids, mask, types)` takes int64 [batch, tokens] tensors and returns
float32 [batch, tokens, hidden].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


class BertEncoder:
    """See the module docstring."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        self.w = {k.removeprefix("bert."): v.float() for k, v in weights.items()}
        self.layers = config["num_hidden_layers"]

    @classmethod
    def load(cls, folder: Path) -> BertEncoder:
        from safetensors.torch import load_file

        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        unsupported = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        for key, want in unsupported.items():
            if config.get(key, want) != want:
                raise ValueError(f"the lean BERT encoder needs {key}={want}, not {config.get(key)}")
        if config.get("is_decoder"):
            raise ValueError("the lean BERT encoder is an encoder only")
        return cls(config, load_file(str(Path(folder) / "model.safetensors")))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        w = self.w
        b, n = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][types]
             + w["embeddings.position_embeddings.weight"][:n])
        x = self._norm(x, "embeddings.LayerNorm")
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        hd = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self._dense(x, f"{p}.attention.self.{m}").view(b, n, self.heads, hd).transpose(1, 2)
                       for m in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=hd ** -0.5)
            a = self._dense(a.transpose(1, 2).reshape(b, n, -1), f"{p}.attention.output.dense")
            x = self._norm(a + x, f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._norm(self._dense(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x
