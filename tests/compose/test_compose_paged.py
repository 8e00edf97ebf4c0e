"""Compose mode on the paged engine (issue 4): placed entries, composed requests, repair on the request's own page
copies. Tiny random llama (`dummy:tiny`, fp32, CPU, torch attention), page size 4, segment lengths that are not
multiples of it (one skill shorter than a page, so a page holds three segments)."""

from __future__ import annotations

import pytest
import torch

from conftest import composed_kv

from skillkv.compose.repair import Repair, compose, needs_probe, select_positions
from skillkv.engine.paged import PagedEngine
from skillkv.engine.pages import PoolFull
from skillkv.engine.placed import PagedComposer, placed_key
from skillkv.runners.base import Part
from skillkv.engine.rope import place
from skillkv.runners import ReadyKV
from skillkv.runners.hf import HFRunner

PS = 4
PRE = list(range(3, 10))  # 7-token preamble
SKILLS = {"A": list(range(20, 33)), "B": list(range(40, 49)), "C": list(range(60, 63)),  # 13, 9, 3 tokens
          "D": list(range(70, 81))}  # 11
Q = [90, 91, 92, 93, 94]


@pytest.fixture(scope="module")
def model():
    from skillkv.model import resolve_model

    return resolve_model("dummy:tiny", device="cpu").load()


@pytest.fixture(scope="module")
def snaps(model):
    """Single-skill snapshots [preamble][skill], computed by the engine itself (as compile does)."""
    eng = PagedEngine(model, budget_bytes=1 << 20, attention="torch", page_size=PS)
    out = {}
    for name, ids in SKILLS.items():
        r = eng.start(None)
        eng.prefill([r], [PRE + ids])
        out[name] = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, len(PRE + ids)))
                     for i in range(eng.pool.layers)]
        eng.finish(r)
    return out


def _engine(model, budget=1 << 20):
    eng = PagedEngine(model, budget_bytes=budget, attention="torch", page_size=PS)
    return eng, PagedComposer(eng, model.model.rotary_emb)


def _parts(snaps, names, loads=None):
    def load(n):
        def f():
            if loads is not None:
                loads.append(n)
            return snaps[n]
        return f
    return [Part(f"chain-{n}", len(PRE) + len(SKILLS[n]), len(PRE), load(n)) for n in names]


def _ids(names):
    return PRE + [t for n in names for t in SKILLS[n]]


def _starts(names):
    starts, pos = [0, len(PRE)], len(PRE)
    for n in names[:-1]:
        pos += len(SKILLS[n])
        starts.append(pos)
    return starts


def _hf_logits(model, kv, q):
    """Logits of `q` after the prefix `kv` on the hf runner (the reference)."""
    runner = HFRunner(model)
    runner.admit("prefix", [ReadyKV(kv)])
    seq = runner.open("prefix")
    return runner.prefill([seq], [q])[0]


def _repair(comp, req, model, ids, starts, repair):
    """What the compose stage does on the paged runner (skillkv.compose.stage): choose, then recompute."""
    kv = comp.gather(req) if needs_probe(repair, starts) else None
    positions = select_positions(model, ids, kv, starts, repair)
    comp.prefill_runs(req, ids, positions)
    return positions


def _entry_pages(eng):
    return {p for e in eng.table.entries.values() for p in e.pages}


def test_page_table_entries_that_start_mid_page():
    from skillkv.engine.pages import PageTable
    from skillkv.errors import SkillkvError

    t = PageTable(num_pages=8, page_size=4)
    t.add("x", t.alloc(2), 5, start=3)  # slots 3..7: two pages
    with pytest.raises(SkillkvError):
        t.add("y", t.alloc(1), 2, start=3)  # slots 3..4 need two pages
    with pytest.raises(SkillkvError):
        t.add("z", t.alloc(1), 1, start=4)  # the start lies inside the first page
    t.check()
    t.entries["x"].start = 0  # 5 rows from slot 0 would own two pages too; 1 row would own one
    t.entries["x"].tokens = 1
    with pytest.raises(AssertionError):
        t.check()


