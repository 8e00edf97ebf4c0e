"""The real default model (SmolLM2-135M-Instruct, fp32, CPU): exact mode is token-for-token full mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from skillkv.generate import SamplingParams

pytestmark = pytest.mark.slow

CASES = [
    ("How long should the subject line of a commit message be?", ["git-commit-messages"]),
    ("Which sections does a Keep a Changelog release note have?", ["release-notes"]),
    ("What does breakpoint() do in Python?", ["python-debugging"]),
    ("Write a commit subject for a release that fixes a crash.", ["release-notes", "git-commit-messages"]),
    ("How do I find which commit introduced a bug?", ["git-commit-messages", "python-debugging"]),
]


@pytest.mark.parametrize("question,skills", CASES, ids=[f"{len(s)}-skill-{i}" for i, (_, s) in enumerate(CASES)])
def test_exact_mode_is_token_identical_to_full(real_kv, question, skills):
    params = SamplingParams(max_tokens=24)
    full = real_kv.ask(question, skills, mode="full", params=params)
    exact = real_kv.ask(question, skills, mode="exact", params=params)
    assert full.output_token_ids, "the model should say something"
    assert exact.output_token_ids == full.output_token_ids
    assert exact.answer == full.answer
    assert exact.tokens["prompt"] == full.tokens["prompt"]
    real_kv.forget_resident()  # the next ask reads the stored snapshots from disk
    again = real_kv.ask(question, skills, mode="exact", params=params)
    assert again.output_token_ids == full.output_token_ids
    assert again.tokens["computed"] < 64 and again.tokens["cached"] > 500


def test_stops_at_end_of_turn(real_kv):
    ans = real_kv.ask("Say hello.", ["git-commit-messages"], params=SamplingParams(max_tokens=200))
    assert ans.finish_reason == "stop"
    assert "<|im_end|>" not in ans.answer and "<|im_start|>" not in ans.answer


def test_cli_ask_json_on_the_real_model(real_kv, real_store):
    """A separate process: the model and snapshots come from disk; the answer equals the in-process one."""
    q, skills = CASES[0]
    expect = real_kv.ask(q, skills, mode="full", params=SamplingParams(max_tokens=16))
    p = subprocess.run([sys.executable, "-m", "skillkv", "ask", q, "--skill", skills[0], "--store", str(real_store),
                        "--skills", str(real_kv.skills_dir), "--max-tokens", "16", "--json", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ans = json.loads(p.stdout)
    assert ans["output_token_ids"] == expect.output_token_ids
    assert ans["tokens"]["cached"] > 0 and ans["model"] == "smollm2-135m-instruct"


def test_lean_paged_runner_greedy_equals_transformers(real_kv):
    """The default runner on the CPU is the lean paged one; on the real model (fp32) its greedy tokens are those of
    transformers (the hf runner, the reference) for the CI questions."""
    from skillkv.runners.hf import HFRunner

    assert real_kv.engine == "paged"
    hf = HFRunner(real_kv.runner.model)
    for q, skills in CASES[:3]:
        layout = real_kv.builder.layout(real_kv.pick(skills), q)
        got = real_kv.ask(q, skills, mode="full", params=SamplingParams(max_tokens=16)).output_token_ids
        seq = hf.open(None)
        logits = hf.prefill([seq], [layout.ids])[0]
        out = []
        for _ in range(len(got)):
            out.append(int(torch.argmax(logits)))
            logits = hf.prefill([seq], [[out[-1]]])[0]
        hf.release(seq)
        assert out == got, q


def test_auto_composes_the_default_model_per_its_shipped_measurement(real_kv):
    """`make eval` ships the default model's compose record keyed by its weights; a fresh install converts the same
    weights, so auto follows it: compose with the measured setting for an ordered combination not stored yet."""
    from skillkv.compose.repair import Repair
    from skillkv.measure.evaluate import DEFAULT_SET

    rec = real_kv.fidelity_record()
    assert rec is not None and rec["weights_id"] == real_kv.handle.weights_id and rec["eval_set"] == "eval/compose"
    assert DEFAULT_SET.is_dir()
    chosen = real_kv.pick(["sql-review", "python-debugging", "release-notes"])
    assert not real_kv.compiler.stored(chosen)
    assert real_kv.composer.choose("auto", chosen, False)[:2] == ("compose", Repair(recompute=0.15))
    # `skillkv compile` made the later skills' neighbour snapshots: the first composed question computes only
    # itself and its repair tokens
    assert real_kv.composer.uses_neighbours()
    results = real_kv.compile([s.name for s in chosen])
    assert [r.status for r in results if r.status == "skipped"] == []
    real_kv.forget_resident()
    q = "How should I review a slow SQL query?"
    ans = real_kv.ask(q, [s.name for s in chosen], params=SamplingParams(max_tokens=8))
    assert ans.mode == "compose" and ans.compose["recomputed_fraction"] <= 0.15 and ans.output_token_ids
    q_len = len(real_kv.builder.question_ids(q))
    assert ans.tokens["computed"] == q_len + ans.compose["recomputed"]
    assert "computed" not in ans.tiers
