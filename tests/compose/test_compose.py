"""Composition: placement correctness (re-positioned keys equal keys computed at those positions), repair, and
auto mode's choice (issue 4). Tiny random models, plus the real default model for placement (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import chain_kv, composed_kv, run_cli

from skillkv.compose import fidelity
from skillkv.engine.rope import check_composable, rerotate, rope_delta
from skillkv.compose.neighbour import NEIGHBOUR
from skillkv.compose.repair import Repair, choose_positions, compose, recompute
from skillkv.generate import SamplingParams
from skillkv.errors import SkillkvError

GREEDY = SamplingParams(max_tokens=8)
TWO = ["beta-codes", "alpha-tool"]


def _rotary(**rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                      max_position_embeddings=131072, rope_parameters=rope)
    return cfg, LlamaRotaryEmbedding(cfg)


ROPES = {
    "default": dict(rope_type="default", rope_theta=100000.0),  # the default model (SmolLM2-135M)
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),  # the Llama-3.1-8B shape
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32768),
}


@pytest.mark.parametrize("rope", ROPES, ids=list(ROPES))
@pytest.mark.parametrize("start,delta", [(0, 37), (5, 1000), (1200, -700), (3, 7000)])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(rope, start, delta):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg, rot = _rotary(**ROPES[rope])
    check_composable(cfg)
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 16, 128)  # [batch, heads, tokens, dim]

    def at(p0):
        pos = torch.arange(p0, p0 + 16)[None]
        cos, sin = rot(raw, pos)
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1][0].transpose(0, 1)  # NHD

    cos, sin = rope_delta(rot, delta, raw.device)
    torch.testing.assert_close(rerotate(at(start), cos, sin), at(start + delta), rtol=0, atol=2e-3)


def test_rerotate_keeps_dtype_and_device():
    _, rot = _rotary(**ROPES["default"])
    k = torch.randn(4, 2, 128, dtype=torch.bfloat16)
    cos, sin = rope_delta(rot, 3, k.device)
    assert rerotate(k, cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("rope", [dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
                                  dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 64,
                                       long_factor=[2.0] * 64, original_max_position_embeddings=4096)])
def test_length_dependent_rope_is_refused(rope):
    cfg, _ = _rotary(**rope)
    with pytest.raises(SkillkvError, match="position-independent"):
        check_composable(cfg)


def test_per_layer_type_rope_needs_layer_types():
    """Sliding-window models compose (tests/runners/test_hf_sliding_window.py); a per-type RoPE dict without `layer_types`
    naming each layer's table cannot be placed."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2", sliding_window=4096, use_sliding_window=False)
    check_composable(cfg)
    cfg = AutoConfig.for_model("gemma3_text")
    check_composable(cfg)
    cfg.layer_types = None
    with pytest.raises(SkillkvError, match="no layer_types"):
        check_composable(cfg)


def _parts(kv, names):
    skills = kv.pick(names)
    snaps = [chain_kv(kv, [s]) for s in skills]
    segs = [kv.builder.preamble_ids()] + [kv.builder.skill_ids(s) for s in skills]
    exact = chain_kv(kv, skills)
    return snaps, segs, exact


def _assert_placement(kv, names, atol):
    snaps, segs, exact = _parts(kv, names)
    c = compose(kv.runner.model, snaps, segs, Repair())
    n0 = len(segs[0]) + len(segs[1])
    assert c.starts == [0, len(segs[0])] + [sum(map(len, segs[:i])) for i in range(2, len(segs))]
    assert c.recomputed == [] and c.skill_tokens == sum(map(len, segs[1:]))
    for (k, v), (ek, ev) in zip(c.kv, exact):
        assert k.shape == ek.shape and v.shape == ev.shape
        torch.testing.assert_close(k[:n0], ek[:n0], rtol=0, atol=1e-5)  # preamble + first skill: as stored
        torch.testing.assert_close(v[:n0], ev[:n0], rtol=0, atol=1e-5)
    # layer 0's keys and values depend only on the token and its position: every placed row must equal the
    # row a full prefill computes at that position
    (k0, v0), (ek0, ev0) = c.kv[0], exact[0]
    torch.testing.assert_close(k0, ek0, rtol=0, atol=atol)
    torch.testing.assert_close(v0, ev0, rtol=0, atol=1e-5)
    # deeper layers differ (a later skill never saw the earlier one): that is what repair is for
    assert (c.kv[-1][1][n0:] - exact[-1][1][n0:]).abs().max() > 1e-4


def test_placed_keys_equal_keys_computed_at_those_positions(tiny_kv):
    _assert_placement(tiny_kv, ["gamma-notes", "beta-codes", "alpha-tool"], atol=1e-4)