@pytest.mark.parametrize("names", [["A", "B", "C"], ["B", "A"], ["A", "C", "B", "D"]], ids="".join)
def test_composed_request_reads_exactly_the_placed_kv_and_answers_like_transformers(model, snaps, names):
    eng, comp = _engine(model)
    req, where = comp.open(_parts(snaps, names), len(PRE))
    assert where == ["loaded"] * len(names) and req.length == len(_ids(names))
    ref, starts = place([snaps[n] for n in names], len(PRE), model.model.rotary_emb)
    assert starts == _starts(names)
    for (k, v), (rk, rv) in zip(comp.gather(req), ref):  # the same rotation of the same rows: bit for bit
        assert torch.equal(k, rk) and torch.equal(v, rv)
    got = eng.prefill([req], [Q])[0]
    torch.testing.assert_close(got, _hf_logits(model, ref, Q), rtol=1e-4, atol=1e-4)
    # the same KV as one contiguous entry (the former whole-copy path) gives the same logits on this engine
    eng.make_resident("whole", len(_ids(names)), lambda: ref)
    whole = eng.start("whole")
    torch.testing.assert_close(got, eng.prefill([whole], [Q])[0], rtol=1e-6, atol=1e-6)
    # decode steps append to the request's private pages only
    for _ in range(3):
        t = int(got.argmax())
        got = eng.prefill([req], [[t]])[0]
        torch.testing.assert_close(got, eng.prefill([whole], [[t]])[0], rtol=1e-5, atol=1e-5)
    eng.finish(req)
    eng.finish(whole)
    eng.table.check()
    assert not eng.table.private and all(e.refs == 0 for e in eng.table.entries.values())


@pytest.mark.parametrize("repair", [Repair(lead=2), Repair(lead=1, recompute=0.3), Repair(lead=10 ** 6),
                                    Repair(lead=1, recompute=0.3, select="deviation")],
                         ids=["lead2", "lead1+front0.3", "all", "lead1+deviation0.3"])
