"""The one engine loop (sched/loop.py) on the tiny random model: requests batched give each the answer it gets
alone; a prompt fed in pieces equals it fed whole; a multi-turn conversation reuses every full page of the last
turn's prompt and answer and still equals full mode token for token; cancellation frees pages; a snapshot found
damaged mid-step is never served (the request is reopened); `ask` runs on the same loop."""

from __future__ import annotations

import random

import pytest

from skillkv.errors import SnapshotError
from skillkv.generate import SamplingParams


@pytest.fixture
def kv(tmp_path, tiny_skills):
    from skillkv.api import SkillKV

    k = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu", batch_invariant=None,
                kv_budget=16 << 20, on_warning=lambda m: None)
    assert k.runner.prefix_cache, k.runner.cache_note
    return k


def exact_here(kv) -> None:
    """Skip where this machine's kernels are not chunk-invariant (the cache is then approximate: tested by forcing
    it below, on every machine; whether the verdict is true: tests/engine/test_prefix_cache.py)."""
    if not kv.runner.cache_exact:
        pytest.skip(f"the prefix cache is approximate on this machine: {kv.runner.cache_note}")


def _req(kv, ids, mode="auto", max_tokens=8, skills=()):
    return kv.request(list(skills), ids, SamplingParams(max_tokens=max_tokens), mode, preamble=False)


