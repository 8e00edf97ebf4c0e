"""Compiled skills found in any prompt (select/spans.py): in every client's wrapping the skill's body is one span of
the rendered prompt, whatever the tokens at its edges; the catalog (names and descriptions) never reads as a skill;
spans of two skills, an edited middle, hash collisions and short texts on synthetic ids."""

from __future__ import annotations

import random

import pytest

from agent_shapes import SHAPES, SKILL, request
from conftest import REPO
from skillkv.select.spans import BLOCK, Span, SpanIndex
from skillkv.serve.protocol import ChatRequest
from skillkv.serve.render import render


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    from skillkv.api import SkillKV

    return SkillKV(model="default", store=tmp_path_factory.mktemp("store"), skills=REPO / "skills", device="cpu")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_skill_an_agent_loaded_is_found_where_it_put_it(kv, shape):
    conv = SHAPES[shape](kv)
    index = SpanIndex.of(kv.load_skills().skills, kv.builder.tokenizer)
    first = render(kv, ChatRequest(**request(conv["messages"], conv["tools"]))).ids
    brought = conv["messages"] + ([conv["turns"][0][0]] + conv["turns"][0][1] if shape != "skill-message" else [])
    ids = render(kv, ChatRequest(**request(brought, conv["tools"]))).ids
    spans = index.find(ids)
    if shape == "skill-message":  # the body is in the first request already: the same without it
        first = render(kv, ChatRequest(**request(conv["messages"][:1] + conv["messages"][2:], conv["tools"]))).ids
    assert index.find(first) == []  # the catalog's names and descriptions are not the skill
    if shape == "deepagents":  # `cat -n`: a line number before every line; no stretch long enough to report
        assert {s.skill for s in spans} <= {SKILL} and sum(s.coverage for s in spans) < 0.5
        return
    assert spans and {s.skill for s in spans} == {SKILL}
    longest = max(spans, key=lambda s: s.end - s.start)
    assert len(spans) == 1 and longest.coverage >= 0.9, spans
    assert longest.form == ("file" if shape in ("codex", "skill-message") else "body")
    assert ids[longest.start:longest.end] == index.forms[(SKILL, longest.form)][longest.at:longest.at +
                                                                                  longest.end - longest.start].tolist()


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 5000) for _ in range(n)]


def test_spans_on_synthetic_ids():
    a, b = _ids(1, 300), _ids(2, 100)
    index = SpanIndex({("a", "body"): a, ("b", "body"): b, ("tiny", "body"): _ids(3, BLOCK - 1)})
    assert ("tiny", "body") not in index.forms  # shorter than a block: never a span
    prompt = _ids(4, 37) + [9999] + a[2:-3] + [9998] + _ids(5, 50) + b + _ids(6, 5)
    assert index.find(prompt) == [Span("a", "body", 38, 38 + 295, 2, 300), Span("b", "body", 384, 484, 0, 100)]
    edited = a[:150] + [9997] + a[151:]  # one token changed mid-way: the two stretches around it
    spans = index.find(_ids(7, 10) + edited)
    assert [(s.start, s.end, s.at) for s in spans] == [(10, 160, 0), (161, 310, 151)]
    assert index.find(a[:BLOCK - 1]) == [] and index.find([]) == []


def test_a_hash_collision_costs_a_comparison_never_a_span(monkeypatch):
    import skillkv.select.spans as spans

    index = SpanIndex({("a", "body"): _ids(1, 64)})
    monkeypatch.setattr(spans, "window_hashes", lambda ids: spans.np.full(max(0, len(ids) - BLOCK + 1),
                                                                             next(iter(index.blocks)),
                                                                             dtype=spans.np.uint64))
    assert index.find(_ids(9, 200)) == []


def test_overlapping_forms_keep_the_longer_span():
    body = _ids(1, 200)
    file = _ids(2, 40) + body
    index = SpanIndex({("s", "file"): file, ("s", "body"): body}, heads={("s", "file"): 40})
    [span] = index.find(_ids(3, 5) + file + _ids(4, 5))
    assert (span.form, span.start, span.end) == ("file", 5, 245)
    [span] = index.find(_ids(3, 5) + body)
    assert (span.form, span.start, span.end) == ("body", 5, 205)
    [span] = index.find(_ids(3, 5) + file[39:])  # the token before the body is the wrapping's: still the body
    assert (span.form, span.start, span.end) == ("body", 6, 206)
    assert index.find(file[:40] + _ids(5, 40)) == []  # the frontmatter alone (a catalog's description): nothing


def test_window_hashes_are_those_of_each_window_alone():
    from skillkv.select.spans import window_hashes

    ids = _ids(11, 3 * BLOCK + 5)
    whole = window_hashes(ids).tolist()
    assert len(whole) == len(ids) - BLOCK + 1
    assert whole == [window_hashes(ids[p:p + BLOCK]).tolist()[0] for p in range(len(whole))]
    assert len(set(whole)) == len(whole) and window_hashes(ids[:BLOCK - 1]).size == 0