def test_repair_on_the_engine_equals_transformers_compose(model, snaps, repair):
    names = ["A", "B", "C", "D"]
    eng, comp = _engine(model)
    ids = _ids(names)
    c = compose(model, [snaps[n] for n in names], [PRE] + [SKILLS[n] for n in names], repair)
    req, _ = comp.open(_parts(snaps, names), len(PRE))
    before = {p: (eng.pool.k[:, p].clone(), eng.pool.v[:, p].clone()) for p in _entry_pages(eng)}
    positions = _repair(comp, req, model, ids, _starts(names), repair)
    assert positions == c.recomputed and positions
    for (k, v), (rk, rv) in zip(comp.gather(req), c.kv):
        torch.testing.assert_close(k, rk, rtol=0, atol=1e-6)
        torch.testing.assert_close(v, rv, rtol=0, atol=1e-6)
    torch.testing.assert_close(eng.prefill([req], [Q])[0], _hf_logits(model, c.kv, Q), rtol=1e-4, atol=1e-4)
    # only pages holding repaired rows (and boundary / last pages) are the request's; entries were never written
    repaired_pages = {p // PS for p in positions}
    entry_pages = _entry_pages(eng)
    for j, page in enumerate(req.shared):
        assert (page in req.owned) == (page not in entry_pages)
        if j in repaired_pages:
            assert page in req.owned
    boundaries = {s // PS for s in _starts(names)[2:] if s % PS}
    assert set(req.owned) == {req.shared[j] for j in (repaired_pages | boundaries) if j < len(req.shared)}
    for p, (k, v) in before.items():
        assert torch.equal(eng.pool.k[:, p], k) and torch.equal(eng.pool.v[:, p], v)
    eng.finish(req)
    eng.table.check()
    assert not eng.table.private


def test_placed_entries_are_made_once_per_skill_and_offset_and_shared_across_combinations(model, snaps):
    eng, comp = _engine(model)
    loads: list[str] = []
    r1, w1 = comp.open(_parts(snaps, ["A", "B", "C"], loads), len(PRE))
    assert comp.placements == 2 and w1 == ["loaded"] * 3
    copies = comp.boundary_copies
    # the same combination again: nothing placed, nothing loaded; only the boundary pages are copied again
    r2, w2 = comp.open(_parts(snaps, ["A", "B", "C"], loads), len(PRE))
    assert comp.placements == 2 and w2 == ["l1"] * 3 and loads == ["A", "B", "C"]
    assert comp.boundary_copies == 2 * copies
    for p, q in zip(r1.shared, r2.shared):  # the same entry pages; each request its own boundary pages
        assert (p == q) if p not in r1.owned else (q in r2.owned and q != p)
    assert r1.owned and len(r1.shared) == len(r2.shared)
    # [A, B, D]: D placed where C was (same offset, another skill); A's and B's pages are the same pages
    r3, w3 = comp.open(_parts(snaps, ["A", "B", "D"], loads), len(PRE))
    assert comp.placements == 3 and w3 == ["l1", "l1", "loaded"]
    c_start = _starts(["A", "B", "C"])[3]
    same = c_start // PS  # pages before the one where C / D begins
    assert r3.shared[:same] == r1.shared[:same]
    shared_pages = [p for p in r3.shared[:same] if p not in r3.owned]
    assert shared_pages and set(shared_pages) <= _entry_pages(eng)
    # no request copies a skill: its own pages are the boundary pages and the partly filled last page only
    for r, names in ((r1, "ABC"), (r3, "ABD")):
        starts = _starts(list(names))
        n_boundary = len({s // PS for s in starts[2:] if s % PS})
        assert len(r.owned) <= n_boundary and len(r.private) == (1 if r.length % PS else 0)
    # B placed at another offset ([C, B]: B starts after C) is another entry, placed from B's snapshot
    r4, w4 = comp.open(_parts(snaps, ["C", "B"], loads), len(PRE))
    assert w4 == ["loaded", "loaded"] and placed_key("chain-B", len(PRE) + 3) in eng.table.entries
    # a placed entry made from the resident single-skill entry (A is resident as [A, ...]'s first skill)
    r5, w5 = comp.open(_parts(snaps, ["B", "A"], loads), len(PRE))
    assert w5 == ["loaded", "placed"] and loads[-1] == "B"
    ref, _ = place([snaps["B"], snaps["A"]], len(PRE), model.model.rotary_emb)
    for (k, v), (rk, rv) in zip(comp.gather(r5), ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    for r in (r1, r2, r3, r4, r5):
        eng.finish(r)
    eng.table.check()
    assert not eng.table.private and all(e.refs == 0 for e in eng.table.entries.values())
    assert {e.start for k, e in eng.table.entries.items() if k.startswith("place:")} != {0}  # rows mid-page


def test_eviction_under_a_small_budget_still_answers_correctly(model, snaps):
    combos = [["A", "B", "C"], ["D", "A"], ["C", "D", "B"], ["B", "C", "A", "D"], ["A", "B", "D"]]
    refs = {}
    for names in combos:
        kv, _ = place([snaps[n] for n in names], len(PRE), model.model.rotary_emb)
        refs["".join(names)] = _hf_logits(model, kv, Q)
    eng, comp = _engine(model)
    page_bytes = eng.pool.page_bytes
    eng, comp = _engine(model, budget=page_bytes * 24)  # about two combinations' entries at a time
    for rnd in range(2):
        for names in combos:
            req, _ = comp.open(_parts(snaps, names), len(PRE))
            got = eng.prefill([req], [Q])[0]
            eng.finish(req)
            torch.testing.assert_close(got, refs["".join(names)], rtol=1e-4, atol=1e-4)
            eng.table.check()
            assert not eng.table.private
    assert eng.table.evictions >= 4


def test_a_failed_open_leaves_nothing_referenced(model, snaps):
    eng, comp = _engine(model)
    page_bytes = eng.pool.page_bytes
    eng, comp = _engine(model, budget=page_bytes * 9)  # A (5 pages) fits, then B cannot be placed
    with pytest.raises(PoolFull):
        comp.open(_parts(snaps, ["A", "B", "D"]), len(PRE))
    eng.table.check()
    assert not eng.table.private and all(e.refs == 0 for e in eng.table.entries.values())


# ------------------------------------------------------------------------------------------------ SkillKV.ask

TWO = ["beta-codes", "alpha-tool"]
THREE = ["gamma-notes", "beta-codes", "alpha-tool"]


@pytest.fixture
def paged_kv(tmp_path, tiny_skills):
    from skillkv.api import SkillKV

    return SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu", engine="paged",
                   kv_budget=8 << 20)


@pytest.mark.parametrize("repair", [Repair(), Repair(lead=3), Repair(lead=2, recompute=0.2)],
                         ids=["none", "lead3", "lead2+rec0.2"])
def test_ask_composes_on_the_pool_like_the_transformers_compose(paged_kv, repair):
    from skillkv.generate import SamplingParams

    kv = paged_kv
    kv.compile()
    chosen = kv.pick(THREE)
    q_ids = kv.builder.layout(chosen, "What does B-17 mean?").segments[-1]
    composed_kv(kv, chosen, repair)  # compiles the later skills' neighbour snapshots: both paths below load them
    # the reference: transformers placement and repair (skillkv.compose.repair.compose) from the same snapshots
    from conftest import chain_kv

    srcs = kv.composer.sources(chosen, repair)
    segs = [kv.builder.preamble_ids()] + [kv.builder.skill_ids(s) for s in chosen]
    c = compose(kv.handle.load(), [chain_kv(kv, chain) for chain, _ in srcs], segs, repair, [ctx for _, ctx in srcs])
    ref = _hf_logits(kv.handle.load(), c.kv, q_ids)
    opened = kv.open(chosen, "compose", repair)
    got = kv.runner.prefill([opened.seq], [q_ids])[0]
    kv.runner.release(opened.seq)
    info = opened.info
    assert info["recomputed"] == c.recomputed and info["skill_tokens"] == c.skill_tokens
    assert info["computed"] == len(c.recomputed) and info["cached"] == len(c.kv[0][0]) - len(c.recomputed)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    ans = kv.ask("What does B-17 mean?", THREE, mode="compose", repair=repair, params=SamplingParams(max_tokens=4))
    assert ans.mode == "compose" and ans.tiers == ["l1"] * 3
    assert ans.compose["recomputed"] == len(c.recomputed)
    assert ans.tokens["cached"] + ans.tokens["computed"] == ans.tokens["prompt"]
    t = kv.runner.engine.table
    t.check()
    assert not t.private and all(e.refs == 0 for e in t.entries.values())
    assert not any(k.startswith("compose-") for k in t.entries)  # no whole copy per combination any more


def test_ask_reuses_placed_entries_and_matches_the_hf_engine(paged_kv, tmp_path, tiny_skills):
    from skillkv.api import SkillKV
    from skillkv.generate import SamplingParams

    g = SamplingParams(max_tokens=6)
    kv = paged_kv
    first = kv.ask("What does B-17 mean?", THREE, mode="compose", repair=Repair(lead=2), params=g)
    assert first.tiers == ["computed"] * 3  # nothing compiled yet
    comp = kv.runner.composer
    assert comp.placements == 2
    again = kv.ask("What does B-42 mean?", THREE, mode="compose", repair=Repair(lead=2), params=g)
    assert comp.placements == 2 and again.tiers == ["l1"] * 3
    # an exact question over the first skill reuses the same single-skill entry
    one = kv.ask("What does B-17 mean?", ["gamma-notes"], params=g)
    assert one.mode == "exact" and one.tiers == ["l1"]
    # the hf engine's compose gives the same answer and the same repaired positions
    hf = SkillKV(model="dummy:tiny", store=tmp_path / "hf-store", skills=tiny_skills, device="cpu", engine="hf")
    ref = hf.ask("What does B-17 mean?", THREE, mode="compose", repair=Repair(lead=2), params=g)
    assert ref.output_token_ids == first.output_token_ids and ref.compose == first.compose


def test_compose_after_an_exact_question_paged_the_first_skill_in_from_l2(paged_kv, tmp_path, tiny_skills):
    """The first skill's entry came through the tiers (possibly still copying): compose waits for it, then reads
    it; the answer equals a compose over a pool filled directly."""
    from skillkv.api import SkillKV
    from skillkv.generate import SamplingParams

    g = SamplingParams(max_tokens=4)
    paged_kv.compile()
    ref = paged_kv.ask("What does B-17 mean?", THREE, mode="compose", repair=Repair(lead=2), params=g)
    kv = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu", engine="paged",
                 kv_budget=8 << 20)
    one = kv.ask("What does B-17 mean?", ["gamma-notes"], params=g)
    assert one.tiers == ["l2"]
    ans = kv.ask("What does B-17 mean?", THREE, mode="compose", repair=Repair(lead=2), params=g)
    assert ans.tiers == ["l1", "l2", "l2"] and ans.output_token_ids == ref.output_token_ids
    assert ans.compose == ref.compose
    kv.tiers.close()
    t = kv.runner.engine.table
    t.check()
    assert not t.private and all(e.refs == 0 for e in t.entries.values())


def test_compose_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    import json

    from skillkv.measure.bench_compose_gpu import main

    res = main(["--out", str(tmp_path), "--tiny"])
    assert json.loads((tmp_path / "compose_gpu.json").read_text())["ttft_ms"].keys() == res["ttft_ms"].keys()
    c = res["check"]
    assert c["placed_kv_bitwise_equal"] and c["placements"] == 3 and c["placements_during_resident_runs"] == 0
    assert c["first_open_sources"] == ["l1", "placed", "placed", "placed"]
    assert c["compose_vs_contiguous_rel_err"] < 1e-6 and res["pool_within_budget"]


@pytest.mark.gpu
def test_compose_on_the_gpu_engine():
    """FlashInfer + CUDA graphs, bf16: the composed request holds compose.place's KV bit for bit, answers like the
    same KV as one contiguous entry, repairs like transformers compose, and reuses its placed entries."""
    from skillkv.model import resolve_model

    model = resolve_model("dummy:smollm2-135m", device="cuda", dtype=torch.bfloat16).load()
    eng = PagedEngine(model, budget_bytes=256 << 20, attention="auto", page_size=16)
    comp = PagedComposer(eng, model.model.rotary_emb)
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
    pre, skills, q = rand(23), [rand(300), rand(211), rand(157)], rand(40)
    snaps = []
    for i, ids in enumerate(skills):
        r = eng.start(None)
        eng.prefill([r], [pre + ids])
        snaps.append([tuple(x.clone() for x in eng.pool.gather(j, r.pages, r.length)) for j in range(eng.pool.layers)])
        eng.finish(r)
        eng.make_resident(f"s{i}", len(pre + ids), lambda kv=snaps[-1]: kv)
    parts = [Part(f"s{i}", len(pre + ids), len(pre), lambda: None) for i, ids in enumerate(skills)]
    req, where = comp.open(parts, len(pre))
    assert where == ["l1", "placed", "placed"]
    ref, starts = place(snaps, len(pre), model.model.rotary_emb)
    for (k, v), (rk, rv) in zip(comp.gather(req), ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    got = eng.prefill([req], [q])[0]
    eng.finish(req)
    eng.make_resident("whole", ref[0][0].shape[0], lambda: ref)
    r = eng.start("whole")
    whole = eng.prefill([r], [q])[0]
    eng.finish(r)
    assert (got - whole).norm() / whole.norm() < 1e-3
    ids = pre + [t for s in skills for t in s]
    c = compose(model, snaps, [pre] + skills, Repair(lead=8))
    req, where = comp.open(parts, len(pre))
    assert where == ["l1"] * 3 and comp.placements == 2
    pos = _repair(comp, req, model, ids, starts, Repair(lead=8))
    assert pos == c.recomputed
    # the engine's kernels (FlashInfer, bf16) vs transformers': rows other than the repaired ones are the same bits;
    # the repaired ones agree to bf16 precision, far closer than the unrepaired placement is
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[pos] = False
    rel = lambda a, b: float((a[pos].float() - b[pos].float()).norm() / b[pos].float().norm())  # noqa: E731
    for layer, ((k, v), (rk, rv), (pk, pv)) in enumerate(zip(comp.gather(req), c.kv, ref)):
        for got_, want, before in ((k, rk, pk), (v, rv, pv)):
            assert torch.equal(got_[keep], want[keep])
            assert rel(got_, want) < 2e-2
            if layer:  # layer 0's KV depends on token and position only: placement already has it right
                assert rel(got_, want) < 0.2 * rel(before, want)
    eng.prefill([req], [q])
    eng.finish(req)
    eng.table.check()
    assert all(e.refs == 0 for e in eng.table.entries.values())
