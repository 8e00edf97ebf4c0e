"""Tool calls read back out of the answer (serve/tool_calls.py): the same calls and content however the answer's
text is cut into streamed pieces; what is not a call stays content, as written, and is counted; and end to end
through the server on a scripted answer: `message.tool_calls`, `finish_reason: "tool_calls"`, OpenAI's streamed
deltas (read by the official `openai` client), `tool_choice: "none"` and `parallel_tool_calls: false` honoured."""

from __future__ import annotations

import json

import pytest

from protocol_server import logged, scripted, server  # noqa: F401 - fixtures
from skillkv.serve.tool_calls import CallStream

CALL = '<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "grep", "arguments": {"pattern": "B-17", "n": 3}}\n</tool_call>'
NAMES = {"read_file", "grep"}


def run(text: str, cuts: list[int], fmt: str = "hermes", names=NAMES, parallel: bool = True):
    s = CallStream(fmt, names, parallel)
    events, prev = [], 0
    for c in cuts + [len(text)]:
        events += s.push(text[prev:c])
        prev = c
    events += s.finish()
    text_out = "".join(v for k, v in events if k == "text")
    assert text_out == s.text  # what streamed is the content
    def as_tuple(c):
        return c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])

    calls = [as_tuple(c) for k, c in events if k == "call"]
    assert calls == [as_tuple(c) for c in s.calls]
    return s.text, calls, s.invalid


def every_cut(text: str, **kw):
    """The result of one piece, checked equal for every single cut and for one-character pieces."""
    whole = run(text, [], **kw)
    for i in range(1, len(text)):
        assert run(text, [i], **kw) == whole, i
    assert run(text, list(range(1, len(text))), **kw) == whole
    return whole


@pytest.mark.parametrize("text, content, calls, invalid", [
    ("Let me look.\n" + CALL, "Let me look.\n", [(0, "read_file", {"path": "a.txt"})], 0),
    (CALL + "\n" + CALL2 + "\n", "", [(0, "read_file", {"path": "a.txt"}), (1, "grep", {"pattern": "B-17", "n": 3})],
     0),
    ("No call here, just a < sign and <tool but no tag.", "No call here, just a < sign and <tool but no tag.", [], 0),
    ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not a declared tool
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', [], 1),
    ("<tool_call>\n{not json}\n</tool_call> then text", "<tool_call>\n{not json}\n</tool_call> then text", [], 1),
    ('<tool_call>\n{"name": "grep", "arguments": "B-17"}\n</tool_call>',  # arguments not an object
     '<tool_call>\n{"name": "grep", "arguments": "B-17"}\n</tool_call>', [], 1),
    ('<tool_call>{"name": "grep", "arguments": "{\\"n\\": 2}"}</tool_call>', "", [(0, "grep", {"n": 2})], 0),
    ('<tool_call>{"name": "grep", "arguments": {"p": "a</tool_call>b"}}</tool_call>x', "x",  # the tag in a string
     [(0, "grep", {"p": "a</tool_call>b"})], 0),
    ('Sure. <tool_call>\n{"name": "grep", "argu', 'Sure. <tool_call>\n{"name": "grep", "argu', [], 1),  # cut off
    ("Café ✓ " + CALL + " and after", "Café ✓  and after", [(0, "read_file", {"path": "a.txt"})], 0),
])
def test_hermes_calls_and_content_whatever_the_pieces(text, content, calls, invalid):
    assert every_cut(text) == (content, calls, invalid)


def test_parallel_false_keeps_the_first_call_only_and_any_name_without_declared_tools():
    content, calls, invalid = every_cut(CALL + "\n" + CALL2, parallel=False)
    assert [c[1] for c in calls] == ["read_file"] and content == CALL2 and invalid == 1
    assert every_cut('<tool_call>{"name": "anything", "parameters": {"a": 1}}</tool_call>', names=None)[1] == \
        [(0, "anything", {"a": 1})]


@pytest.mark.parametrize("text, content, calls", [
    ('{"name": "grep", "parameters": {"pattern": "x"}}', "", [(0, "grep", {"pattern": "x"})]),
    ('  <|python_tag|>{"name": "read_file", "arguments": {"path": "b"}}', "", [(0, "read_file", {"path": "b"})]),
    ("The port is 7311.", "The port is 7311.", []),
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON that is not a call stays content
    ("<b>bold</b>", "<b>bold</b>", []),
])
def test_llama3_json_the_whole_answer_is_one_call_or_content(text, content, calls):
    got = every_cut(text, fmt="llama3_json")
    assert got[:2] == (content, calls) and got[2] == (1 if text.startswith("{") and not calls else 0)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        CallStream("pythonic")


