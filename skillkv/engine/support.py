"""What the lean Llama-family runner (engine/llama.py) can run, decided from the config alone (no torch), so every
command resolves `--engine auto` the same way before any weight is loaded (runners/__init__.py).

The lean runner computes Llama, Mistral, Qwen2 and Qwen3 checkpoints with full attention (no sliding-window layer),
RoPE of a type engine/rotary.py computes (position-independent frequencies: default, linear, llama3, yarn), and no
biases beyond Qwen2's q/k/v ones. Anything else runs on the hf runner (transformers).
"""

from __future__ import annotations

from skillkv.model.config import layer_windows

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported(cfg) -> str | None:
    """Why the lean runner cannot run the model of `cfg` (one line ending in what to use instead), or None."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED:
        return f"the paged engine supports {', '.join(sorted(SUPPORTED))}, not {model_type}"
    if any(layer_windows(cfg)):  # its attention has no window: it would let every token see the whole prefix
        return f"the paged engine does not support sliding-window attention ({model_type}); use --engine hf"
    rp = getattr(cfg, "rope_parameters", None) or {}
    if rp and all(isinstance(v, dict) for v in rp.values()):
        return "the paged engine has one RoPE table for all layers; use --engine hf"
    kind = rp.get("rope_type") or rp.get("type") or "default"
    if kind not in ROPE_TYPES:
        return (f"the paged engine computes RoPE types {', '.join(ROPE_TYPES)}, not {kind!r} (its frequencies "
                "change with the sequence length); use --engine hf")
    if (model_type != "qwen2" and getattr(cfg, "attention_bias", False)) or getattr(cfg, "mlp_bias", False):
        return "the paged engine has no output or MLP biases (attention_bias / mlp_bias); use --engine hf"
    return None
