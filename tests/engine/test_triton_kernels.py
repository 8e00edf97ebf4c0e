"""The Triton kernels of the engine (engine/triton_ops.py, engine/gemm.py) against torch references.

On a CUDA machine they run as compiled; elsewhere, when triton is importable, through Triton's interpreter
(TRITON_INTERPRET=1, numpy on the CPU; its bf16 matrix product is unusable, so the GEMM is checked in float32
there). Skipped where triton is not installed (the CPU CI).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.triton]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("m,n,k", [(5, 256, 512), (100, 384, 1024), (1, 128, 256), (17, 256, 2048)])
def test_skinny_gemm_matches_a_float_reference_and_is_deterministic(m, n, k):
    from skillkv.engine.gemm import config, skinny_linear

    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype)
    ref = x.double() @ w.double().t()
    for split in (1, 2, 4):
        cfg = config(m, n, k, sms=4)
        cfg = (cfg[0], cfg[1], cfg[2], split) + cfg[4:]
        y = skinny_linear(x, w, None, cfg)
        assert _rel(y, ref) < (1e-2 if CUDA else 1e-5)
        assert torch.equal(y, skinny_linear(x, w, None, cfg))  # the split order is fixed: same bits
        yb = skinny_linear(x, w, b, cfg)
        assert _rel(yb, ref + b.double()) < (1e-2 if CUDA else 1e-5)


def test_gemm_config_splits_until_the_sms_are_covered():
    from skillkv.engine.gemm import config

    assert config(104, 6144, 4096) == (128, 128, 64, 4, 4, 4)  # 48 tiles x 4 splits
    assert config(104, 4096, 14336)[3] == 8
    assert config(104, 28672, 4096)[3] == 1
    assert config(1, 128256, 4096)[:4] == (16, 128, 64, 1)
    assert config(129, 4096, 4096) is None and config(8, 100, 4096) is None


def _rotary(head_dim: int, max_pos: int):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = AutoConfig.for_model("llama", hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=10000.0)
    return LlamaRotaryEmbedding(cfg).to(DEV)


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (9, 3, 64), (32, 8, 128)])
def test_rope_store_rotates_like_transformers_and_writes_the_slots(hq, hk, d):
    from skillkv.engine.ops import TorchOps
    from skillkv.engine.triton_ops import TritonOps

    n, dtype = 7, torch.bfloat16
    rot = _rotary(d, 512)
    g = torch.Generator().manual_seed(hq)
    qkv = torch.randn(n, (hq + 2 * hk) * d, generator=g).to(DEV, dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(n, hk, d)
    v = qkv[:, (hq + hk) * d:].view(n, hk, d)
    pos = torch.tensor([0, 1, 5, 100, 101, 300, 511], device=DEV)
    slots = torch.tensor([3, 17, 18, 40, 2, 63, 33], device=DEV)
    pool = type("Pool", (), {})()
    pool.k, pool.v = [torch.zeros(4, 16, hk, d, dtype=dtype, device=DEV)], [torch.zeros(4, 16, hk, d, dtype=dtype,
                                                                                          device=DEV)]
    ops = TritonOps(rot, d, 512, torch.device(DEV))
    ops.begin(None, pos)
    qr, kr = ops.rope_store(q, k, v, pool, 0, slots)
    ref = TorchOps(rot, d)
    ref.begin(torch.zeros(1, dtype=torch.float32, device=DEV), pos)
    rq, rk = ref.rope(q.float(), k.float())
    assert qr.is_contiguous() and kr.is_contiguous()
    assert _rel(qr, rq) < 5e-3 and _rel(kr, rk) < 5e-3
    assert torch.equal(pool.k[0].view(-1, hk, d)[slots], kr)
    assert torch.equal(pool.v[0].view(-1, hk, d)[slots], v)
    untouched = torch.ones(64, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert not pool.k[0].view(-1, hk, d)[untouched].any()


def test_norms_and_silu_mul_match_the_torch_modules():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from skillkv.engine.triton_ops import TritonOps

    h, dtype = 96, torch.bfloat16
    ln = LlamaRMSNorm(h, eps=1e-5).to(DEV, dtype)
    ln.weight.data = torch.linspace(0.5, 1.5, h).to(DEV, dtype)
    ops = TritonOps(_rotary(16, 64), 16, 64, torch.device(DEV))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, h, generator=g).to(DEV, dtype)
    a = torch.randn(5, h, generator=g).to(DEV, dtype)
    assert _rel(ops.norm(x, ln), ln(x)) < 1e-2
    a2, x2 = a.clone(), x.clone()
    y, s = ops.add_norm(a2, x2, ln)
    assert s.data_ptr() == x2.data_ptr() and y.data_ptr() == a2.data_ptr()
    if CUDA:  # the interpreter rounds float32 -> bf16 by truncation, the GPU to nearest even (as torch)
        assert torch.equal(s, x + a)
    assert _rel(s, x + a) < 1e-2
    assert _rel(y, ln(x + a)) < 1e-2
    gu = torch.randn(5, 2 * h, generator=g).to(DEV, dtype)
    assert _rel(ops.silu_mul(gu), F.silu(gu[:, :h].float()) * gu[:, h:].float()) < 1e-2
