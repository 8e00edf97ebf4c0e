"""Attention backends against the torch reference on random paged batches: ragged sequences, scattered pages, KV
lengths that are not multiples of the page size, GQA. On the CPU the FA3 backend's plans (page table, cu_seqlens,
cache_seqlens, the fresh-sequence path) run through a torch stand-in of `flash_attn_with_kvcache`; on a Hopper GPU
the real FA3 runs. Plus exact mode == full mode on every backend at hand, and auto's choice."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

from skillkv.engine.attention import SeqView, TorchBackend, auto_backend, make_backend
from skillkv.engine.attention_fa3 import FA3Backend
from skillkv.engine.pool import KVPool

HAS_FA3 = importlib.util.find_spec("flash_attn_interface") is not None
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _causal(q, k, v, scale):
    """q [n, H, D] at the end of k, v [L, Hk, D]: lower-right causal SDPA, float32."""
    n, L = q.shape[0], k.shape[0]
    mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(L - n, L, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                                       v.float().transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1).to(q.dtype)


def reference_kvcache(q, k_cache, v_cache, cache_seqlens=None, page_table=None, cu_seqlens_q=None,
                      max_seqlen_q=None, softmax_scale=None, causal=True, num_splits=0):
    """What FA3's flash_attn_with_kvcache computes for the calls the backend makes, in torch."""
    assert causal
    if page_table is None:
        return _causal(q[0], k_cache[0], v_cache[0], softmax_scale)[None]
    ps, out = k_cache.shape[1], torch.zeros_like(q)
    cu, lens = cu_seqlens_q.tolist(), cache_seqlens.tolist()
    assert max(b - a for a, b in zip(cu, cu[1:])) <= max_seqlen_q
    for i, L in enumerate(lens):
        if cu[i + 1] == cu[i]:
            continue
        pages = page_table[i, :-(-L // ps)].long()
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:L]
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:L]
        out[cu[i]:cu[i + 1]] = _causal(q[cu[i]:cu[i + 1]], k, v, softmax_scale)
    return out


def _random_batch(pool: KVPool, rng: random.Random, layers: int):
    """A few sequences over scattered pages; the pool's rows hold random KV; returns seqs and per-layer q."""
    free = list(range(pool.num_pages))
    rng.shuffle(free)
    seqs = []
    for _ in range(rng.randint(1, 5)):
        q_len = rng.choice([1, 2, 7, 16, 33])
        kv_len = q_len + rng.choice([0, 1, 15, 16, 17, 100, 301])
        n = pool.table.pages_for(kv_len)
        seqs.append(SeqView([free.pop() for _ in range(n)], kv_len, q_len))
    total = sum(s.q_len for s in seqs)
    return seqs, total


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("seed", range(4))
def test_fa3_matches_the_torch_backend_on_random_paged_batches(seed, where):
    """cpu: the backend's plans through the torch stand-in; cuda: the real FA3 kernels (Hopper, fa3 installed)."""
    if where == "cuda" and not (HAS_FA3 and HOPPER):
        pytest.skip("needs FlashAttention-3 on a Hopper GPU")
    rng = random.Random(seed)
    dev = where
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q_heads, kv_heads, d, layers = 8, 2, 64, 2
    pool = KVPool(layers, kv_heads, d, dtype, dev, budget_bytes=400 * 2 * layers * 16 * kv_heads * d * 4)
    g = torch.Generator().manual_seed(seed)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g))
    scale = d ** -0.5
    ref = TorchBackend(pool, q_heads, scale)
    fa3 = FA3Backend(pool, q_heads, scale, kernel=None if dev == "cuda" else reference_kvcache)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for _ in range(3):
        seqs, total = _random_batch(pool, rng, layers)
        ref.plan(seqs)
        fa3.plan(seqs)
        for layer in range(layers):
            q = torch.randn(total, q_heads, d, generator=g).to(dev, dtype)
            a, b = fa3.run(layer, q), ref.run(layer, q)
            assert a.shape == b.shape
            assert float((a.float() - b.float()).norm() / b.float().norm()) < tol
    # one sequence with no cached prefix: attention over the step's own rows, not the pool's
    n = 37
    k = torch.randn(n, kv_heads, d, generator=g).to(dev, dtype)
    v = torch.randn(n, kv_heads, d, generator=g).to(dev, dtype)
    q = torch.randn(n, q_heads, d, generator=g).to(dev, dtype)
    fa3.plan([SeqView([0, 1, 2], n, n)])
    assert fa3.fresh
    out = fa3.run(0, q, k, v)
    assert float((out.float() - _causal(q, k, v, scale).float()).norm() / out.float().norm()) < tol


