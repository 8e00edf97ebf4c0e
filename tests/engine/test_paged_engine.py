"""The paged engine on the CPU: page-table invariants, the lean runner vs transformers, exact prefix reuse."""

from __future__ import annotations

import random

import pytest
import torch

from skillkv.engine.pages import PageTable, PoolFull
from skillkv.engine.paged import PagedEngine


def test_page_table_invariants_under_random_operations():
    rng = random.Random(0)
    t = PageTable(num_pages=40, page_size=4)
    live: dict[str, int] = {}  # key -> refs we hold
    private: list[list[int]] = []
    for step in range(400):
        op = rng.choice(["add", "acquire", "release", "alloc", "free", "pin"])
        try:
            if op == "add":
                key, tokens = f"k{step}", rng.randint(1, 30)
                pages = t.alloc(t.pages_for(tokens))
                t.add(key, pages, tokens, pinned=rng.random() < 0.2)
                live[key] = 0
            elif op == "acquire" and t.entries:
                key = rng.choice(list(t.entries))
                t.acquire(key)
                live[key] = live.get(key, 0) + 1
            elif op == "release":
                held = [k for k, n in live.items() if n and k in t.entries]
                if held:
                    k = rng.choice(held)
                    t.release(k)
                    live[k] -= 1
            elif op == "alloc":
                private.append(t.alloc(rng.randint(1, 6)))
            elif op == "free" and private:
                t.free_private(private.pop(rng.randrange(len(private))))
            elif op == "pin" and t.entries:
                t.pin(rng.choice(list(t.entries)))
        except PoolFull:
            pass
        t.check()
        # a referenced entry is never evicted
        for k, n in live.items():
            if n:
                assert k in t.entries


def test_alloc_evicts_lru_unpinned_first_and_never_referenced():
    t = PageTable(num_pages=6, page_size=1)
    for key in "abc":
        t.add(key, t.alloc(2), 2)
    t.pin("a")
    t.acquire("b")
    t.lookup("a")
    got = t.alloc(2)  # must evict c (unpinned, unreferenced), not a (pinned) nor b (referenced)
    assert set(t.entries) == {"a", "b"} and len(got) == 2
    with pytest.raises(PoolFull):
        t.alloc(5)  # only a's 2 pages are evictable: free 0 + 2 < 5
    t.check()
    assert set(t.entries) == {"a", "b"}  # a failed alloc changes nothing


@pytest.fixture(scope="module")
def tiny_model():
    from skillkv.model import resolve_model

    h = resolve_model("dummy:tiny", device="cpu")
    return h.load()


def _hf_last_logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_lean_runner_matches_transformers(tiny_model):
    eng = PagedEngine(tiny_model, budget_bytes=1 << 20, attention="torch", page_size=4)
    ids = list(range(3, 40))
    req = eng.start(None)
    logits = eng.prefill([req], [ids])[0]
    torch.testing.assert_close(logits, _hf_last_logits(tiny_model, ids), rtol=1e-4, atol=1e-4)
    eng.finish(req)
    eng.table.check()
    assert eng.table.used_pages() == 0


