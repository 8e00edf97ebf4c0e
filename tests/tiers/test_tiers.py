"""Tiers: the host cache's budget invariant, the L2 reader's verification, layer-pipelined paging into the pool
(exact equality with a full prefill), prefetch, and the tier policy's decisions."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch

from skillkv.engine.page_in import PageIn
from skillkv.engine.paged import PagedEngine
from skillkv.errors import SnapshotError
from skillkv.runners.paged import PagedRunner
from skillkv.tiers.host_cache import HostCache, HostKV
from skillkv.tiers.l2_reader import L2Reader
from skillkv.tiers.policy import Measurements, TierPolicy, load_cached, save
from skillkv.tiers.tiers import Tiers
from skillkv.snapshot import Snapshot, parse_layout, write_snapshot
from skillkv.store import Store

from test_snapshot import assert_same, make_snap


def ready_kv(key: str, tokens: int, layers: int = 2, seed: int = 0) -> HostKV:
    g = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(tokens, 2, 4, generator=g), torch.randn(tokens, 2, 4, generator=g)) for _ in range(layers)]
    return HostKV.from_kv(key, list(range(tokens)), kv, pin=False)


# ---------------------------------------------------------------------------------------------- host cache


def test_host_cache_never_exceeds_its_budget_under_random_operations():
    rng = random.Random(0)
    entry = 2 * 2 * 2 * 4 * 4  # layers, k/v, heads, dim, fp32 bytes per token
    cache = HostCache(budget_bytes=entry * 50, pin=False)
    for step in range(300):
        op = rng.choice(["put", "put", "get", "evict", "contains"])
        key = f"k{rng.randrange(12)}"
        if op == "put":
            kv = ready_kv(key, rng.randint(1, 60), seed=step)
            ok = cache.put(key, kv)
            assert ok == (kv.nbytes <= cache.budget_bytes)
            assert cache.contains(key) == ok
            if ok:
                assert cache.get(key) is kv
        elif op == "get":
            got = cache.get(key)
            assert (got is not None) == cache.contains(key)
        elif op == "evict":
            was = cache.contains(key)
            assert cache.evict(key) == was and not cache.contains(key)
        else:
            cache.contains(key)
        cache.check()
        assert cache.nbytes <= cache.budget_bytes


def test_host_cache_evicts_least_recently_used_and_rejects_unverified():
    one = ready_kv("a", 10).nbytes
    cache = HostCache(budget_bytes=3 * one, pin=False)
    for k in "abc":
        cache.put(k, ready_kv(k, 10))
    cache.get("a")  # a becomes most recent; b is now the LRU
    cache.contains("b")  # contains does not refresh
    cache.put("d", ready_kv("d", 10))
    assert cache.keys() == ["c", "a", "d"] and cache.evictions == 1
    assert not cache.put("huge", ready_kv("huge", 40))  # larger than the budget: not cached, nothing evicted
    assert cache.keys() == ["c", "a", "d"]
    unverified = HostKV("u", [1, 2], 2, [2, 2, 4], torch.float32, pin=False)
    with pytest.raises(Exception, match="not fully read"):
        cache.put("u", unverified)
    cache.check()


# ---------------------------------------------------------------------------------------------- L2 reader


@pytest.fixture(scope="module")
def reader():
    r = L2Reader(threads=3, chunk_bytes=64, pin=False)  # tiny chunks: every read takes several preads
    yield r
    r.close()


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_l2_reader_is_bit_identical(tmp_path, reader, dtype, compression):
    snap = make_snap(dtype, layers=4, tokens=37, seed=5)
    p = tmp_path / "s.safetensors"
    write_snapshot(p, snap, compression)
    kv = reader.read(p, fingerprint=snap.fingerprint, key=snap.key, token_ids=snap.token_ids)
    kv.wait_all()
    back = Snapshot(keys=kv.keys, values=kv.values, token_ids=kv.token_ids, fingerprint=snap.fingerprint,
                    key=kv.key, skill=snap.skill, content_hash=snap.content_hash, start=snap.start, parent=snap.parent)
    assert_same(snap, back)
    assert kv.ready and kv.file_bytes == p.stat().st_size and kv.compression == compression


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_l2_reader_never_serves_a_damaged_tensor(tmp_path, reader, compression):
    snap = make_snap(torch.bfloat16, layers=3, tokens=20)
    p = tmp_path / "s.safetensors"
    write_snapshot(p, snap, compression)
    data = bytearray(p.read_bytes())
    lay = parse_layout(bytes(data[8:8 + int.from_bytes(data[:8], "little")]), len(data))
    sp = lay.spans["v.2"]  # the last layer: earlier layers verify fine, then the entry fails
    data[(sp.lo + sp.hi) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    kv = reader.read(p, fingerprint=snap.fingerprint, key=snap.key, token_ids=snap.token_ids)
    with pytest.raises(SnapshotError, match="checksum"):
        kv.wait(2)
    with pytest.raises(SnapshotError):
        kv.wait(0)  # once damaged, no layer is served
    assert kv.failed and not kv.ready


def test_l2_reader_rejects_foreign_stale_and_broken_files_before_reading_kv(tmp_path, reader):
    snap = make_snap(layers=2, tokens=9)
    p = tmp_path / "s.safetensors"
    write_snapshot(p, snap)
    with pytest.raises(SnapshotError, match="another model"):
        reader.read(p, fingerprint="other")
    with pytest.raises(SnapshotError, match="expected"):
        reader.read(p, key="x" * 32)
    with pytest.raises(SnapshotError, match="stale"):
        reader.read(p, token_ids=snap.token_ids[:-1] + [0])
    data = p.read_bytes()
    n = 8 + int.from_bytes(data[:8], "little")
    for cut in (0, 5, n // 2, n + 3, len(data) - 1):
        q = tmp_path / f"cut{cut}.safetensors"
        q.write_bytes(data[:cut])
        with pytest.raises(SnapshotError):
            reader.read(q).wait_all()
    ids_span = parse_layout(data[8:n], len(data)).spans["token_ids"]
    bad = bytearray(data)
    bad[ids_span.lo] ^= 0x04  # a flipped token id is caught by its checksum before anything else
    q = tmp_path / "ids.safetensors"
    q.write_bytes(bytes(bad))
    with pytest.raises(SnapshotError, match="checksum"):
        reader.read(q)
    with pytest.raises(SnapshotError, match="cannot read"):
        reader.read(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------- paging (tiny model)


@pytest.fixture(scope="module")
def tiny():
    from skillkv.model import resolve_model

    h = resolve_model("dummy:tiny", device="cpu")
    return h, h.load()


def _runner(model, budget=1 << 20):
    """A paged runner on the CPU (torch attention, page size 4) and its engine."""
    runner = PagedRunner(model, budget, attention="torch", page_size=4)
    return runner, runner.engine


def _full_logits(eng, ids):
    r = eng.start(None)
    out = eng.prefill([r], [ids])[0]
    eng.finish(r)
    return out


def _store_pieces(eng, store, pieces_ids, compression="none"):
    """Compute the chain KV of `pieces_ids` on the engine and store one snapshot per piece; return [(key, ids)]."""
    r = eng.start(None)
    out, start, parent = [], 0, ""
    for j, ids in enumerate(pieces_ids):
        eng.prefill([r], [ids])
        kv = [eng.pool.gather(i, r.pages, start + len(ids)) for i in range(eng.pool.layers)]
        key = f"{j}{compression[0]}" + "0" * 30
        store.put(Snapshot(keys=[k[start:].clone() for k, _ in kv], values=[v[start:].clone() for _, v in kv],
                           token_ids=ids, fingerprint=store.fingerprint, key=key, skill=f"s{j}", content_hash="h",
                           start=start, parent=parent), compression)
        out.append((key, ids))
        start, parent = start + len(ids), key
    eng.finish(r)
    return out


def _damage(store, key, tensor, byte=0, bit=0x20):
    """Flip one bit of `tensor` ("k.{last}": the last layer's keys) in the snapshot file of `key`."""
    path = store.snap_dir / store.entries()[key].file
    data = bytearray(path.read_bytes())
    lay = parse_layout(bytes(data[8:8 + int.from_bytes(data[:8], "little")]), len(data))
    data[lay.spans[tensor.format(last=lay.layers - 1)].lo + byte] ^= bit
    path.write_bytes(bytes(data))


def _prefill_fails(runner, key):
    """A question over the resident `key` raises SnapshotError (checksum): at open if the damage was already
    found, else in the prefill."""
    with pytest.raises(SnapshotError, match="checksum"):
        r = runner.open(key)
        try:
            runner.prefill([r], [[7, 8]])
        finally:
            runner.release(r)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_paging_from_l2_then_host_is_exact(tmp_path, tiny, compression):
    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    a, b, q = list(range(5, 27)), list(range(30, 41)), [60, 61, 62]  # 22 + 11 tokens: partial last page
    pieces = _store_pieces(eng, store, [a, b], compression)
    ref = _full_logits(eng, a + b + q)
    tiers = Tiers(store, 1 << 20, lambda: runner, reader_threads=2, chunk_bytes=256, pin=False)
    try:
        for expect in ("l2", "l1", "host"):
            got = tiers.make_resident("ab", pieces)
            assert got == expect
            reqs = [runner.open("ab") for _ in range(2)]
            out = runner.prefill(reqs, [q, q[:2]])
            torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[1], _full_logits(eng, a + b + q[:2]), rtol=1e-5, atol=1e-5)
            for r in reqs:
                runner.release(r)
            runner.settle("ab")
            assert all(tiers.host.contains(k) for k, _ in pieces)  # a finished L2 page-in is in the host tier
            eng.table.check()
            tiers.host.check()
            if expect == "l1":
                eng.table.evict("ab")  # next round: from the host tier, no disk read
        assert not runner._pending
    finally:
        tiers.close()