def test_auto_backend_choices():
    assert auto_backend(torch.device("cpu")) == "torch"
    pool = KVPool(1, 1, 8, torch.float32, "cpu", budget_bytes=1 << 16)
    assert make_backend("auto", pool, 1, 1.0).name == "torch"
    with pytest.raises(Exception):
        make_backend("torch:3", pool, 1, 1.0)
    with pytest.raises(Exception):
        make_backend("nope", pool, 1, 1.0)


def _cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    names = ["torch"]
    if importlib.util.find_spec("flashinfer") is not None:
        names.append("flashinfer")
    if HAS_FA3 and HOPPER:
        names.append("fa3")
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("attention", _cuda_backends() or ["none"])
def test_exact_mode_equals_full_mode_on_every_backend(attention):
    """Exact reuse is bitwise equal to a from-scratch prefill cut at the same segment boundaries, with graphs."""
    if attention == "none":
        pytest.skip("no CUDA")
    from skillkv.engine.paged import PagedEngine
    from skillkv.model import resolve_model

    model = resolve_model("dummy:smollm2-135m", device="cuda", dtype=torch.bfloat16).load()
    eng = PagedEngine(model, budget_bytes=256 << 20, attention=attention, page_size=16)
    assert eng.backend.name == attention
    g = torch.Generator().manual_seed(7)
    for plen, qlen in ((800, 40), (1000, 100), (37, 5), (5000, 600)):
        prefix = torch.randint(0, 49152, (plen,), generator=g).tolist()
        q = torch.randint(0, 49152, (qlen,), generator=g).tolist()
        r = eng.start(None)
        eng.prefill([r], [prefix])
        kv = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, plen)) for i in range(eng.pool.layers)]
        segmented = eng.prefill([r], [q])[0]
        eng.finish(r)
        eng.make_resident(f"p{plen}", plen, lambda: kv)
        r = eng.start(f"p{plen}")
        cached = eng.prefill([r], [q])[0]
        eng.finish(r)
        assert torch.equal(cached, segmented), (attention, plen, qlen)
        eng.table.check()


def test_engine_with_the_fa3_plans_on_the_cpu_matches_the_torch_engine():
    """The runner's new K/V rows reach the fresh-sequence path; paged steps read the pool (FA3 stand-in)."""
    from skillkv.engine.paged import PagedEngine
    from skillkv.model import resolve_model

    tiny_model = resolve_model("dummy:tiny", device="cpu").load()
    engines = {}
    for name in ("torch", "fa3"):
        eng = PagedEngine(tiny_model, budget_bytes=1 << 20, attention="torch", page_size=4)
        if name == "fa3":
            eng.backend = eng.runner.backend = FA3Backend(eng.pool, eng.runner.q_heads, eng.backend.scale,
                                                          kernel=reference_kvcache)
        engines[name] = eng
    prefix, qs = list(range(5, 27)), [[40, 41, 42], [50, 51]]
    out = {}
    for name, eng in engines.items():
        r = eng.start(None)
        first = eng.prefill([r], [prefix])
        reqs = [r] + [eng.start(None) for _ in qs[1:]]
        eng.prefill(reqs[1:], [prefix])
        out[name] = (first, eng.prefill(reqs, qs))
        for rq in reqs:
            eng.finish(rq)
        eng.table.check()
    for a, b in zip(out["fa3"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 37), (8, 8), (24, 1861), (7, 300), (64, 64), (33, 333)])
def test_torch_backend_bits_do_not_depend_on_page_placement(q_len, kv_len):
    """Consecutive pages are attended over as a view of the pool, scattered ones gathered into a copy: the same
    rows give the same bits either way (exact mode == full mode rests on it), fp32 and bf16, with GQA."""
    for dtype in (torch.float32, torch.bfloat16):
        q_heads, kv_heads, d, ps = 9, 3, 64, 16
        pool = KVPool(2, kv_heads, d, dtype, "cpu", budget_bytes=600 * 2 * 2 * ps * kv_heads * d * 4, page_size=ps)
        n = pool.table.pages_for(kv_len)
        g = torch.Generator().manual_seed(kv_len)
        k = torch.randn(kv_len, kv_heads, d, generator=g).to(dtype)
        v = torch.randn(kv_len, kv_heads, d, generator=g).to(dtype)
        q = torch.randn(q_len, q_heads, d, generator=g).to(dtype)
        runs = [list(range(5, 5 + n)), random.Random(q_len).sample(range(200, 500), n)]
        if n > 1:
            runs.append(list(range(300, 300 + n - 1)) + [100])  # consecutive but for the last page
        outs = []
        for pages in runs:
            pool.load_layer(1, pages, k, v)
            b = TorchBackend(pool, q_heads, d ** -0.5)
            b.plan([SeqView(pages, kv_len, q_len)])
            outs.append(b.run(1, q))
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        assert float((outs[0].float() - _causal(q, k, v, d ** -0.5).float()).abs().max()) < 2e-2
