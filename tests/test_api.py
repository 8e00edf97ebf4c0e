"""The Python API on a tiny random model: compile, exact == full, chains, verification, errors."""

from __future__ import annotations

import pytest
import torch

from skillkv.generate import SamplingParams
from skillkv.errors import PromptTooLong, SkillError, SkillkvError

GREEDY = SamplingParams(max_tokens=12)


def test_compile_is_incremental(tiny_kv, tiny_skills):
    first = {r.skill: r.status for r in tiny_kv.compile()}
    assert first == {"alpha-tool": "compiled", "beta-codes": "compiled", "gamma-notes": "compiled"}
    again = {r.skill: r.status for r in tiny_kv.compile()}
    assert set(again.values()) == {"up to date"}
    md = tiny_skills / "beta-codes" / "SKILL.md"
    md.write_text(md.read_text() + "\nCode B-99 means the network is down.\n")
    tiny_kv.reload()
    after = {r.skill: r.status for r in tiny_kv.compile()}
    assert after == {"alpha-tool": "up to date", "beta-codes": "recompiled", "gamma-notes": "up to date"}
    assert {s.skill.name: s.state for s in tiny_kv.status()} == dict.fromkeys(after, "current")


def test_snapshot_kv_equals_full_prefill_kv(tiny_kv):
    skill = tiny_kv.pick(["alpha-tool"])[0]
    tiny_kv.compile(["alpha-tool"])
    snap = tiny_kv.snapshots.get(tiny_kv.compiler.keys([skill])[0])
    ids = tiny_kv.compiler.piece_ids([skill], 0)
    assert snap.token_ids == ids
    runner = tiny_kv.runner
    seq = runner.open(None)
    runner.prefill([seq], [ids + [5, 6, 7]])
    full = runner.read(seq, 0, len(ids))
    runner.release(seq)
    for (k, v), (fk, fv) in zip(zip(snap.keys, snap.values), full):
        torch.testing.assert_close(k, fk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, fv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skills", [["alpha-tool"], ["beta-codes", "alpha-tool"], ["gamma-notes", "beta-codes"]])
def test_exact_equals_full(tiny_kv, skills):
    for q in ("What does code B-17 mean?", "Which level is the default?"):
        full = tiny_kv.ask(q, skills, mode="full", params=GREEDY)
        exact = tiny_kv.ask(q, skills, mode="exact", params=GREEDY)
        assert exact.output_token_ids == full.output_token_ids
        assert exact.tokens["prompt"] == full.tokens["prompt"]
        assert full.tokens["cached"] == 0


def test_combination_is_computed_once_then_reused(tiny_kv):
    skills = ["beta-codes", "alpha-tool"]
    first = tiny_kv.ask("What does B-42 mean?", skills, params=GREEDY)
    assert first.tokens["cached"] == 0  # nothing compiled yet: both pieces computed and stored
    tiny_kv.forget_resident()
    second = tiny_kv.ask("What does B-17 mean?", skills, params=GREEDY)
    q_tokens = len(tiny_kv.builder.question_ids("What does B-17 mean?"))
    assert second.tokens["computed"] == q_tokens
    assert second.tokens["cached"] == second.tokens["prompt"] - q_tokens
    parents = [e for e in tiny_kv.snapshots.entries().values() if e.parent]
    assert [e.skill for e in parents] == ["alpha-tool"]
    # the other order is a different chain
    tiny_kv.ask("What does B-17 mean?", list(reversed(skills)), params=GREEDY)
    assert len([e for e in tiny_kv.snapshots.entries().values() if e.parent]) == 2


def _snapshot_file(kv, name):
    skill = kv.pick([name])[0]
    e = kv.snapshots.entries()[kv.compiler.keys([skill])[0]]
    return kv.snapshots.snap_dir / e.file


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_snapshot_is_recompiled_never_served(tiny_kv, tmp_path, tiny_skills, damage):
    from skillkv.api import SkillKV

    tiny_kv.compile()
    reference = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], mode="full", params=GREEDY)
    path = _snapshot_file(tiny_kv, "beta-codes")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a snapshot made by another model (different random weights), put where this one is expected
        other = SkillKV(model="dummy:smollm2-135m", store=tmp_path / "other", skills=tiny_skills, device="cpu")
        other.handle.hf_config.num_hidden_layers = 2
        other.compile(["beta-codes"])
        data = _snapshot_file(other, "beta-codes").read_bytes()
    path.write_bytes(bytes(data))
    tiny_kv.forget_resident()
    tiny_kv.snapshots._index = None
    ans = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=GREEDY)
    assert ans.output_token_ids == reference.output_token_ids
    assert ans.tokens["cached"] == 0
    assert any("recompiling" in w for w in tiny_kv.warnings)
    tiny_kv.forget_resident()
    again = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=GREEDY)
    assert again.tokens["cached"] > 0 and again.output_token_ids == reference.output_token_ids


