"""The rotary embedding of the Llama family, computed as transformers 5.24 computes it, without transformers.

`Rotary(config, device)` is a drop-in for transformers' `LlamaRotaryEmbedding` (and Qwen2/Qwen3/Mistral's, the same
code): `rotary(x, position_ids)` returns (cos, sin) of shape [batch, positions, head_dim] in x's dtype, computed in
float32 as `position * inv_freq` (an elementwise product), `cat(freqs, freqs)`, cos/sin, times
`attention_scaling`. `inv_freq` and `attention_scaling` come from the RoPE type of `config.rope_parameters`
(skillkv.model.config standardizes them as transformers does):

  default   1 / theta^(2i / d)
  linear    default / factor
  llama3    Llama 3.1's smoothed interpolation between default and default / factor
  yarn      YaRN's ramp between extrapolation and interpolation, attention scaled by 0.1 ln(factor) + 1 (or mscale)

Types whose frequencies change with the sequence length (dynamic, longrope) are refused (`RotaryUnsupported`):
the lean runner's resolver then picks the hf runner. Tests compare cos/sin with transformers' module bit for bit.
"""

from __future__ import annotations

import math

import torch

from skillkv.engine.support import ROPE_TYPES
from skillkv.errors import SkillkvError


class RotaryUnsupported(SkillkvError):
    """The model's RoPE type is not one the lean runner computes."""


def rope_type(config) -> str:
    rp = config.rope_parameters or {}
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise RotaryUnsupported("one RoPE table per layer type (Gemma 3) needs the hf runner")
    return rp.get("rope_type") or rp.get("type") or "default"


def _base(rp: dict, dim: int, device) -> torch.Tensor:
    return 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device,
                                                                                     dtype=torch.float) / dim))


def inv_freq(config, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2], attention_scaling) for the config's RoPE type (module docstring)."""
    rp, kind = dict(config.rope_parameters), rope_type(config)
    head_dim = int(config.head_dim)
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return 1.0 / (rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)).to(device), 1.0
    if kind == "linear":
        f = _base(rp, dim, device)
        f /= rp["factor"]
        return f, 1.0
    if kind == "llama3":
        f = _base(rp, dim, device)
        factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / f
        scaled = torch.where(wavelen > low_wavelen, f / factor, f)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(config, rp, dim, device)
    raise RotaryUnsupported(f"RoPE type {kind!r} changes its frequencies with the sequence length; the lean runner "
                            f"computes {', '.join(ROPE_TYPES)} (use --engine hf)")


def _yarn(config, rp: dict, dim: int, device) -> tuple[torch.Tensor, float]:
    base, factor = rp["rope_theta"], rp.get("factor")
    original = rp["original_max_position_embeddings"]
    if factor is None:
        factor = config.max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = rp.get("attention_factor")
    if attention is None:
        mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attention = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all)) if mscale and mscale_all \
            else get_mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1 - ramp.to(device=device, dtype=torch.float)
    f = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return f, attention


class Rotary:
    """cos/sin of positions (module docstring). `inv_freq` lives on `device`."""

    def __init__(self, config, device=None):
        self.inv_freq, self.attention_scaling = inv_freq(config, device)
        self.rope_type = rope_type(config)

    def to(self, device) -> Rotary:
        self.inv_freq = self.inv_freq.to(device)
        return self

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