def test_exact_prefix_reuse_in_the_pool_equals_full_prefill(tiny_model):
    """A prefix made resident (partial last page: the first request appends in its tail, the others copy it) then
    several questions, batched; the prefix's rows are never written."""
    eng = PagedEngine(tiny_model, budget_bytes=1 << 20, attention="torch", page_size=4)
    prefix = list(range(5, 27))  # 22 tokens: 5 full pages + 2 tokens in a shared partial page
    questions = [[40, 41, 42], [50, 51], [60, 61, 62, 63, 64]]
    # the prefix KV, computed once by the engine itself (as compile does)
    r = eng.start(None)
    eng.prefill([r], [prefix])
    kv = [tuple(x.clone() for x in eng.pool.gather(layer, r.pages, len(prefix))) for layer in range(eng.pool.layers)]
    eng.finish(r)
    assert eng.make_resident("p", len(prefix), lambda: kv) == "loaded"
    assert eng.make_resident("p", len(prefix), lambda: kv) == "l1"
    shared_before = [eng.pool.k[:, p].clone() for p in eng.table.entries["p"].pages]
    reqs = [eng.start("p") for _ in questions]
    assert [r.tail for r in reqs] == [True, False, False] and reqs[1].cow is None and len(reqs[1].private) == 1
    batched = eng.prefill(reqs, questions)
    for q, got in zip(questions, batched):
        f = eng.start(None)
        ref = eng.prefill([f], [prefix + q])[0]
        eng.finish(f)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, _hf_last_logits(tiny_model, prefix + q), rtol=1e-4, atol=1e-4)
    # decode a few steps on every request, then check the prefix's rows were never written
    for _ in range(3):
        nxt = [[int(torch.argmax(l))] for l in batched]
        batched = eng.prefill(reqs, nxt)
    rows = [len(prefix) - i * 4 for i in range(len(shared_before))]
    for before, p, n in zip(shared_before, eng.table.entries["p"].pages, rows):
        assert torch.equal(before[:, :n], eng.pool.k[:, p, :n])
    for r in reqs:
        eng.finish(r)
    eng.table.check()
    assert eng.table.entries["p"].refs == 0 and not eng.table.entries["p"].tail_taken
    again = eng.start("p")  # the tail is free again
    assert again.tail and again.pages == eng.table.entries["p"].pages
    eng.finish(again)


def test_eviction_under_a_small_budget_still_answers(tiny_model):
    page_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers, page_size 4, kv_heads 2, head_dim 16, fp32, k and v
    eng = PagedEngine(tiny_model, budget_bytes=page_bytes * 12, attention="torch", page_size=4)
    prefixes = {f"s{i}": list(range(10 + i, 30 + i)) for i in range(4)}  # 5 pages each; pool holds 2 at a time
    kvs = {}
    for key, ids in prefixes.items():
        r = eng.start(None)
        eng.prefill([r], [ids])
        kvs[key] = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, len(ids))) for i in range(eng.pool.layers)]
        eng.finish(r)
    for rnd in range(2):
        for key, ids in prefixes.items():
            eng.make_resident(key, len(ids), lambda k=key: kvs[k])
            r = eng.start(key)
            got = eng.prefill([r], [[7, 8]])[0]
            eng.finish(r)
            torch.testing.assert_close(got, _hf_last_logits(tiny_model, ids + [7, 8]), rtol=1e-4, atol=1e-4)
            eng.table.check()
            assert eng.pool.nbytes <= eng.pool.budget_bytes
    assert eng.table.evictions >= 4


def _fast_backends() -> list[str]:
    """The CUDA backends installed here besides the torch reference (for parametrized GPU tests)."""
    import importlib.util

    if not torch.cuda.is_available():
        return ["flashinfer"]  # the test is skipped anyway (gpu mark)
    names = [n for n, mod in (("flashinfer", "flashinfer"), ("fa3", "flash_attn_interface"))
             if importlib.util.find_spec(mod) is not None]
    if torch.cuda.get_device_capability()[0] != 9 and "fa3" in names:
        names.remove("fa3")
    return names or ["none"]


