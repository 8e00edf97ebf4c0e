"""The prefix cache over every prompt (engine/prefix_cache.py, engine/pages.py, engine/paged.py, runners/paged.py):
chunk invariance of the engine (a row's KV and logits are the same bits however its sequence was cut into steps),
hits equal to a full prefill bit for bit, the page table's invariants after every operation, LRU eviction of
unheld pages (deepest first), held pages never evicted, entry pages in the index, duplicates."""

from __future__ import annotations

import random

import pytest
import torch

from skillkv.engine.pages import PageTable, PoolFull
from skillkv.engine.prefix_cache import ROOT, PrefixCache, chain_key

PS = 4


@pytest.fixture(scope="module")
def tiny_weights():
    from skillkv.engine.weights import as_weights
    from skillkv.model import resolve_model

    return as_weights(resolve_model("dummy:tiny", device="cpu").load())


def _runner(weights, pages=200, spill_pages=0):
    from skillkv.runners.paged import PagedRunner

    page_bytes = 2 * weights.config.num_hidden_layers * PS * weights.config.num_key_value_heads * \
        weights.config.head_dim * 4
    r = PagedRunner(weights, (pages + 1) * page_bytes, attention="torch", batch_invariant=None, page_size=PS,
                    spill_bytes=spill_pages * page_bytes)
    assert r.prefix_cache, r.cache_note  # exact or approximate, as this machine's kernels allow
    return r


def _kv(runner, seq, n):
    return runner.read(seq, 0, n)


def same(runner, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit where the runner's cache is exact (checked on this machine); else to float32 rounding (a CPU
    whose kernels are not chunk-invariant: the cache is then approximate, and only auto mode reads it)."""
    if runner.cache_exact:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_rows_kv_does_not_depend_on_how_its_sequence_was_cut(tiny_weights):
    """The property the cache rests on, on the real engine: one prefill == pieces == pieces + 1-token steps; and
    the runner's verdict (checked at load) says so exactly where it holds on this machine."""
    r = _runner(tiny_weights)
    rng = random.Random(0)
    ids = [rng.randrange(3, 250) for _ in range(301)]
    outs = []
    for cuts in ([], [100], [1, 2, 3, 60, 61, 290], list(range(280, 301))):
        seq = r.open(None)
        prev, logits = 0, None
        for c in cuts + [len(ids)]:
            logits = r.prefill([seq], [ids[prev:c]])[0]
            prev = c
        outs.append((logits, _kv(r, seq, len(ids))))
        r.release(seq)
    holds = all(torch.equal(logits, outs[0][0]) and all(torch.equal(a, b) for (ka, va), (kb, vb) in zip(
        kv, outs[0][1]) for a, b in ((ka, kb), (va, vb))) for logits, kv in outs[1:])
    assert holds == r.cache_exact, r.cache_note
    for logits, _ in outs[1:]:
        assert same(r, logits, outs[0][0])


def _turn(runner, ids, answer_len, rng):
    """Open over the cache, prefill the rest, decode `answer_len` greedy tokens; returns (answer ids, first logits,
    reused tokens). The answer's tokens are fed back, as a decode does, except the last sampled one."""
    seq, info = runner.open_cached(ids)
    logits = runner.prefill([seq], [ids[seq.length:]])[0]
    first, out = logits, []
    for _ in range(answer_len):
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits = runner.prefill([seq], [[tok]])[0]
    runner.release(seq)
    runner.table.check()
    return out, first, info["prefix_cache"]


def _full(runner, ids):
    seq = runner.open(None)
    logits = runner.prefill([seq], [ids])[0]
    runner.release(seq)
    return logits


def test_a_conversation_reuses_every_full_page_and_equals_a_full_prefill(tiny_weights):
    r = _runner(tiny_weights)
    rng = random.Random(1)
    ids = [rng.randrange(3, 250) for _ in range(37)]
    for turn in range(5):
        answer, first, reused = _turn(r, ids, 6, rng)
        assert same(r, first, _full(r, ids)), turn  # exact: the first token's logits of a full prefill
        if turn:
            assert reused == (len(prev) // PS) * PS  # every full page of the previous prompt and answer
        prev = ids + answer
        ids = prev + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 20))]
    use = r.usage()
    assert use["cached_pages"] > 0 and use["cache_hits"] > 0


def test_interleaved_conversations_share_a_common_head(tiny_weights):
    r = _runner(tiny_weights)
    rng = random.Random(2)
    head = [rng.randrange(3, 250) for _ in range(40)]
    a, b = head + [5, 6, 7], head + [8, 9, 10, 11]
    _turn(r, a, 3, rng)
    _, first, reused = _turn(r, b, 3, rng)
    assert reused == 40 and same(r, first, _full(r, b))


