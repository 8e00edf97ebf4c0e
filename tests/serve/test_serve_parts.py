"""skillkv serve, piece by piece: batch invariance of the engine, stop strings (the scheduler and the loop:
tests/sched/; the prompt mapping: test_render.py)."""

from __future__ import annotations

import pytest
import torch



@pytest.fixture(scope="module")
def tiny_model():
    from skillkv.model import resolve_model

    return resolve_model("dummy:tiny", device="cpu").load()


def test_batched_logits_are_bitwise_those_of_the_request_alone(tiny_model):
    """The batch-invariant engine: a request's logits do not depend on what it is batched with."""
    from skillkv.engine.paged import PagedEngine

    eng = PagedEngine(tiny_model, budget_bytes=4 << 20, attention="torch", page_size=4, row_block=8)
    prefix = list(range(5, 40))
    r = eng.start(None)
    eng.prefill([r], [prefix])
    kv = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, len(prefix))) for i in range(eng.pool.layers)]
    eng.finish(r)
    eng.make_resident("p", len(prefix), lambda: kv)
    g = torch.Generator().manual_seed(0)
    questions = [torch.randint(3, 500, (int(n),), generator=g).tolist() for n in (1, 3, 9, 17, 5, 30)]

    def run(batch: list[int], steps: int = 6) -> dict[int, list[torch.Tensor]]:
        reqs = {i: eng.start("p" if i % 2 == 0 else None) for i in batch}
        out = {i: [] for i in batch}
        logits = eng.prefill(list(reqs.values()), [questions[i] for i in batch])
        for _ in range(steps):
            for i, row in zip(batch, logits):
                out[i].append(row.clone())
            logits = eng.prefill(list(reqs.values()), [[int(out[i][-1].argmax())] for i in batch])
        for q in reqs.values():
            eng.finish(q)
        return out

    solo = {i: run([i])[i] for i in range(len(questions))}
    for batch in ([0, 1, 2, 3, 4, 5], [5, 3, 1], [2, 4]):
        got = run(batch)
        for i in batch:
            assert all(torch.equal(a, b) for a, b in zip(got[i], solo[i])), (batch, i)
    eng.table.check()


def test_plain_engine_still_matches_within_tolerance(tiny_model):
    """row_block=0 keeps the previous behaviour (one GEMM over the ragged batch)."""
    from skillkv.engine.paged import PagedEngine

    eng = PagedEngine(tiny_model, budget_bytes=4 << 20, attention="torch", page_size=4)
    inv = PagedEngine(tiny_model, budget_bytes=4 << 20, attention="torch", page_size=4, row_block=8)
    ids = list(range(3, 30))
    a, b = eng.start(None), inv.start(None)
    torch.testing.assert_close(eng.prefill([a], [ids]), inv.prefill([b], [ids]), rtol=1e-4, atol=1e-4)


def test_stop_strings_hold_back_and_cut():
    from skillkv.generate import StopText

    sent = []
    st = StopText(["END", "\n\n"], sent.append)
    for piece in ["Hello wor", "ld E", "N", "D and more"]:
        st.push(piece)
    st.flush()
    assert st.hit and "".join(sent) == st.text == "Hello world "
    sent2 = []
    st2 = StopText([], sent2.append)
    for piece in ["a", "b"]:
        st2.push(piece)
    assert sent2 == ["a", "b"] and not st2.hit