def _ids(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def test_batched_requests_get_the_answers_they_get_alone(kv):
    loop = kv.make_loop(max_batch=8)
    prompts = [_ids(i, 20 + 7 * i) for i in range(5)]
    alone = [loop.run(_req(kv, p, "full")).output for p in prompts]
    reqs = [_req(kv, p, "full") for p in prompts]
    for r in reqs:
        loop.add(r)
    while any(r.state != "done" for r in reqs):
        loop.step()
    assert [r.output for r in reqs] == alone
    kv.runner.table.check()


def test_a_prompt_fed_in_pieces_equals_it_fed_whole(kv):
    exact_here(kv)
    ids = _ids(7, 300)
    whole = kv.make_loop().run(_req(kv, ids, "full"))
    pieces = kv.make_loop(max_step_tokens=37)
    req = _req(kv, ids, "full")
    pieces.add(req)
    steps = 0
    while req.state != "done":
        pieces.step()
        steps += 1
    assert req.output == whole.output and steps > len(req.output) + 1  # 300 tokens took several steps


def test_the_prefill_time_counts_the_steps_that_fed_the_prompt_only(kv):
    """`timings_ms.prefill` (serve's responses, the agent bench's first token / prefill ratio): the engine steps
    of the prompt, here fed in pieces, up to its first token; never the decode steps after it."""
    req = kv.make_loop(max_step_tokens=37).run(_req(kv, _ids(3, 200), "full", max_tokens=6))
    assert 0 < req.prefill_s <= req.t_first - req.t_submit
    t = req.timings_ms()
    assert t["prefill"] == round(req.prefill_s * 1e3, 1) and t["prefill"] <= t["ttft"] <= t["total"]


def test_a_conversation_reuses_the_last_turn_and_equals_full_mode(kv):
    exact_here(kv)
    loop = kv.make_loop()
    ids = _ids(9, 45)
    for turn in range(4):
        exact = loop.run(_req(kv, ids, "exact"))
        full = loop.run(_req(kv, ids, "full"))
        assert exact.output == full.output, turn
        assert full.reused == {"prefix_cache": 0, "skill_kv": 0}  # full mode bypasses every cache
        if turn:
            # every full page of the last turn's prompt and answer (its last token was sampled, never fed)
            assert exact.reused["prefix_cache"] == ((len(history) - 1) // 16) * 16
        history = ids + exact.output
        ids = history + _ids(turn, 11)
    assert exact.tokens["computed"] == len(exact.ids) - exact.cached


def test_cancelled_requests_free_their_pages(kv):
    loop = kv.make_loop()
    req = _req(kv, _ids(3, 50), max_tokens=50)
    loop.add(req)
    loop.step()
    assert req.state == "running" and kv.runner.table.private
    loop.cancel(req)
    loop.step()
    assert req.state == "done" and not kv.runner.table.private
    kv.runner.table.check()


def test_a_snapshot_damaged_mid_step_is_reopened_not_served(kv, monkeypatch):
    loop = kv.make_loop()
    kv.compile(["beta-codes"])
    skill = kv.pick(["beta-codes"])
    q = kv.builder.question_ids("What does B-17 mean?")
    ref = loop.run(kv.request(skill, q, SamplingParams(max_tokens=6), "full"))
    damaged = []
    plain = kv.runner.prefill
    fails = iter([True])

    def prefill(seqs, ids, every=False):
        if next(fails, False):
            raise SnapshotError("beta: checksum mismatch")
        return plain(seqs, ids, every)
    monkeypatch.setattr(kv.runner, "prefill", prefill)
    monkeypatch.setattr(kv.residency, "damaged", lambda e, skills: damaged.append((str(e), skills)))
    req = loop.run(kv.request(skill, q, SamplingParams(max_tokens=6), "exact"))
    assert req.output == ref.output and req.retries == 1 and damaged == [("beta: checksum mismatch", skill)]


def test_ask_runs_on_the_loop(kv):
    kv.compile(["beta-codes"])
    a = kv.ask("What does B-17 mean?", ["beta-codes"], mode="exact", params=SamplingParams(max_tokens=5))
    f = kv.ask("What does B-17 mean?", ["beta-codes"], mode="full", params=SamplingParams(max_tokens=5))
    assert a.output_token_ids == f.output_token_ids and kv._loop.steps >= 2
    assert a.tokens["skill_kv"] + a.tokens["prefix_cache"] == a.tokens["cached"] > 0


def test_where_the_cache_is_not_exact_only_auto_reuses_it_and_says_so(kv, monkeypatch):
    """A GPU runner's FlashInfer / FA3 attention is not chunk-invariant: exact mode then never reads the cache;
    auto does, and reports mode "cached" with the reason."""
    monkeypatch.setattr(kv.runner, "cache_exact", False)
    loop = kv.make_loop()
    ids = _ids(11, 60)
    loop.run(_req(kv, ids, "auto"))
    again = ids + _ids(12, 5)
    exact = loop.run(_req(kv, again, "exact"))
    auto = loop.run(_req(kv, again, "auto"))
    assert exact.reused["prefix_cache"] == 0 and exact.mode == "exact"
    assert auto.reused["prefix_cache"] == 48 and auto.mode == "cached" and "not bit-identical" in auto.reason
    kv.prefixes.open_request(auto)  # opened again (the pool could not hold it yet): in the mode asked for
    kv.runner.release(auto.seq)
    assert auto.mode == "cached" and auto.asked == "auto"


class _Only:
    """A constraint that allows one token until `n` were accepted, then only the stop token (sched/grammar.py's
    interface); `fail_at`: raise ConstraintError when asked for that position's mask."""

    def __init__(self, token, stop, n, fail_at=None):
        self.token, self.stop, self.n, self.fail_at, self.accepted = token, stop, n, fail_at, []

    def mask(self, row):
        from skillkv.sched.grammar import ConstraintError

        if len(self.accepted) == self.fail_at:
            raise ConstraintError("the grammar allows no next token")
        keep = self.token if len(self.accepted) < self.n else self.stop
        value = row[keep].clone()
        row.fill_(float("-inf"))
        row[keep] = value

    def accept(self, tok):
        self.accepted.append(tok)

    @property
    def finished(self):
        return len(self.accepted) > self.n


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_constraint_masks_every_chosen_token_and_a_dead_end_fails_only_its_request(kv, temperature):
    loop = kv.make_loop(max_batch=4)
    stop = min(loop.stop_ids)
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=1)
    held = kv.request([], _ids(1, 30), params, "full", preamble=False)
    held.constraint = _Only(77, stop, 4)
    dead = kv.request([], _ids(2, 30), params, "full", preamble=False)
    dead.constraint = _Only(77, stop, 4, fail_at=2)
    free = kv.request([], _ids(3, 30), params, "full", preamble=False)
    alone = kv.make_loop().run(kv.request([], _ids(3, 30), params, "full", preamble=False)).output
    for r in (held, dead, free):
        loop.add(r)
    while any(r.state != "done" for r in (held, dead, free)):
        loop.step()
    assert held.output == [77] * 4 and held.finish_reason == "stop" and held.constraint.accepted == [77] * 4 + [stop]
    assert dead.finish_reason == "error" and "no next token" in str(dead.error) and dead.output == [77, 77]
    assert free.output == alone  # its neighbours' constraints never touch it
    kv.runner.table.check()