def test_a_damaged_snapshot_fails_the_prefill_and_is_never_served(tmp_path, tiny):
    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    (key, ids), = _store_pieces(eng, store, [list(range(5, 30))])
    _damage(store, key, "k.{last}")
    tiers = Tiers(store, 1 << 20, lambda: runner, reader_threads=2, pin=False)
    try:
        assert tiers.make_resident(key, [(key, ids)]) == "l2"
        _prefill_fails(runner, key)
        assert not eng.resident(key) and not tiers.host.contains(key)
        eng.table.check()
        with pytest.raises(SnapshotError, match="checksum"):  # asked again: read again, caught again
            tiers.make_resident(key, [(key, ids)])
            runner.settle(key)
        assert not eng.resident(key)
        with pytest.raises(SnapshotError, match="stale"):
            tiers.make_resident("other", [(key, ids[:-1] + [3])])
        eng.table.check()
    finally:
        tiers.close()


def test_prefetch_fills_the_host_tier(tmp_path, tiny):
    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    pieces = _store_pieces(eng, store, [list(range(5, 30))])
    path = store.snap_dir / store.entries()[pieces[0][0]].file
    os.utime(path, (1, 1))
    tiers = Tiers(store, 1 << 20, lambda: runner, reader_threads=2, pin=False)
    try:
        tiers.prefetch(pieces + [("f" * 32, [1, 2])])  # an unknown key: its error surfaces only on use
        deadline = time.time() + 10
        while not tiers.host.contains(pieces[0][0]) and time.time() < deadline:
            time.sleep(0.01)
        assert tiers.make_resident("p", pieces) == "l2"  # read from L2 for this question, ahead of time
        assert path.stat().st_mtime > 1  # an L2 read counts as a use for the store's LRU
        runner.settle("p")
        runner.retire(lambda key: False)
        assert tiers.make_resident("p", pieces) == "host"  # the next miss in L1 finds it in the host tier
        with pytest.raises(SnapshotError, match="not in the store"):
            tiers.make_resident("q", [("f" * 32, [1, 2])])
        runner.settle("p")
        eng.table.check()
    finally:
        tiers.close()