@pytest.mark.gpu
@pytest.mark.parametrize("fast", _fast_backends())
def test_fast_backend_matches_torch_backend_on_random_batches(fast):
    from skillkv.model import resolve_model

    if fast == "none":
        pytest.skip("neither flashinfer nor fa3 is installed")
    model = resolve_model("dummy:smollm2-135m", device="cuda", dtype=torch.bfloat16).load()
    engines = {name: PagedEngine(model, budget_bytes=256 << 20, attention=name, page_size=16)
               for name in ("torch", fast)}
    g = torch.Generator().manual_seed(0)
    for trial in range(3):
        prefix = torch.randint(0, 49152, (int(torch.randint(20, 900, (1,), generator=g)),), generator=g).tolist()
        qs = [torch.randint(0, 49152, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
              for _ in range(5)]
        out = {}
        for name, eng in engines.items():
            r = eng.start(None)
            eng.prefill([r], [prefix])
            kv = [eng.pool.gather(i, r.pages, len(prefix)) for i in range(eng.pool.layers)]
            kv = [(k.clone(), v.clone()) for k, v in kv]
            eng.finish(r)
            eng.make_resident(f"t{trial}", len(prefix), lambda: kv)
            reqs = [eng.start(f"t{trial}") for _ in qs]
            out[name] = eng.prefill(reqs, qs)
            for r in reqs:
                eng.finish(r)
            eng.table.check()
        err = (out[fast] - out["torch"]).norm() / out["torch"].norm()
        assert err < 2e-2, err


@pytest.mark.gpu
def test_exact_mode_on_the_gpu_engine():
    """Exact reuse is bitwise equal to a from-scratch prefill cut at the same segment boundaries (what compile and
    full mode compute); an uncut prefill differs only by bf16 rounding of other kernel shapes."""
    from skillkv.model import resolve_model

    model = resolve_model("dummy:smollm2-135m", device="cuda", dtype=torch.bfloat16).load()
    eng = PagedEngine(model, budget_bytes=256 << 20, attention="auto", page_size=16)
    prefix, q = list(range(100, 900)), list(range(1000, 1040))
    r = eng.start(None)
    eng.prefill([r], [prefix])
    kv = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, len(prefix))) for i in range(eng.pool.layers)]
    segmented = eng.prefill([r], [q])[0]
    eng.finish(r)
    r = eng.start(None)
    uncut = eng.prefill([r], [prefix + q])[0]
    eng.finish(r)
    eng.make_resident("p", len(prefix), lambda: kv)
    r = eng.start("p")
    cached = eng.prefill([r], [q])[0]
    eng.finish(r)
    assert torch.equal(cached, segmented)
    assert ((cached - uncut).norm() / uncut.norm()) < 6e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fast", _fast_backends())
def test_cuda_graph_replay_matches_eager_forward(fast):
    """Graph replays (padded buckets, fillers, several prefix lengths, decode steps) against the eager forward."""
    from skillkv.engine.cuda_graph import bucket
    from skillkv.model import resolve_model

    if fast == "none":
        pytest.skip("neither flashinfer nor fa3 is installed")
    model = resolve_model("dummy:smollm2-135m", device="cuda", dtype=torch.bfloat16).load()
    eng = PagedEngine(model, budget_bytes=256 << 20, attention=fast, page_size=16)
    assert eng.graphs is not None
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
    for trial, (plen, qlens) in enumerate([(37, [5]), (700, [100]), (1500, [1, 3, 17]), (16, [31, 2, 9, 60, 1])]):
        prefix = rand(plen)
        r = eng.start(None)
        eng.prefill([r], [prefix])
        kv = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, plen)) for i in range(eng.pool.layers)]
        eng.finish(r)
        eng.make_resident(f"g{trial}", plen, lambda: kv)
        qs = [rand(n) for n in qlens]
        out, fed = {}, []
        for mode in ("graph", "eager"):
            saved = eng.graphs
            eng.graphs = saved if mode == "graph" else None
            reqs = [eng.start(f"g{trial}") for _ in qs]
            steps = [eng.prefill(reqs, qs)]
            for i in range(3):  # decode steps: one token per request, the graph run's tokens fed to both modes
                if mode == "graph":
                    fed.append([[int(x.argmax())] for x in steps[-1]])
                steps.append(eng.prefill(reqs, fed[i]))
            for rq in reqs:
                eng.finish(rq)
            eng.graphs = saved
            out[mode] = steps
        for a, b in zip(out["graph"], out["eager"]):  # other GEMM shapes (unpadded): bf16 rounding only
            assert (a - b).norm() / b.norm() < 0.1
        # the same padded kernels run eagerly (what layer-pipelined paging does) give the replay's bits
        reqs = [eng.start(f"g{trial}") for _ in qs]
        replayed = eng.prefill(reqs, qs)
        for rq in reqs:
            eng.finish(rq)
        reqs = [eng.start(f"g{trial}") for _ in qs]
        stepped = eng.prefill(reqs, qs, layer_ready=lambda i: None)
        for rq in reqs:
            eng.finish(rq)
        assert torch.equal(replayed, stepped)
        eng.table.check()
    assert eng.graphs.replays >= 16 and any(k[:2] == bucket(1, 100) for k in eng.graphs.graphs)
    assert eng.table.used_pages() == 1 + sum(len(e.pages) for e in eng.table.entries.values())  # + scratch page
