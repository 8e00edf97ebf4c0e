"""A model's architecture as the engine reads it: config.json (or a dummy preset) seen through a small view, without
transformers.

`ModelConfig(raw)` answers attribute reads the way a transformers config object does for the fields skillkv uses
(`cfg.hidden_size`, `getattr(cfg, "sliding_window", None)`, `cfg.rope_parameters`...): the raw value where
config.json has it, else the default transformers' config class of that family uses (only the fields whose
defaults change behaviour are listed in FAMILY_DEFAULTS), with `head_dim`, `num_key_value_heads`, `layer_types`
(Qwen2/3) and `rope_parameters` derived as transformers derives them. `raw` is what the fingerprint hashes.

Contract: the view never changes after construction; `to_dict()` is a copy of the raw config.
"""

from __future__ import annotations

import json
from pathlib import Path

from skillkv.errors import ModelError

# what transformers' config classes default to when config.json leaves a field out (transformers 5.24), where the
# value changes what the engine computes
_COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
               max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
FAMILY_DEFAULTS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=4096, max_position_embeddings=4096 * 32),
    "qwen2": dict(_COMMON, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  max_position_embeddings=32768),
    "qwen3": dict(_COMMON, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  max_position_embeddings=32768),
}
_VOLATILE = ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
             "_commit_hash", "quantization_config", "use_cache")


class ModelConfig:
    """Attribute view over a raw config dict (module docstring)."""

    def __init__(self, raw: dict):
        if not isinstance(raw, dict):
            raise ModelError("a model config must be a JSON object")
        self._raw = dict(raw)
        family = str(raw.get("model_type") or "")
        d = {**FAMILY_DEFAULTS.get(family, {}), **{k: v for k, v in raw.items() if v is not None or k in
                                                   ("sliding_window", "rope_scaling")}}
        try:
            d.setdefault("num_key_value_heads", d["num_attention_heads"])
            if not d.get("head_dim"):
                d["head_dim"] = int(d["hidden_size"]) // int(d["num_attention_heads"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise ModelError(f"config of model type {family or '?'} lacks hidden_size / num_attention_heads") from None
        if family in ("qwen2", "qwen3"):  # as their transformers config classes derive them
            if not d.get("use_sliding_window"):
                d["sliding_window"] = None
            if not d.get("layer_types"):
                n, w = int(d["num_hidden_layers"]), d.get("sliding_window")
                d["layer_types"] = ["sliding_attention" if w is not None and i >= d["max_window_layers"]
                                    else "full_attention" for i in range(n)]
        d["rope_parameters"] = _rope_parameters(d)
        self._d = d

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None

    def __getattr__(self, name: str):
        d = self.__dict__.get("_d")
        if d is not None and name in d:
            return d[name]
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._raw))

    def identity(self) -> dict:
        """The raw config without the fields that do not change what the model computes (file names, versions)."""
        return {k: v for k, v in self.to_dict().items() if k not in _VOLATILE}

    def __repr__(self) -> str:
        return f"ModelConfig({self._d.get('model_type')!r}, layers={self._d.get('num_hidden_layers')})"


def _rope_parameters(d: dict) -> dict:
    """transformers' `standardize_rope_params`: one dict {rope_type, rope_theta, ...} (or one per layer type when
    config.json nests them, Gemma 3), from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        return {"rope_type": "default", "rope_theta": d.get("rope_theta")}
    if rp and all(isinstance(v, dict) for v in rp.values()):  # one table per layer type
        return {t: _standardize(dict(v), d) for t, v in rp.items()}
    return _standardize(dict(rp), d)


def _standardize(rp: dict, d: dict) -> dict:
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", d.get("rope_theta"))
    if d.get("partial_rotary_factor") is not None:
        rp.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        if d.get("original_max_position_embeddings") is not None:
            rp["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        else:
            rp.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    return rp


def layer_windows(config) -> list[int | None]:
    """The attention window of every layer: an int for a sliding-window layer (a token sees itself and the
    previous window - 1 tokens), None for full attention. From `layer_types` where the config has them (Gemma 3,
    Qwen2/3), else one `sliding_window` for all layers where the config uses one (Mistral)."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if "sliding" in str(t) and window else None for t in types[:n]]
    if window and getattr(config, "use_sliding_window", True):
        return [int(window)] * n
    return [None] * n