def test_compile_verify_recompiles_a_damaged_snapshot_no_ask_has_read(tiny_kv):
    """A data bit flip leaves the header intact, so a plain compile finds the snapshot current; --verify reads every
    stored piece back (here a compose neighbour snapshot) and recompiles the damaged one, leaving the rest."""
    tiny_kv.compile(neighbours=True)
    from skillkv.compose.neighbour import NEIGHBOUR

    key = tiny_kv.compiler.keys([NEIGHBOUR, tiny_kv.pick(["beta-codes"])[0]])[-1]
    path = tiny_kv.snapshots.snap_dir / tiny_kv.snapshots.entries()[key].file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    plain = {r.skill: r.status for r in tiny_kv.compile(neighbours=True)}
    assert set(plain.values()) == {"up to date"}
    checked = {r.skill: r.status for r in tiny_kv.compile(neighbours=True, verify=True)}
    assert checked.pop("beta-codes") == "recompiled" and set(checked.values()) == {"up to date"}
    for k, e in tiny_kv.snapshots.entries().items():
        tiny_kv.snapshots.get(k)  # every stored snapshot reads back and verifies


def test_zstd_snapshots_answer_identically(tiny_kv):
    tiny_kv.compile(compression="zstd")
    e = next(iter(tiny_kv.snapshots.entries().values()))
    assert e.compression == "zstd"
    full = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], mode="full", params=GREEDY)
    tiny_kv.forget_resident()
    exact = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=GREEDY)
    assert exact.tokens["cached"] > 0 and exact.output_token_ids == full.output_token_ids


def test_errors(tiny_kv):
    with pytest.raises(SkillkvError, match="empty"):
        tiny_kv.ask("   ")
    with pytest.raises(SkillError, match="unknown skill 'nope'"):
        tiny_kv.ask("hi", ["nope"])
    with pytest.raises(SkillkvError, match="unknown mode"):
        tiny_kv.ask("hi", ["alpha-tool"], mode="fast")
    tiny_kv.handle.hf_config.max_position_embeddings = 64
    with pytest.raises(PromptTooLong, match=r"exceeds the model's context of 64 tokens"):
        tiny_kv.ask("What does B-17 mean?", ["beta-codes"])


def test_gc_removes_stale_snapshots(tiny_kv, tiny_skills):
    tiny_kv.compile()
    tiny_kv.ask("What does B-17 mean?", ["beta-codes", "alpha-tool"], params=SamplingParams(max_tokens=1))
    md = tiny_skills / "beta-codes" / "SKILL.md"
    md.write_text(md.read_text() + "\nMore codes.\n")
    tiny_kv.reload()
    assert {s.skill.name: s.state for s in tiny_kv.status()}["beta-codes"] == "stale"
    removed, freed = tiny_kv.gc()
    # the old beta snapshot and the chain (beta, alpha) that started from it are both stale
    assert sorted(e.skill for e in removed) == ["alpha-tool", "beta-codes"] and freed > 0
    assert {e.skill for e in tiny_kv.snapshots.entries().values()} == {"alpha-tool", "gamma-notes"}


def test_selection_without_names(tiny_kv):
    ans = tiny_kv.ask("What do the beta error codes mean?", params=SamplingParams(max_tokens=2))
    assert ans.skills == ["beta-codes"]
    none = tiny_kv.ask("What is the capital of France?", params=SamplingParams(max_tokens=2))
    assert none.skills == []


def test_paged_engine_through_the_api_exact_equals_full_and_reuses_l1(tiny_skills, tmp_path):
    """The paged engine behind SkillKV (CPU, torch attention): exact == full token for token, a second question
    over the same skills is an L1 hit, a pinned skill is resident before it is asked, and its snapshots live in
    their own store folder."""
    from skillkv.api import SkillKV

    kv = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu", engine="paged",
                 kv_budget=8 << 20, pin=["beta-codes"])
    hf = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu", engine="hf")
    assert kv.engine == "paged" and hf.engine == "hf" and kv.tag != hf.tag
    names = [s.name for s in kv.load_skills().skills]
    params = SamplingParams(max_tokens=12)
    a = kv.ask("how do pages work?", names[:2], params=params)
    b = kv.ask("how do pages work?", names[:2], mode="full", params=params)
    c = kv.ask("and what else?", names[:2], params=params)
    assert a.output_token_ids == b.output_token_ids
    assert a.tiers == ["computed", "computed"] and c.tiers == ["l1", "l1"]
    chosen = kv.pick(names[:2])
    assert c.tokens["cached"] == sum(len(kv.compiler.piece_ids(chosen, i)) for i in range(2))
    assert c.tokens["computed"] == c.tokens["prompt"] - c.tokens["cached"]
    eng = kv.runner.engine
    beta = kv.compiler.keys(kv.pick(["beta-codes"]))[0]
    assert eng.table.entries[beta].pinned
    eng.table.check()
    assert all(e.refs == 0 for e in eng.table.entries.values())  # every request released its prefix
    hf_ans = hf.ask("how do pages work?", names[:2], params=params)
    assert hf_ans.output_token_ids == a.output_token_ids  # fp32 on the CPU: both engines agree


