"""The lean runner's own RMSNorm and rotary embedding against transformers' modules, bit for bit: every RoPE type the
lean runner computes (default, linear, llama3, yarn), the config forms transformers accepts (rope_parameters,
rope_theta + rope_scaling), fp32 and bf16; and the lean runner built from safetensors against the one built from
the transformers model's parameters."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from skillkv.engine.ops import RMSNorm
from skillkv.engine.rotary import Rotary, RotaryUnsupported
from skillkv.engine.support import unsupported
from skillkv.model import DUMMY_PRESETS, ModelConfig

BASE = dict(DUMMY_PRESETS["smollm2-135m"])
ROPES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "default-v4-form": dict(rope_theta=500000.0, rope_scaling=None),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "linear-v4-form": dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama3": dict(DUMMY_PRESETS["llama-3.1-8b"], max_position_embeddings=8192),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 2048}),
    "yarn-mscale": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 0.707,
                                         "mscale_all_dim": 0.707, "beta_fast": 16, "original_max_position_embeddings": 4096}),
    "yarn-no-truncate": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                              "truncate": False, "original_max_position_embeddings": 4096}),
}


def _configs(extra: dict):
    raw = {k: v for k, v in BASE.items() if k not in ("rope_theta",)}
    raw.update(extra)
    d = dict(raw)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    return ModelConfig(raw), hf


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_equals_transformers_bit_for_bit(name, dtype):
    mine_cfg, hf_cfg = _configs(ROPES[name])
    ref = LlamaRotaryEmbedding(hf_cfg)
    mine = Rotary(mine_cfg)
    assert mine.attention_scaling == ref.attention_scaling
    assert torch.equal(mine.inv_freq, ref.inv_freq)
    x = torch.zeros(1, dtype=dtype)
    for pos in (torch.arange(0, 1024)[None], torch.arange(4000, 4100)[None], torch.tensor([[7, 3, 100000]])):
        c1, s1 = mine(x[None], pos)
        c2, s2 = ref(x[None], pos)
        assert c1.dtype == c2.dtype == dtype
        assert torch.equal(c1, c2) and torch.equal(s1, s2)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                                  {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 32,
                                   "long_factor": [1.0] * 32}])
def test_length_dependent_rope_is_left_to_the_hf_runner(rope):
    cfg = ModelConfig(dict(BASE, rope_parameters=rope))
    assert "use --engine hf" in unsupported(cfg)
    with pytest.raises(RotaryUnsupported):
        Rotary(cfg)


@pytest.mark.parametrize("threads", [1, 2])
def test_silu_mul_in_row_blocks_equals_the_plain_formula_bit_for_bit(threads):
    """TorchOps.silu_mul runs mid-sized steps in serial row blocks (engine/ops.py): the same bits as silu(g) * u
    computed in one call, at every row count (blocked or not) and thread count."""
    from skillkv.engine.ops import GRAIN, SERIAL_MAX, TorchOps

    ops, old = TorchOps(None, 64), torch.get_num_threads()
    torch.manual_seed(0)
    try:
        torch.set_num_threads(threads)
        for cols in (1536, 2048, 5000):
            for rows in sorted({1, 7, GRAIN // cols, GRAIN // cols + 1, 24, 40, SERIAL_MAX // cols, 200}):
                gu = torch.randn(rows, 2 * cols) * 4
                g, u = gu.chunk(2, dim=-1)
                assert torch.equal(ops.silu_mul(gu), torch.nn.functional.silu(g) * u), (rows, cols)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_equals_transformers_bit_for_bit(dtype):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(576, eps=9.999999747378752e-06).to(dtype)
    with torch.no_grad():
        ref.weight.normal_(1, 0.2)
    mine = RMSNorm(ref.weight.detach(), ref.variance_epsilon)
    for rows in (1, 7, 24, 333):
        x = (torch.randn(rows, 576) * 3).to(dtype)
        with torch.no_grad():
            assert torch.equal(mine(x), ref(x))


def test_config_view_derives_what_transformers_derives():
    """head_dim, kv heads, defaults by family, Qwen2's layer types and windows, Mistral's default window."""
    cfg = ModelConfig({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2})
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (16, 4, 1e-6, False)
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    q = ModelConfig({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3,
                     "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1})
    hf = AutoConfig.for_model("qwen2", hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                              use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert q.layer_types == hf.layer_types and q.sliding_window == hf.sliding_window
    assert "sliding-window" in unsupported(q)
    assert unsupported(ModelConfig({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                                    "num_hidden_layers": 3, "sliding_window": 16})) is None
    m = ModelConfig({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2})
    assert m.sliding_window == AutoConfig.for_model("mistral").sliding_window and unsupported(m)
    assert unsupported(ModelConfig({**q.to_dict(), "model_type": "gemma3_text"})).startswith("the paged engine")
