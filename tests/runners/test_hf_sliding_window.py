"""Sliding-window models (Gemma 3's architecture): exact and full mode equal the model's own output, composition
re-rotates every layer with its own RoPE table and repairs with each layer's window, the paged engine refuses.

All on `dummy:gemma3-tiny` (random weights, a 32-token window, local layers with RoPE base 10k and global ones
with 1M); every prompt here is several windows long, and `test_the_window_matters_here` checks that it is."""

from __future__ import annotations

import pytest
import torch
from conftest import chain_kv, run_cli

from skillkv.compose.repair import Repair, compose, recompute, value_deviation
from skillkv.engine.rope import check_composable, rerotate, rope_delta, rope_layer_types
from skillkv.generate import SamplingParams
from skillkv.runners import ReadyKV
from skillkv.errors import SkillkvError
from skillkv.model import layer_windows

MODEL = "dummy:gemma3-tiny"
THREE = ["gamma-notes", "beta-codes", "alpha-tool"]
Q = "What does B-17 mean?"


@pytest.fixture
def gemma_kv(tmp_path, tiny_skills):
    from skillkv.api import SkillKV

    return SkillKV(model=MODEL, store=tmp_path / "store", skills=tiny_skills, device="cpu")


def _ids(kv, names, q=Q):
    return kv.builder.layout(kv.pick(names), q).ids


def _greedy_reference(model, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """The model's own greedy continuation: every step one forward of the whole sequence, no cache at all."""
    ids, out, first = list(ids), [], None
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            first = logits if first is None else first
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return first, out


def test_the_preset_has_both_layer_types_and_a_small_window(gemma_kv):
    cfg = gemma_kv.handle.hf_config
    assert layer_windows(cfg) == [32, None, 32, None]
    assert rope_layer_types(cfg) == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert len(_ids(gemma_kv, THREE)) > 20 * cfg.sliding_window


def test_the_window_matters_here(gemma_kv):
    """Without the window the same weights give other logits: the tests below do exercise the sliding layers."""
    from transformers import AutoModelForCausalLM

    model = gemma_kv.handle.load()
    cfg = model.config.__class__(**{**model.config.to_dict(), "sliding_window": 4096})
    wide = AutoModelForCausalLM.from_config(cfg)
    wide.load_state_dict(model.state_dict())
    ids = torch.tensor([_ids(gemma_kv, THREE)])
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits[0, -1], wide.eval()(input_ids=ids).logits[0, -1]
    assert (a - b).abs().max() > 1e-2


def test_runner_prefix_reuse_equals_the_models_own_output(gemma_kv):
    """A prefix computed once and reused (exact mode) gives the model's own logits and greedy tokens, also after
    the prompt has passed the window many times."""
    runner, model = gemma_kv.runner, gemma_kv.handle.load()
    ids = _ids(gemma_kv, THREE)
    ref_first, ref_tokens = _greedy_reference(model, ids, 12)
    cut = len(ids) - 40
    head = runner.open(None)
    runner.prefill([head], [ids[:cut]])
    prefix = runner.read(head, 0, cut)
    runner.release(head)
    assert all(k.shape[0] == cut for k, _ in prefix)  # every layer keeps every token
    runner.admit("head", [ReadyKV(prefix)])
    seq = runner.open("head")
    logits = runner.prefill([seq], [ids[cut:]])[0]
    torch.testing.assert_close(logits, ref_first, rtol=0, atol=1e-4)
    tokens = [int(logits.argmax())]
    for _ in range(11):
        tokens.append(int(runner.prefill([seq], [[tokens[-1]]])[0].argmax()))
    runner.release(seq)
    assert tokens == ref_tokens


def test_exact_mode_equals_full_mode(gemma_kv):
    params = SamplingParams(max_tokens=12)
    for names in (THREE, ["alpha-tool"], ["beta-codes", "alpha-tool"]):
        full = gemma_kv.ask(Q, names, mode="full", params=params)
        first = gemma_kv.ask(Q, names, mode="exact", params=params)  # computes and stores the chain
        again = gemma_kv.ask(Q, names, mode="exact", params=params)  # reuses it
        assert first.output_token_ids == again.output_token_ids == full.output_token_ids
        assert again.tokens["cached"] > 4 * gemma_kv.handle.hf_config.sliding_window


# ------------------------------------------------------------------------------------------------ compose


@pytest.mark.parametrize("start,delta", [(0, 37), (5, 1000), (1200, -700), (3, 3000)])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions_per_layer_type(gemma_kv, start, delta):
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    rot = gemma_kv.handle.load().model.rotary_emb
    check_composable(gemma_kv.handle.hf_config)
    torch.manual_seed(0)
    raw = torch.randn(1, 1, 16, 16)  # [batch, kv heads, tokens, head dim]

    def at(p0, layer_type):
        cos, sin = rot(raw, torch.arange(p0, p0 + 16)[None], layer_type)
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1][0].transpose(0, 1)

    types = ("sliding_attention", "full_attention")
    for t in types:
        cos, sin = rope_delta(rot, delta, raw.device, layer_type=t)
        torch.testing.assert_close(rerotate(at(start, t), cos, sin), at(start + delta, t), rtol=0, atol=1e-4)
        other = next(o for o in types if o != t)  # the other type's table is wrong here: the check can fail
        cos, sin = rope_delta(rot, delta, raw.device, layer_type=other)
        assert (rerotate(at(start, t), cos, sin) - at(start + delta, t)).abs().max() > 1e-2