def test_recompute_over_an_exact_cache_changes_nothing(tiny_kv):
    skills = tiny_kv.pick(TWO)
    exact = chain_kv(tiny_kv, skills)
    ids = [t for s in [tiny_kv.builder.preamble_ids()] + [tiny_kv.builder.skill_ids(s) for s in skills] for t in s]
    out = recompute(tiny_kv.runner.model, ids, exact, [0, 3, len(ids) // 2, len(ids) - 1])
    for (k, v), (ek, ev) in zip(out, exact):
        torch.testing.assert_close(k, ek, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, ev, rtol=0, atol=1e-5)


def test_repairing_every_later_token_gives_the_exact_kv(tiny_kv):
    snaps, segs, exact = _parts(tiny_kv, ["gamma-notes", "beta-codes", "alpha-tool"])
    c = compose(tiny_kv.runner.model, snaps, segs, Repair(lead=10 ** 6))
    assert len(c.recomputed) == sum(map(len, segs[2:]))
    for (k, v), (ek, ev) in zip(c.kv, exact):
        torch.testing.assert_close(k, ek, rtol=0, atol=1e-4)
        torch.testing.assert_close(v, ev, rtol=0, atol=1e-4)


def test_partial_repair_moves_toward_exact(tiny_kv):
    snaps, segs, exact = _parts(tiny_kv, TWO)

    def err(rep):
        c = compose(tiny_kv.runner.model, snaps, segs, rep)
        return sum(float((v - ev).norm()) for (_, v), (_, ev) in zip(c.kv, exact)), c

    e0, _ = err(Repair())
    for select in ("front", "deviation"):
        e1, c = err(Repair(recompute=0.3, select=select))
        assert e1 < e0, select
        assert abs(c.recomputed_fraction - 0.3) < 0.01
        assert min(c.recomputed) >= c.starts[2]  # only tokens of later skills
    assert c.recomputed != err(Repair(recompute=0.3))[1].recomputed  # the two selections differ


def test_choose_positions_lead_then_most_deviating():
    starts, end = [0, 4, 14, 24], 30
    assert choose_positions(Repair(lead=3), starts, end, None) == [14, 15, 16, 24, 25, 26]
    dev = torch.zeros(end)
    dev[[20, 28, 2, 5]] = torch.tensor([5.0, 4.0, 9.0, 9.0])  # 2 and 5 are not in later skills
    got = choose_positions(Repair(lead=3, recompute=8 / 26, select="deviation"), starts, end, dev)
    assert got == [14, 15, 16, 20, 24, 25, 26, 28]


def test_choose_positions_front_spreads_the_budget_over_later_skills():
    starts, end = [0, 4, 14, 24], 30  # skills at 4, 14 and 24: 26 skill tokens, 16 in later skills
    assert choose_positions(Repair(recompute=8 / 26), starts, end, None) == [14, 15, 16, 17, 24, 25, 26, 27]
    # lead counts towards the budget; the rest goes to the next ranks, evenly
    assert choose_positions(Repair(lead=3, recompute=10 / 26), starts, end, None) == [
        14, 15, 16, 17, 18, 24, 25, 26, 27, 28]
    # the short last skill (6 tokens) runs out first; the rest goes to the longer one
    assert choose_positions(Repair(recompute=14 / 26), starts, end, None) == list(range(14, 22)) + list(range(24, 30))
    assert choose_positions(Repair(recompute=1.0), starts, end, None) == list(range(14, 30))
    assert choose_positions(Repair(recompute=0.5), [0, 4], 30, None) == []  # one skill: nothing to repair
    assert len(choose_positions(Repair(recompute=0.15), starts, end, None)) == 3  # 3.9 -> 3: never above 15%


def test_repair_rejects_bad_values():
    with pytest.raises(SkillkvError):
        Repair(recompute=1.5)
    with pytest.raises(SkillkvError):
        Repair(lead=-1)
    with pytest.raises(SkillkvError):
        Repair(recompute=0.1, select="random")
    assert Repair.from_json({"lead": 0, "recompute": 0.1, "probe_layer": 1}).select == "deviation"  # old records
    assert Repair.from_json(Repair(recompute=0.1).to_json()) == Repair(recompute=0.1)


# ------------------------------------------------------------------------------------------------ modes


def _record(kv, top1, facts=0.5, full=0.5, recomputed=0.1, fingerprint=None, repair=None):
    fidelity.write(kv.snapshots.dir, {"fingerprint": fingerprint or kv.fingerprint, "full_fact_accuracy": full,
                                      "settings": [{"repair": (repair or Repair(lead=4)).to_json(), "top1": top1,
                                                    "fact_accuracy": facts, "recomputed": recomputed}]})


def choose(kv, names=TWO):
    skills = kv.pick(names)
    return kv.composer.choose("auto", skills, kv.compiler.stored(skills))


def test_auto_is_exact_for_one_skill_and_without_a_measurement(tiny_kv):
    one = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=GREEDY)
    assert one.mode == "exact" and one.mode_reason == "one skill"
    two = tiny_kv.ask("What does B-17 mean?", TWO, params=GREEDY)
    assert two.mode == "exact" and "not measured" in two.mode_reason
    full = tiny_kv.ask("What does B-17 mean?", TWO, mode="full", params=GREEDY)
    assert two.output_token_ids == full.output_token_ids


def test_auto_composes_only_when_the_measurement_meets_the_bar(tiny_kv):
    tiny_kv.compile()
    _record(tiny_kv, top1=0.97)  # below the bar
    assert choose(tiny_kv)[0] == "exact"
    _record(tiny_kv, top1=0.99, recomputed=0.2)  # recomputes too much
    assert choose(tiny_kv)[0] == "exact"
    _record(tiny_kv, top1=0.99, facts=0.45, full=0.5)  # 90% of full's facts
    assert choose(tiny_kv)[0] == "exact"
    _record(tiny_kv, top1=0.99, fingerprint="another-model")
    assert choose(tiny_kv)[0] == "exact"
    _record(tiny_kv, top1=0.99, facts=0.5, repair=Repair(lead=4))
    mode, repair, reason = choose(tiny_kv)
    assert (mode, repair) == ("compose", Repair(lead=4)) and "meets the bar" in reason
    ans = tiny_kv.ask("What does B-17 mean?", TWO, params=GREEDY)
    assert ans.mode == "compose" and ans.compose["repair"]["lead"] == 4
    assert ans.compose["recomputed"] == 4  # the first 4 tokens of the one later skill
    assert not tiny_kv.compiler.stored(tiny_kv.pick(TWO))  # compose stores no combination
    exact = tiny_kv.ask("What does B-17 mean?", TWO, mode="exact", params=GREEDY)
    assert tiny_kv.compiler.stored(tiny_kv.pick(TWO))
    again = tiny_kv.ask("What does B-42 mean?", TWO, params=GREEDY)
    assert again.mode == "exact" and again.mode_reason == "combination stored" and exact.mode == "exact"


def test_explicit_compose_mode_and_token_accounting(tiny_kv):
    tiny_kv.compile()
    q = "What does B-17 mean?"
    q_len = len(tiny_kv.builder.question_ids(q))
    later = len(tiny_kv.builder.skill_ids(tiny_kv.pick(TWO)[1]))
    first = tiny_kv.ask(q, TWO, mode="compose", repair=Repair(lead=2), params=GREEDY)
    # the later skill's neighbour snapshot is compiled (and stored) on first use, then loaded
    assert first.tokens["computed"] == q_len + later + 2 and first.tiers[1] == "computed"
    nb_key = tiny_kv.compiler.keys([NEIGHBOUR, tiny_kv.pick(TWO)[1]])[-1]
    assert tiny_kv.snapshots.contains(nb_key) and nb_key in tiny_kv.live_keys()  # gc keeps it
    from skillkv.report import collect

    rep = collect(tiny_kv, None)[0]  # the stand-in is reported apart, never as a user's (or removed) skill
    assert NEIGHBOUR.name not in rep["skills"] and rep["internal"]["compose_neighbour"]["snapshots"] == 1
    assert rep["internal"]["compose_neighbour"]["bytes"] + sum(s["snapshot_bytes"] for s in rep["skills"].values()) \
        == rep["store"]["bytes"]
    ans = tiny_kv.ask(q, TWO, mode="compose", repair=Repair(lead=2), params=GREEDY)
    assert ans.mode == "compose" and ans.mode_reason == "requested"
    assert ans.tokens["computed"] == q_len + 2
    assert ans.tokens["cached"] + ans.tokens["computed"] == ans.tokens["prompt"]
    single = tiny_kv.ask(q, ["beta-codes"], mode="compose", params=GREEDY)
    assert single.mode == "exact" and single.compose is None
    full_repair = tiny_kv.ask(q, TWO, mode="compose", repair=Repair(lead=10 ** 6), params=GREEDY)
    full = tiny_kv.ask(q, TWO, mode="full", params=GREEDY)
    assert full_repair.output_token_ids == full.output_token_ids


def test_cli_compose_json_and_bad_input(monkeypatch, capsys, tiny_skills, tmp_path):
    args = ["--skills", str(tiny_skills), "--store", str(tmp_path / "s"), "--model", "dummy:tiny", "--device", "cpu"]
    code, out, err = run_cli(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "beta-codes", "-s",
                             "alpha-tool", "--mode", "compose", "--repair-lead", "3", "--max-tokens", "4", "--json",
                             *args)
    assert code == 0, err
    ans = json.loads(out)
    assert ans["mode"] == "compose" and ans["compose"]["recomputed"] == 3
    code, out, err = run_cli(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "beta-codes", "-s",
                             "alpha-tool", "--max-tokens", "4", "--json", *args)
    assert code == 0 and json.loads(out)["mode"] == "exact"
    code, out, err = run_cli(monkeypatch, capsys, "ask", "q?", "--mode", "nope", *args)
    assert code != 0 and err.strip().startswith("skillkv: error: unknown mode")


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_placement_on_the_real_default_model(real_kv):
    _assert_placement(real_kv, ["release-notes", "git-commit-messages"], atol=2e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compose_runs_on_the_device_of_the_kv(tmp_path, tiny_skills, device):
    """Placement and repair stay on the model's device (bf16 on CUDA): compose answers there, layer 0 matches the
    exact chain within the dtype's tolerance, and a full repair reproduces it."""
    from skillkv.api import SkillKV

    kv = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device=device)
    snaps, segs, exact = _parts(kv, TWO)
    tol = 1e-4 if kv.handle.dtype == torch.float32 else 3e-2
    c = compose(kv.runner.model, snaps, segs, Repair(lead=3, recompute=0.2))
    assert c.kv[0][0].device.type == device and c.kv[0][0].dtype == kv.handle.dtype
    torch.testing.assert_close(c.kv[0][0].float(), exact[0][0].float(), rtol=tol, atol=tol)
    full = compose(kv.runner.model, snaps, segs, Repair(lead=10 ** 6))
    for (k, v), (ek, ev) in zip(full.kv, exact):
        torch.testing.assert_close(k.float(), ek.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(v.float(), ev.float(), rtol=tol, atol=tol)
    ans = kv.ask("What does B-17 mean?", TWO, mode="compose", params=GREEDY)
    assert ans.mode == "compose" and ans.output_token_ids


def test_later_skills_are_placed_from_their_neighbour_snapshots(tiny_kv):
    """Compose places the first skill from its single-skill snapshot and later ones from [preamble][NEIGHBOUR]
    [skill], re-rotated from where they were compiled; `neighbour=False` places the single-skill rows instead."""
    tiny_kv.compile()
    a, b = tiny_kv.pick(TWO)
    b_ids = tiny_kv.builder.skill_ids(b)
    ctx = len(tiny_kv.builder.preamble_ids()) + len(tiny_kv.builder.skill_ids(NEIGHBOUR))
    start = len(tiny_kv.builder.preamble_ids()) + len(tiny_kv.builder.skill_ids(a))
    variant = chain_kv(tiny_kv, [NEIGHBOUR, b])
    assert variant[0][0].shape[0] == ctx + len(b_ids)
    cos, sin = rope_delta(tiny_kv.runner.model.model.rotary_emb, start - ctx, "cpu")
    kv, _ = composed_kv(tiny_kv, [a, b], Repair())
    plain, _ = composed_kv(tiny_kv, [a, b], Repair(neighbour=False))
    exact_a = chain_kv(tiny_kv, [a])
    for layer, ((k, v), (pk, pv), (vk, vv), (ak, av)) in enumerate(zip(kv, plain, variant, exact_a)):
        assert torch.equal(k[:start], ak) and torch.equal(v[:start], av)
        assert torch.equal(v[start:], vv[ctx:])
        torch.testing.assert_close(k[start:], rerotate(vk[ctx:], cos, sin), rtol=0, atol=0)
        if layer:  # layer 0 depends on token and position only; deeper layers saw a different context
            assert not torch.allclose(pv[start:], v[start:])


def test_auto_follows_the_record_shipped_for_the_weights(tiny_kv, tmp_path, monkeypatch):
    """Without a record in the store, auto follows the one shipped in the package for the model's weights."""
    monkeypatch.setattr(fidelity, "SHIPPED", tmp_path / "shipped")
    weights = tiny_kv.handle.weights_id
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / f"{weights}.json").write_text(json.dumps({
        "weights_id": weights, "full_fact_accuracy": 0.5, "settings": [
            {"repair": Repair(recompute=0.15).to_json(), "top1": 0.99, "fact_accuracy": 0.5, "recomputed": 0.15}]}))
    mode, repair, reason = choose(tiny_kv)
    assert (mode, repair) == ("compose", Repair(recompute=0.15)) and "meets the bar" in reason
    _record(tiny_kv, top1=0.9)  # the store's own measurement wins
    assert choose(tiny_kv)[0] == "exact"
