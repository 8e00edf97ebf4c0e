"""The CPU weight GEMM (engine/gemm.py, oneDNN by default): a row's bits do not depend on how many rows the step
has once it has 8 or more (engine/llama.py pads steps to multiples of 8, and exact mode == full mode and the
server's batch invariance rest on it), the same step gives the same bits twice, and it computes F.linear's math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skillkv.engine.gemm import Linear, _has_onednn

# the default model's shapes: qkv, o, gate_up, down, lm_head ([N, K])
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


@pytest.mark.skipif(not _has_onednn(), reason="torch built without oneDNN")
def test_auto_is_onednn_on_the_cpu_for_float32():
    assert Linear("auto", torch.device("cpu")).mode == "onednn"
    assert Linear("auto", torch.device("cpu"), torch.bfloat16).mode == "cublas"
    with pytest.raises(ValueError):
        Linear("onednn", torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("mode", ["onednn", "cublas"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_rows_do_not_depend_on_the_row_count_from_8_rows(mode, shape):
    if mode == "onednn" and not _has_onednn():
        pytest.skip("torch built without oneDNN")
    lin = Linear(mode, torch.device("cpu"))
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = lin.prepare(torch.randn(n, k, generator=g) * 0.02)
    b = torch.randn(n, generator=g) * 0.01 if n == 960 else None
    x = torch.randn(1024, k, generator=g)
    ref = lin(x[:8], w, b)
    rows = [8, 16, 24, 104, 512, 1024] if mode == "cublas" else [8, 9, 13, 16, 22, 24, 25, 104, 333, 512, 1024]
    for m in rows:  # MKL (cublas mode on the CPU) only for multiples of 8; oneDNN for any M >= 8
        assert torch.equal(lin(x[:m], w, b)[:8], ref), m
    assert torch.equal(lin(x[:24], w, b), lin(x[:24], w, b))
    torch.testing.assert_close(lin(x[:24], w, b), F.linear(x[:24], w, b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lin(x[:1], w, b), F.linear(x[:1], w, b), rtol=1e-4, atol=1e-5)