def test_page_in_releases_layers_one_by_one_and_the_runner_waits(tiny):
    """Layer i may be read as soon as its copy is issued, not before; the runner calls the hook per layer."""
    h, model = tiny
    eng = PagedEngine(model, budget_bytes=1 << 20, attention="torch", page_size=4)
    ids, q = list(range(5, 27)), [40, 41]
    r = eng.start(None)
    eng.prefill([r], [ids])
    kv = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, len(ids))) for i in range(eng.pool.layers)]
    eng.finish(r)
    ref = _full_logits(eng, ids + q)
    host = HostKV("p", ids, len(kv), list(kv[0][0].shape), kv[0][0].dtype, pin=False)
    pages = eng.table.alloc(eng.table.pages_for(len(ids)))
    eng.table.add("p", pages, len(ids))
    p = PageIn("p", [host], [0], pages, len(kv), eng.device)
    t = threading.Thread(target=p.run, args=(eng.pool, None))
    t.start()
    host.keys[0].copy_(kv[0][0])
    host.values[0].copy_(kv[0][1])
    host.set_ready(0)
    assert p.issued[0].wait(5)
    time.sleep(0.05)
    assert not p.issued[1].is_set()  # layer 1 has not landed in host memory yet
    calls = []
    out = {}

    def runner():
        req = eng.start("p", defer_copy=True)

        def ready(i):
            calls.append(i)
            p.wait(i)
            if req.cow is not None:  # a second request over the entry copies its partial last page
                eng.pool.copy_page_prefix(*req.cow, layer=i)
        out["logits"] = eng.prefill([req], [q], layer_ready=ready)[0]
        eng.finish(req)
    rt = threading.Thread(target=runner)
    rt.start()
    deadline = time.time() + 20
    while len(calls) < 2 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert calls == [0, 1] and "logits" not in out  # layer 0 computed, blocked on layer 1
    for i in range(1, len(kv)):
        host.keys[i].copy_(kv[i][0])
        host.values[i].copy_(kv[i][1])
        host.set_ready(i)
    rt.join(10)
    t.join(10)
    assert calls == list(range(len(kv)))
    torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-5)
    assert p.finished.is_set() and p.pieces == []  # host buffers released once copied
    eng.table.check()