def test_cached_pages_are_evicted_least_recent_first_and_held_ones_never(tiny_weights):
    r = _runner(tiny_weights, pages=30)
    rng = random.Random(3)
    first = [rng.randrange(3, 250) for _ in range(40)]
    _turn(r, first, 0, rng)  # 10 pages cached
    held, _ = r.open_cached(first + [1])
    assert held.length == 40
    for _ in range(6):  # other prompts need the room: evictions, never of the held pages
        _turn(r, [rng.randrange(3, 250) for _ in range(40)], 0, rng)
    assert all(cp.page in r.table.cache.by_page for cp in held.held)
    r.release(held)
    r.table.check()
    with pytest.raises(PoolFull):
        r.table.alloc(31)


def test_page_table_cache_bookkeeping_and_eviction_order():
    t = PageTable(num_pages=8, page_size=PS)
    pages = t.alloc(3)
    keys, parent = [], ROOT
    cps = []
    for depth, p in enumerate(pages):
        toks = tuple(range(depth * PS, depth * PS + PS))
        k = chain_key(parent, toks)
        cps.append(t.publish(p, k, parent, toks, depth))
        parent = k
        t.check()
    assert all(cp is not None for cp in cps) and not t.private
    assert t.publish(t.alloc(1)[0], cps[0].key, ROOT, cps[0].tokens, 0) is None  # a key is indexed once
    t.free_private(list(t.private))
    for cp in reversed(cps):  # released deepest first: evicted first
        t.unhold(cp)
    t.check()
    assert list(t.cache.lru) == [cps[2].page, cps[1].page, cps[0].page]
    got = t.alloc(6)  # 5 free + the deepest cached page
    assert cps[2].page in got and cps[2].key not in t.cache.index and cps[0].key in t.cache.index
    t.check()


def test_match_verifies_tokens_and_parents():
    c = PrefixCache(PS)
    ids = list(range(12))
    parent = ROOT
    for i in range(3):
        toks = tuple(ids[i * PS:(i + 1) * PS])
        k = chain_key(parent, toks)
        c.add(100 + i, k, parent, toks, i)
        parent = k
    assert [cp.page for cp in c.match(ids + [99], 13)] == [100, 101, 102]
    assert len(c.match(ids, 11)) == 2  # at most `limit` tokens
    assert c.match([0, 1, 2, 9] + ids[4:], 12) == []  # the first page differs: nothing after it is reused
    c.index[chain_key(ROOT, (0, 1, 2, 3))].tokens = (7, 7, 7, 7)  # a forged collision is never served
    assert c.match(ids, 12) == []


def test_a_skill_entry_joins_the_index_and_its_eviction_drops_it(tiny_weights):
    from skillkv.runners.base import ReadyKV

    r = _runner(tiny_weights)
    rng = random.Random(4)
    skill = [rng.randrange(3, 250) for _ in range(22)]  # ends inside a page: copy-on-write, no tail-taking
    seq = r.open(None)
    r.prefill([seq], [skill])
    kv = r.read(seq, 0, len(skill))
    r.release(seq)
    r.admit("skill", [ReadyKV(kv)])
    r.settle("skill")
    ids = skill + [rng.randrange(3, 250) for _ in range(9)]
    seq, info = r.open_cached(ids, "skill", len(skill))
    assert info == {"prefix_cache": 0, "skill_kv": 22}
    logits = r.prefill([seq], [ids[22:]])[0]
    r.release(seq)
    assert same(r, logits, _full(r, ids))
    entry = r.table.entries["skill"]
    assert len(entry.published) == 22 // PS
    seq, info = r.open_cached(ids + [1, 2], "skill", len(skill))
    assert info["prefix_cache"] == 28 and seq.keys == ["skill"]  # the entry's pages and the copied tail page
    r.release(seq)
    r.retire(lambda key: False)
    assert not any(cp.entry for cp in r.table.cache.index.values())
    r.table.check()


def test_pages_evicted_to_host_memory_come_back_bit_for_bit(tiny_weights):
    """With a spill budget, cached pages evicted for room are kept in host memory and copied back into the pool
    when a prompt needs them again: the conversation is served as if they had never left."""
    r = _runner(tiny_weights, pages=24, spill_pages=40)
    rng = random.Random(5)
    conv = [rng.randrange(3, 250) for _ in range(40)]
    answer, _, _ = _turn(r, conv, 4, rng)  # 11 full pages of prompt and answer cached
    for _ in range(3):  # other conversations fill the pool: the first one's pages are evicted to host memory
        _turn(r, [rng.randrange(3, 250) for _ in range(60)], 0, rng)
    assert r.table.cache.match(conv, 40) == [] and r.usage()["spilled_pages"] >= 10
    nxt = conv + answer + [7, 8, 9]
    _, first, reused = _turn(r, nxt, 2, rng)
    assert reused == 44 and r.usage()["restored_pages"] >= 10  # the prompt and the 4 answer tokens fed back
    assert same(r, first, _full(r, nxt))
    r.clear_cache()
    assert r.usage()["spilled_pages"] == 0 and len(r.table.cache) == 0
    r.table.check()