# ---------------------------------------------------------------------- end to end through the server

TOOLS = [{"type": "function", "function": {"name": n, "description": f"The {n} tool.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}}}} for n in sorted(NAMES)]


def _post(server, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _body(**extra) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": "Read a.txt and grep B-17."}],
            "tools": TOOLS, "max_tokens": 200, **extra}


def test_the_answers_calls_come_back_as_tool_calls(server, scripted):
    scripted[0] = "Let me look.\n" + CALL + "\n" + CALL2
    r, entry = logged(server, lambda: _post(server, _body()))
    msg, choice = r["choices"][0]["message"], r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and msg["content"] == "Let me look.\n"
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] \
        == [("function", "read_file", {"path": "a.txt"}), ("function", "grep", {"pattern": "B-17", "n": 3})]
    ids = [c["id"] for c in msg["tool_calls"]]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert r["skillkv"]["tool_calls"] == {"format": "hermes", "parsed": 2, "invalid": 0}
    assert entry["tool_calls"] == 2 and entry["invalid_tool_calls"] == 0

    r = _post(server, _body(parallel_tool_calls=False))
    msg = r["choices"][0]["message"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["read_file"] and msg["content"].endswith(CALL2)

    for extra in ({"tool_choice": "none"}, {"tools": None}):  # no tools in play: the text is the answer, as written
        r = _post(server, _body(**extra))
        assert r["choices"][0]["message"]["content"] == scripted[0] and "tool_calls" not in r["choices"][0]["message"]
        assert r["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in r["skillkv"]

    scripted[0] = CALL  # the call alone: content null
    r = _post(server, _body())
    assert r["choices"][0]["message"]["content"] is None and r["choices"][0]["finish_reason"] == "tool_calls"

    scripted[0] = '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>'
    r, entry = logged(server, lambda: _post(server, _body()))
    assert r["choices"][0]["message"]["content"] == scripted[0] and r["choices"][0]["finish_reason"] == "stop"
    assert r["skillkv"]["tool_calls"]["invalid"] == 1 and entry["invalid_tool_calls"] == 1


def test_streamed_calls_as_openai_streams_them_read_by_the_openai_client(server, scripted):
    OpenAI = pytest.importorskip("openai", reason="a dev dependency (make install), not on the GPU machine").OpenAI

    scripted[0] = "Checking.\n" + CALL + "\n" + CALL2
    whole = _post(server, _body())["choices"][0]["message"]
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    body = _body()
    stream = client.chat.completions.create(model="default", messages=body["messages"], tools=TOOLS, max_tokens=200,
                                            stream=True)
    content, calls, finish = [], {}, []
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content.append(d.content or "")
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += tc.id or ""
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish += [ch.choices[0].finish_reason] if ch.choices[0].finish_reason else []
    assert "".join(content) == whole["content"] == "Checking.\n" and finish == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]]
    assert all(c["id"].startswith("call_") for c in calls.values())


# ---------------------------------------------------------------------- constrained answers (sched/grammar.py)

BOUNDED = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                            "size": {"enum": [1, 2, 3]}},
           "required": ["color", "ok", "size"], "additionalProperties": False}
PICK = [{"type": "function", "function": {"name": n, "parameters": BOUNDED}} for n in ("paint", "resize")]


def _valid(obj: dict) -> bool:
    return set(obj) == {"color", "ok", "size"} and obj["color"] in ("red", "green", "blue") and \
        isinstance(obj["ok"], bool) and obj["size"] in (1, 2, 3)


@pytest.mark.parametrize("choice, names", [("required", {"paint", "resize"}),
                                           ({"type": "function", "function": {"name": "resize"}}, {"resize"})])
def test_a_forced_call_of_a_random_model_parses_and_matches_its_schema(server, choice, names):
    """Random weights write whatever scores highest; the grammar lets through only a call of a declared (or the
    named) function whose arguments match its schema, then the stop token."""
    for q in ("Paint it.", "Make it bigger, please.", "x"):
        for stream in (False, True):
            body = {"model": "default", "messages": [{"role": "user", "content": q}], "tools": PICK,
                    "tool_choice": choice, "max_tokens": 200, "temperature": 0.7, "seed": 3}
            if stream:
                OpenAI = pytest.importorskip("openai").OpenAI

                client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
                body.pop("model")
                parts = list(client.chat.completions.create(model="default", stream=True, **body))
                deltas = [tc for p in parts if p.choices for tc in p.choices[0].delta.tool_calls or []]
                calls = [{"function": {"name": deltas[0].function.name,
                                       "arguments": "".join(d.function.arguments or "" for d in deltas)}}]
                finish = [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason]
                assert finish == ["tool_calls"]
            else:
                r = _post(server, body)
                assert r["choices"][0]["finish_reason"] == "tool_calls", r["choices"][0]
                calls = r["choices"][0]["message"]["tool_calls"]
                assert r["skillkv"]["tool_calls"] == {"format": "hermes", "parsed": 1, "invalid": 0}
            assert len(calls) == 1 and calls[0]["function"]["name"] in names
            assert _valid(json.loads(calls[0]["function"]["arguments"]))