def test_an_entry_being_paged_in_is_never_evicted(tmp_path, tiny):
    """Its pages must not be handed to anyone else while copies into them may still be in flight."""
    from concurrent.futures import Future

    from skillkv.engine.pages import PoolFull

    h, model = tiny
    runner, eng = _runner(model)
    tiers = Tiers(Store(tmp_path, h.tag, h.fingerprint), 1 << 20, lambda: runner, reader_threads=1, pin=False)
    ids = list(range(20))
    host = HostKV("k", ids, eng.pool.layers, [20, 2, 16], eng.pool.dtype, pin=False)
    try:
        fut = Future()
        fut.set_result(host)
        tiers._reading["k"] = fut  # as if an L2 read of "k" were in flight
        assert tiers.make_resident("p", [("k", ids)]) == "l2"
        free = len(eng.table.free)
        with pytest.raises(PoolFull):
            eng.table.alloc(free + 1)  # would have to evict "p"
        assert eng.resident("p")
        for i in range(eng.pool.layers):
            host.keys[i].zero_()
            host.values[i].zero_()
            host.set_ready(i)
        runner.settle("p")
        eng.table.alloc(free + 1)  # now it may go
        assert not eng.resident("p")
        eng.table.check()
    finally:
        if not host.ready:
            host.fail(SnapshotError("test over"))  # never leave the copier waiting
        tiers.close()