@pytest.mark.gpu
def test_exact_equals_full_on_the_gpu_paged_engine(tiny_skills, tmp_path):
    """bf16 on CUDA, CUDA graphs and FlashInfer: exact mode answers token for token like full mode, cold (pieces
    computed), from L2 (a new process's view: fresh SkillKV) and from L1."""
    from skillkv.api import SkillKV

    def open_kv():
        return SkillKV(model="dummy:smollm2-135m", store=tmp_path / "store", skills=tiny_skills, device="cuda")

    kv = open_kv()
    assert kv.engine == "paged" and kv.runner.engine.graphs is not None
    names = [s.name for s in kv.load_skills().skills]
    params = SamplingParams(max_tokens=16)
    for chosen in (names[:1], names[:2], names[1::-1]):
        full = kv.ask("how do pages work?", chosen, mode="full", params=params)
        cold = kv.ask("how do pages work?", chosen, params=params)
        warm = kv.ask("how do pages work?", chosen, params=params)
        l2 = open_kv().ask("how do pages work?", chosen, params=params)
        assert warm.tiers == ["l1"] * len(chosen) and l2.tiers == ["l2"] * len(chosen)
        assert full.output_token_ids == cold.output_token_ids == warm.output_token_ids == l2.output_token_ids


def test_paged_engine_pages_stored_snapshots_in_through_the_tiers(tiny_skills, tmp_path):
    """A new process (fresh SkillKV) pages the stored chain in through L2 -> host -> pool, layer-pipelined, and
    answers exactly as before; a damaged piece is detected, warned about, removed and recomputed, never served."""
    from skillkv.api import SkillKV

    warnings = []

    def open_kv():
        return SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu",
                       engine="paged", kv_budget=8 << 20, on_warning=warnings.append)

    params = SamplingParams(max_tokens=10)
    first = open_kv()
    names = [s.name for s in first.load_skills().skills][:2]
    ref = first.ask("how do pages work?", names, params=params)
    again = open_kv().ask("how do pages work?", names, params=params)
    assert ref.tiers == ["computed"] * 2 and again.tiers == ["l2"] * 2
    assert again.output_token_ids == ref.output_token_ids
    assert again.tokens["cached"] > 0 and again.tokens["cached"] + again.tokens["computed"] == ref.tokens["prompt"]
    kv = open_kv()
    key = kv.compiler.keys(kv.pick(names))[-1]
    path = kv.snapshots.snap_dir / kv.snapshots.entries()[key].file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor: found while streaming, after the header checks passed
    path.write_bytes(bytes(data))
    damaged = kv.ask("how do pages work?", names, params=params)
    assert damaged.output_token_ids == ref.output_token_ids and "computed" in damaged.tiers
    assert any("recompil" in w for w in warnings)
    assert kv.runner.engine.table.check() is None and all(e.refs == 0 for e in kv.runner.engine.table.entries.values())
    assert open_kv().ask("how do pages work?", names, params=params).tiers == ["l2"] * 2  # stored again, sound


@pytest.mark.slow
def test_damage_found_by_the_page_in_before_the_sequence_opens(real_kv, tmp_path, monkeypatch):
    """The default model's snapshots stream in layer by layer: a data bit flip in a middle layer is found by the
    background page-in. When that happens before the sequence opens (the race `make faults` hit), the ask still
    answers like a full prefill, from a recomputed prefix, and the store is repaired."""
    from skillkv.api import SkillKV
    from skillkv.residency import Residency

    kv = SkillKV(model="default", store=tmp_path / "store", skills=real_kv.skills_dir, device="cpu",
                 on_warning=lambda w: None)
    q, skill = "How long should a commit subject line be?", ["git-commit-messages"]
    kv.compile(skill, neighbours=False)
    full = kv.ask(q, skill, mode="full", params=GREEDY)
    path = _snapshot_file(kv, skill[0])
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, header, then the tensors
    data[(start + len(data)) // 2] ^= 0xFF  # a middle layer's tensor
    path.write_bytes(bytes(data))
    kv.forget_resident()
    make_resident = Residency.make_resident

    def then_wait(self, skills, pin=False, settle=False):
        info = make_resident(self, skills, pin, settle)
        paging = self.runner()._pending.get(self.compiler.keys(skills)[-1])
        paging and paging.finished.wait()
        return info
    monkeypatch.setattr(Residency, "make_resident", then_wait)
    ans = kv.ask(q, skill, mode="exact", params=GREEDY)
    assert ans.output_token_ids == full.output_token_ids and ans.tokens["cached"] == 0
    kv.forget_resident()
    again = kv.ask(q, skill, mode="exact", params=GREEDY)
    assert again.tokens["cached"] > 0 and again.output_token_ids == full.output_token_ids
