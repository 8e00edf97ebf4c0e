"""The lean runner's weights: a Llama-family checkpoint as tensors by name, with its config and rotary embedding.

`LlamaWeights` is what engine/llama.py, engine/paged.py and runners/paged.py are built from:
  - `from_handle(handle)`: the checkpoint read by safetensors (skillkv.model.ModelHandle.read_weights, no
    transformers); dummy models have no files, so their seeded random weights come from a transformers model;
  - `from_hf_model(model)`: the parameters of a loaded transformers model, shared (tests, benchmarks).
`reference()` returns the transformers model of the same weights, loaded on first use only (compose's deviation
probe and the evaluation's reference need one; an ask never does).

Names follow the checkpoints: model.embed_tokens.weight, model.layers.<i>.self_attn.{q,k,v,o}_proj.{weight,bias},
model.layers.<i>.self_attn.{q,k}_norm.weight (Qwen3), model.layers.<i>.mlp.{gate,up,down}_proj.weight,
model.layers.<i>.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight (absent when tied).
"""

from __future__ import annotations

from typing import Callable

import torch

from skillkv.engine.rotary import Rotary
from skillkv.errors import ModelError
from skillkv.model.config import ModelConfig


class LlamaWeights:
    """See the module docstring. `tensors` are on one device in one dtype."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor],
                 reference: Callable[[], object] | None = None, hf_model=None):
        self.config, self.tensors = config, tensors
        self._reference, self._hf_model = reference, hf_model
        embed = self.get("model.embed_tokens.weight")
        self.device, self.dtype = embed.device, embed.dtype
        self.rotary = Rotary(config, self.device)

    @classmethod
    def from_hf_model(cls, model, config: ModelConfig | None = None) -> LlamaWeights:
        tensors = dict(model.state_dict(keep_vars=False))
        return cls(config or ModelConfig(model.config.to_dict()), tensors, hf_model=model)

    @classmethod
    def from_handle(cls, handle) -> LlamaWeights:
        if handle.path is None:  # dummy: seeded random weights through transformers
            return cls.from_hf_model(handle.load(), handle.config)
        return cls(handle.config, handle.read_weights(), reference=handle.load)

    def get(self, name: str, required: bool = True) -> torch.Tensor | None:
        t = self.tensors.get(name)
        if t is None and required:
            raise ModelError(f"the checkpoint has no tensor {name!r} (not a Llama-family checkpoint?)")
        return t

    @property
    def lm_head(self) -> torch.Tensor:
        head = self.get("lm_head.weight", required=False)
        if head is None or getattr(self.config, "tie_word_embeddings", False):
            return self.get("model.embed_tokens.weight")
        return head

    def layer(self, i: int) -> dict[str, torch.Tensor | None]:
        """Layer i's tensors by short name (q, k, v, o, q_b, k_b, v_b, o_b, gate, up, down, ln1, ln2, q_norm,
        k_norm); optional ones are None."""
        p = f"model.layers.{i}."
        out = {}
        for short, name in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                            ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                            ("down", "mlp.down_proj")):
            out[short] = self.get(p + name + ".weight")
            out[short + "_b"] = self.get(p + name + ".bias", required=False)
        out["ln1"] = self.get(p + "input_layernorm.weight")
        out["ln2"] = self.get(p + "post_attention_layernorm.weight")
        out["q_norm"] = self.get(p + "self_attn.q_norm.weight", required=False)
        out["k_norm"] = self.get(p + "self_attn.k_norm.weight", required=False)
        return out

    def reference(self):
        """The transformers model of these weights (loaded now if it was not)."""
        if self._hf_model is None:
            if self._reference is None:
                raise ModelError("no transformers reference model for these weights")
            self._hf_model = self._reference()
        return self._hf_model


def as_weights(model) -> LlamaWeights:
    """`model` as LlamaWeights: itself, or a transformers model's parameters."""
    return model if isinstance(model, LlamaWeights) else LlamaWeights.from_hf_model(model)