def test_damage_found_mid_prefill_aborts_it(tiny):
    h, model = tiny
    eng = PagedEngine(model, budget_bytes=1 << 20, attention="torch", page_size=4)
    host = HostKV("p", list(range(8)), eng.pool.layers, [8, 2, 16], eng.pool.dtype, pin=False)
    host.keys[0].zero_()
    host.values[0].zero_()
    host.set_ready(0)
    pages = eng.table.alloc(2)
    eng.table.add("p", pages, 8)
    p = PageIn("p", [host], [0], pages, eng.pool.layers, eng.device)
    t = threading.Thread(target=p.run, args=(eng.pool, None))
    t.start()
    req = eng.start("p")
    calls = []

    def ready(i):
        calls.append(i)
        if i == 1:
            host.fail(SnapshotError("p: checksum mismatch (corrupted on disk)"))
        p.wait(i)
    with pytest.raises(SnapshotError, match="checksum"):
        eng.prefill([req], [[1, 2]], layer_ready=ready)
    t.join(5)
    assert calls == [0, 1] and p.failed and p.pieces == []
    eng.finish(req)
    eng.table.evict("p")
    eng.table.check()


# ---------------------------------------------------------------------------------------------- policy


def _m(**kw) -> Measurements:
    base = dict(device="cpu", bytes_per_token=131072, disk_gbs=1.6, h2d_gbs=50.0, zstd_gbs=8.0,
                prefill=[[2048, 0.066], [8192, 0.268], [20480, 0.765]])
    base.update(kw)
    return Measurements(**base)


def test_policy_picks_the_faster_of_loading_and_recomputing():
    pol = TierPolicy(_m())
    # H100 numbers of docs/BENCHMARKS.md: 8B KV of 20k tokens is 2.68 GB; 1.6 GB/s disk -> 1.68 s > 0.77 s recompute
    assert not pol.should_load("l2", 20480)
    assert pol.should_load("host", 20480)  # 54 ms vs 765 ms
    assert pol.load_seconds("host", 20480) == pytest.approx(20480 * 131072 / 50e9)
    fast = TierPolicy(_m(disk_gbs=7.0))  # an NVMe at 7 GB/s: 0.38 s < 0.77 s
    assert fast.should_load("l2", 20480)
    # zstd: a smaller file does not help when decoding is the bottleneck
    slow_dec = TierPolicy(_m(disk_gbs=7.0, zstd_gbs=1.0))
    assert slow_dec.load_seconds("l2", 20480, int(20480 * 131072 * 0.7), "zstd") == pytest.approx(20480 * 131072 / 1e9)
    assert not slow_dec.should_load("l2", 20480, int(20480 * 131072 * 0.7), "zstd")
    assert fast.should_load("l2", 20480, int(20480 * 131072 * 0.7), "zstd")
    with pytest.raises(ValueError):
        pol.load_seconds("l3", 10)


def test_policy_recompute_interpolation_and_crossover():
    m = _m(prefill=[[100, 1.0], [200, 3.0]])
    assert m.recompute_seconds(50) == pytest.approx(0.5)  # through the origin
    assert m.recompute_seconds(150) == pytest.approx(2.0)
    assert m.recompute_seconds(300) == pytest.approx(5.0)  # extrapolated from the last two points
    # loading costs 1 s per 100 tokens; recomputing the same up to 100, then 2 s per 100: loading wins above 100
    pol = TierPolicy(_m(bytes_per_token=1, disk_gbs=100 / 1e9, h2d_gbs=1e9, prefill=[[100, 1.0], [200, 3.0]]))
    c = pol.crossover("l2")
    assert c is not None and 100 < c <= 102
    assert TierPolicy(_m(disk_gbs=1e-6)).crossover("l2", limit=1 << 16) is None