def _parts(kv, names):
    skills = kv.pick(names)
    snaps = [chain_kv(kv, [s]) for s in skills]
    segs = [kv.builder.preamble_ids()] + [kv.builder.skill_ids(s) for s in skills]
    return snaps, segs, chain_kv(kv, skills)


def _max_diff(a, b) -> float:
    return max(max(float((k - ek).abs().max()), float((v - ev).abs().max())) for (k, v), (ek, ev) in zip(a, b))


def test_placed_keys_equal_keys_computed_at_those_positions(gemma_kv):
    """Layer 0 (a sliding layer) depends only on token and position: every placed row equals the exact one."""
    snaps, segs, exact = _parts(gemma_kv, THREE)
    c = compose(gemma_kv.runner.model, snaps, segs, Repair())
    torch.testing.assert_close(c.kv[0][0], exact[0][0], rtol=0, atol=2e-4)
    torch.testing.assert_close(c.kv[0][1], exact[0][1], rtol=0, atol=1e-5)
    n0 = len(segs[0]) + len(segs[1])
    assert _max_diff([(k[:n0], v[:n0]) for k, v in c.kv], [(k[:n0], v[:n0]) for k, v in exact]) < 1e-5
    assert (c.kv[-1][1][n0:] - exact[-1][1][n0:]).abs().max() > 1e-4  # later skills never saw the earlier ones


def test_compose_of_one_skill_is_exact(gemma_kv):
    snaps, segs, exact = _parts(gemma_kv, ["beta-codes"])
    assert _max_diff(compose(gemma_kv.runner.model, snaps, segs, Repair(recompute=0.5)).kv, exact) == 0.0
    params = SamplingParams(max_tokens=8)
    one = gemma_kv.ask(Q, ["beta-codes"], mode="compose", params=params)
    assert one.mode == "exact" and one.output_token_ids == gemma_kv.ask(Q, ["beta-codes"], mode="full",
                                                                        params=params).output_token_ids


def test_repair_passes_apply_each_layers_window(gemma_kv):
    """Over the exact KV, recompute changes nothing and the value probe sees no deviation at any layer: both
    would differ if a sliding layer attended beyond its window. Repairing every later token gives the exact KV
    and the full-mode answer."""
    snaps, segs, exact = _parts(gemma_kv, THREE)
    ids = [t for s in segs for t in s]
    assert _max_diff(recompute(gemma_kv.runner.model, ids, exact, [0, 40, len(ids) // 2, len(ids) - 1]), exact) < 1e-5
    model = gemma_kv.handle.load()
    composed = compose(gemma_kv.runner.model, snaps, segs, Repair()).kv
    for layer in (1, 2, 3):
        assert float(value_deviation(model, ids, exact, layer).max()) < 1e-4
        assert float(value_deviation(model, ids, composed, layer).max()) > 1e-3
    c = compose(gemma_kv.runner.model, snaps, segs, Repair(lead=10 ** 6))
    assert _max_diff(c.kv, exact) < 1e-4
    params = SamplingParams(max_tokens=8)
    repaired = gemma_kv.ask(Q, THREE, mode="compose", repair=Repair(lead=10 ** 6), params=params)
    assert repaired.output_token_ids == gemma_kv.ask(Q, THREE, mode="full", params=params).output_token_ids
    part = compose(gemma_kv.runner.model, snaps, segs, Repair(recompute=0.3))
    assert _max_diff(part.kv, exact) < _max_diff(composed, exact) and abs(part.recomputed_fraction - 0.3) < 0.01


def test_compose_accepts_per_layer_type_rope_and_refuses_length_dependent_tables():
    from transformers import AutoConfig

    check_composable(AutoConfig.for_model("gemma3_text"))
    check_composable(AutoConfig.for_model("mistral", sliding_window=4096))
    bad = {"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
           "full_attention": dict(rope_type="dynamic", rope_theta=1e6, factor=2.0)}
    with pytest.raises(SkillkvError, match="position-independent"):
        check_composable(AutoConfig.for_model("gemma3_text", rope_parameters=bad))


# ------------------------------------------------------------------------------------------------ paged engine


def test_paged_engine_refuses_sliding_window_models(tmp_path, tiny_skills, monkeypatch, capsys):
    from transformers import AutoConfig

    from skillkv.api import SkillKV
    from skillkv.runners import resolve_engine

    with pytest.raises(SkillkvError, match="paged engine"):
        SkillKV(model=MODEL, store=tmp_path / "s", skills=tiny_skills, device="cpu", engine="paged")
    assert SkillKV(model=MODEL, store=tmp_path / "s", skills=tiny_skills, device="cpu", engine="auto").engine == "hf"

    class Handle:  # a supported model type with a window: refused for the window, auto picks hf even on CUDA
        hf_config = AutoConfig.for_model("mistral", sliding_window=4096, num_hidden_layers=2)
        device = "cuda"

    with pytest.raises(SkillkvError, match="sliding-window"):
        resolve_engine("paged", Handle())
    assert resolve_engine("auto", Handle()) == "hf"
    code, out, err = run_cli(monkeypatch, capsys, "ask", Q, "-s", "beta-codes", "--engine", "paged", "--model", MODEL,
                             "--skills", str(tiny_skills), "--store", str(tmp_path / "s"), "--device", "cpu")
    assert code != 0 and err.strip().startswith("skillkv: error:") and len(err.strip().splitlines()) == 1