def test_response_format_json_schema_gives_an_instance(server):
    for seed in range(3):
        r = _post(server, {"model": "default", "messages": [{"role": "user", "content": "Describe it."}],
                           "response_format": {"type": "json_schema", "json_schema": {"name": "thing",
                                                                                      "schema": BOUNDED}},
                           "max_tokens": 200, "temperature": 1.0, "seed": seed})
        assert r["choices"][0]["finish_reason"] == "stop" and _valid(json.loads(r["choices"][0]["message"]["content"]))


def test_health_and_stats_count_calls_and_constrained_answers(server, scripted):
    import urllib.request

    def counts():
        with urllib.request.urlopen(server.url + "/stats", timeout=60) as r:
            st = json.loads(r.read())["server"]
        with urllib.request.urlopen(server.url + "/health", timeout=60) as r:
            assert json.loads(r.read())["protocol"] == st
        return st

    before = counts()
    scripted[0] = CALL + "\n" + '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    _post(server, _body())
    scripted[0] = '{"color": "red", "ok": true, "size": 2}'
    r, entry = logged(server, lambda: _post(server, {
        "model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 50,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": BOUNDED}}}))
    assert r["skillkv"]["constrained"] == "response_format" and entry["constrained"] == "response_format"
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {"tool_calls": 1, "invalid_tool_calls": 1,
                                                        "constrained_tool_choice": 0, "constrained_response_format": 1}


def test_an_unconstrained_request_is_untouched_by_the_grammars(server):
    """Same answer before and after constrained requests ran (no state leaks between requests)."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 12}
    before = _post(server, body)["skillkv"]["output_token_ids"]
    _post(server, {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": BOUNDED}},
                   "max_tokens": 200})
    assert _post(server, body)["skillkv"]["output_token_ids"] == before


def test_the_openai_clients_structured_output_parses(server):
    """`client.chat.completions.parse` with a pydantic model: the SDK sends a strict json_schema response_format and
    parses the answer into the model."""
    from typing import Literal

    OpenAI = pytest.importorskip("openai", reason="a dev dependency (make install), not on the GPU machine").OpenAI
    from pydantic import BaseModel

    class Thing(BaseModel):
        color: Literal["red", "green", "blue"]
        ok: bool

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.parse(model="default", messages=[{"role": "user", "content": "Describe it."}],
                                      response_format=Thing, max_tokens=200)
    assert isinstance(r.choices[0].message.parsed, Thing) and r.choices[0].finish_reason == "stop"


def test_numbers_under_a_grammar_are_bounded():
    """A number's digits are bounded (16 per part) so a model cannot write digits forever; JSON numbers a double
    holds still pass, and nothing else changes (a string of digits stays unbounded)."""
    import xgrammar as xgr

    from skillkv.serve.constraints import bounded_numbers

    grammar = bounded_numbers(xgr.Grammar.from_json_schema(json.dumps({
        "type": "object", "properties": {"x": {"type": "number"}, "s": {"type": "string", "pattern": "^[0-9]*$"},
                                         "n": {"type": "integer", "minimum": 0}}, "required": ["x", "s", "n"]}),
        any_whitespace=False))
    info = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["<end>"], stop_token_ids=[95])
    matcher_of = lambda: xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(grammar))  # noqa: E731

    def accepts(text: str) -> bool:
        m = matcher_of()
        return all(m.accept_token(ord(ch) - 32) for ch in text) and m.accept_token(95)

    assert accepts('{"x": -12.5e3, "s": "' + "9" * 40 + '", "n": 7}')  # a pattern's digits stay unbounded
    assert accepts('{"x": 0.' + "1" * 16 + ', "s": "", "n": ' + "9" * 16 + '}')
    assert not accepts('{"x": 0.' + "0" * 17 + ', "s": "", "n": 1}')
    assert not accepts('{"x": ' + "1" * 17 + ', "s": "", "n": 1}')
    assert not accepts('{"x": 1, "s": "", "n": ' + "1" * 17 + '}')