def test_tiers_choose_follows_the_policy(tmp_path, tiny):
    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    pieces = _store_pieces(eng, store, [list(range(5, 30))])
    bpt = 2 * eng.pool.layers * eng.pool.kv_heads * eng.pool.head_dim * 4
    slow_disk = TierPolicy(_m(bytes_per_token=bpt, disk_gbs=1e-9, h2d_gbs=1.0, prefill=[[25, 0.01]]))
    policy = {"now": slow_disk}
    tiers = Tiers(store, 1 << 20, lambda: runner, reader_threads=1, pin=False, policy=lambda: policy["now"])
    try:
        assert tiers.choose("p", pieces) == "recompute"  # reading 25 tokens at 1 B/s loses to 10 ms
        assert tiers.choose("p", [("f" * 32, [1])]) == "recompute"  # not stored anywhere
        policy["now"] = None
        tiers.refresh_policy()
        assert tiers.choose("p", pieces) == "l2"
        tiers.make_resident("p", pieces)
        assert tiers.choose("p", pieces) == "l1"
        runner.settle("p")
        eng.table.evict("p")
        policy["now"] = slow_disk
        tiers.refresh_policy()
        assert tiers.host.contains(pieces[0][0])
        assert tiers.choose("p", pieces) == "host"  # 25 tokens at 1 GB/s: far below 10 ms
    finally:
        tiers.close()


def test_policy_is_measured_once_and_cached_in_the_store(tmp_path, tiny):
    from skillkv.tiers.policy import policy_for

    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    bpt = h.kv_bytes_per_token
    pol = policy_for(runner, store, bpt, h.dtype, sizes=[16, 48], file_bytes=2 << 20, zstd_bytes=1 << 20, threads=2)
    m = pol.m
    assert (store.dir / "tiers.json").is_file() and m.device == "cpu"
    assert m.disk_gbs > 0 and m.h2d_gbs > 0 and m.zstd_gbs > 0 and [p[0] for p in m.prefill] == [16, 48]
    assert m.bytes_per_token == 2 * eng.pool.layers * eng.pool.kv_heads * eng.pool.head_dim * 4
    assert policy_for(runner, store, bpt, h.dtype).m == m  # cached: not measured again
    assert policy_for(runner, store, bpt, h.dtype, sizes=[16], remeasure=True, file_bytes=1 << 20,
                      zstd_bytes=1 << 20).m != m


def test_measurements_are_cached_per_device(tmp_path):
    m = _m()
    save(tmp_path / "tiers.json", m)
    assert load_cached(tmp_path / "tiers.json", "cpu") == m
    assert load_cached(tmp_path / "tiers.json", "NVIDIA H100") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert load_cached(tmp_path / "bad.json", "cpu") is None


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_pipelined_paging_on_the_gpu_equals_a_resident_prefix(tmp_path, compression):
    from skillkv.model import resolve_model

    h = resolve_model("dummy:smollm2-135m", device="cuda", dtype=torch.bfloat16)
    model = h.load()
    runner = PagedRunner(model, 256 << 20)
    eng = runner.engine
    store = Store(tmp_path, h.tag, h.fingerprint)
    prefix, q = list(range(100, 1000)), list(range(1000, 1040))
    pieces = _store_pieces(eng, store, [prefix[:500], prefix[500:]], compression)
    ref = _full_logits(eng, prefix + q)
    tiers = Tiers(store, 256 << 20, lambda: runner)
    try:
        for expect in ("l2", "host"):
            assert tiers.make_resident("p", pieces) == expect
            r = runner.open("p")
            got = runner.prefill([r], [q])[0]
            runner.release(r)
            runner.settle("p")
            assert int(got.argmax()) == int(ref.argmax())
            assert ((got - ref).norm() / ref.norm()) < 2e-2
            assert tiers.host.contains(pieces[0][0]) and tiers.host.get(pieces[0][0]).pinned
            eng.table.evict("p")
            eng.table.check()
    finally:
        tiers.close()


