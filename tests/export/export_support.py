"""Shared pieces of the export tests: the 8B attention shape as a small dummy model, and a full prefill of a
whole prompt tokenized the way a serving engine tokenizes it (the reference exported KV must equal)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

# Llama-3.1-8B's attention: 32 query heads, 8 kv heads, head dim 128, llama3 RoPE; 2 layers and a 1024 hidden
# size keep the random model small on a 2-core CPU (the per-layer KV shape is the 8B's)
LLAMA_8B_ATTENTION = dict(model_type="llama", hidden_size=1024, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=512,
                          max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=8192),
                          rope_theta=500000.0)


def write_8b_config(folder: Path) -> str:
    p = folder / "llama8b-attn" / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(LLAMA_8B_ATTENTION))
    return f"dummy:{p}"


def served_prompt_ids(kv, system_text: str, question: str) -> list[int]:
    """The ids a vLLM/SGLang server computes for [system, user] chat messages: the template rendered, then the
    whole text tokenized at once (no added special tokens; the template carries them)."""
    tok = kv.handle.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": system_text},
                                    {"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def assert_same_kv(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Exported KV that came from skillkv's snapshots (computed by the lean runner: oneDNN GEMMs on the CPU,
    engine/gemm.py) against transformers' prefill of the same ids: the same math, fp32 rounding apart."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=msg or None)


@torch.inference_mode()
def full_prefill(kv, ids: list[int]):
    """Per-layer (keys, values) [tokens, kv_heads, head_dim] of one forward of the whole prompt `ids`."""
    from transformers import DynamicCache

    model = kv.handle.load()
    cache = DynamicCache()
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(input_ids=torch.tensor([ids]), use_cache=True, **{kw: cache})
    return [(layer.keys[0].transpose(0, 1).contiguous(), layer.values[0].transpose(0, 1).contiguous())
            for layer in cache.layers]


def manifest(folder: Path) -> dict:
    (path,) = sorted(folder.glob("skillkv-export-*.json"))
    return json.loads(path.read_text())