def test_bench_gpu_runs_on_the_cpu(tmp_path, monkeypatch):
    """The GPU benchmark's tier scenarios run end to end on the CPU (smoke test with a tiny model)."""
    import json
    import sys

    from skillkv.measure import bench_gpu

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_gpu", "--out", str(tmp_path / "out"), "--sizes", "64", "--reps", "1",
                                      "--batch", "2", "--attention", "torch", "--model", "dummy:tiny",
                                      "--device", "cpu", "--dtype", "float32", "--reader-threads", "2"])
    bench_gpu.main()
    res = json.loads((tmp_path / "out" / "gpu.json").read_text())
    r = res["sizes"]["64"]
    assert r["check"]["l1_same_argmax_as_engine_full"] and r["host_same_argmax"]
    assert r["l2_none_same_argmax"] and r["l2_zstd_same_argmax"]
    assert r["file_zstd_bytes"] < r["file_none_bytes"]
    assert set(res["policy"]["crossover_tokens"]) == {"host", "l2_none", "l2_zstd"}
    assert res["pool_within_budget"]
    from skillkv.measure.gpu_report import markdown, summary

    assert "| 64 |" in markdown(res) and "batch 2 q" in summary(res)


def test_when_loading_loses_the_prefix_is_recomputed_and_kept_in_the_host_tier(tmp_path, tiny_skills):
    """The policy measured loading slower than a prefill: the stored pieces are recomputed (not read through
    another path), the answer is the same, and the computed prefix is written back to the host tier, so after the
    runner evicts it the next question pages it in from host memory."""
    from skillkv.api import SkillKV
    from skillkv.generate import SamplingParams

    kv = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu",
                 host_budget=64 << 20)
    kv.compile()
    g = SamplingParams(max_tokens=6)
    ref = kv.ask("What does B-17 mean?", ["beta-codes"], mode="full", params=g)
    bpt = kv.handle.kv_bytes_per_token
    kv.tiers._policy = lambda: TierPolicy(_m(bytes_per_token=bpt, disk_gbs=1e-9, h2d_gbs=10.0,
                                             prefill=[[100, 0.01], [1000, 0.1]]))
    kv.tiers.refresh_policy()
    kv.forget_resident()
    a = kv.ask("What does B-17 mean?", ["beta-codes"], params=g)
    assert a.tiers == ["computed"] and a.output_token_ids == ref.output_token_ids
    key = kv.compiler.keys(kv.pick(["beta-codes"]))[0]
    deadline = time.time() + 10
    while not kv.tiers.host.contains(key) and time.time() < deadline:
        time.sleep(0.01)
    kv.runner.retire(lambda k: False)  # evicted from the runner only
    b = kv.ask("What does B-17 mean?", ["beta-codes"], params=g)
    assert b.tiers == ["host"] and b.output_token_ids == ref.output_token_ids
    kv.tiers.host.check()


def test_a_snapshot_in_the_page_cache_is_read_at_the_cached_rate(tmp_path, tiny):
    """The policy asks the kernel (mincore) whether an L2 file is in the page cache: a slow disk loses to a
    prefill, the same file read from the page cache wins."""
    from skillkv.tiers.policy import cached_fraction, drop_page_cache

    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    pieces = _store_pieces(eng, store, [list(range(5, 30))])
    path = store.file_path(pieces[0][0])
    bpt = 2 * eng.pool.layers * eng.pool.kv_heads * eng.pool.head_dim * 4
    pol = TierPolicy(_m(bytes_per_token=bpt, disk_gbs=1e-9, cached_gbs=10.0, h2d_gbs=10.0, prefill=[[25, 0.01]]))
    tiers = Tiers(store, 0, lambda: runner, reader_threads=1, pin=False, policy=lambda: pol)
    try:
        path.read_bytes()
        assert cached_fraction(path) > 0.9
        assert tiers.choose("p", pieces) == "l2"
        drop_page_cache(path)
        if cached_fraction(path) < 0.1:  # the kernel dropped it (it may keep pages it still needs)
            assert tiers.choose("p", pieces) == "recompute"
    finally:
        tiers.close()
