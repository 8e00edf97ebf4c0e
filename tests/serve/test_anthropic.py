"""The Anthropic Messages API (serve/anthropic.py, /v1/messages): the request means the same prompt as the chat
request with the same conversation (Claude Code's shapes: system blocks, a tool_result and the skill's text block in
one user turn, thinking blocks, server tools); end to end with the official `anthropic` SDK on the tiny model:
text, tool_use (parsed and forced), tool_result answered over the prefix cache, streaming, count_tokens, stop
sequences, errors in Anthropic's shape."""

from __future__ import annotations

import json

import pytest

from protocol_server import scripted, server  # noqa: F401 - fixtures

pytest.importorskip("anthropic", reason="the anthropic SDK: a dev dependency (make install), not on the GPU machine")
from skillkv.serve.anthropic import MessagesRequest, to_chat
from skillkv.serve.protocol import ApiError, ChatRequest

CALL = '<tool_call>\n{"name": "Skill", "arguments": {"skill": "beta-codes"}}\n</tool_call>'
TOOLS = [{"name": "Skill", "description": "Load a skill.", "input_schema": {
    "type": "object", "properties": {"skill": {"type": "string", "enum": ["beta-codes", "alpha"]}},
    "required": ["skill"], "additionalProperties": False}},
         {"type": "web_search_20250305", "name": "web_search"}]  # a server tool: left out


def claude_code_turns(final: bool = True) -> dict:
    """Claude Code's shape: system blocks with cache_control, the Skill tool called, then its result and the skill's
    body as a separate text block in one user turn."""
    reminder = "<system-reminder>skills: beta-codes</system-reminder>"
    msgs = [{"role": "user", "content": [{"type": "text", "text": reminder},
                                         {"type": "text", "text": "What does code B-17 mean?"}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"},
                                              {"type": "text", "text": "Loading it."},
                                              {"type": "tool_use", "id": "toolu_01", "name": "Skill",
                                               "input": {"skill": "beta-codes"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                          "content": "Launching skill: beta-codes"},
                                         {"type": "text", "text": "Base directory for this skill: /s\n\nCode B-17 "
                                                                  "means the disk is full.", "cache_control": {
                                                                      "type": "ephemeral"}}]}]
    return {"model": "default", "max_tokens": 200, "tools": TOOLS, "metadata": {"user_id": "u"},
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "messages": msgs if final else msgs[:1],
            "system": [{"type": "text", "text": "You are Claude Code."},
                       {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]}


def test_a_messages_request_is_the_chat_request_of_the_same_conversation():
    chat = to_chat(MessagesRequest.model_validate(claude_code_turns()))
    want = ChatRequest.model_validate({"model": "default", "max_tokens": 200, "messages": [
        {"role": "system", "content": "You are Claude Code.\n\nBe brief."},
        {"role": "user", "content": "<system-reminder>skills: beta-codes</system-reminder>What does code B-17 mean?"},
        {"role": "assistant", "content": "Loading it.", "tool_calls": [
            {"id": "toolu_01", "type": "function",
             "function": {"name": "Skill", "arguments": '{"skill": "beta-codes"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "Launching skill: beta-codes"},
        {"role": "user", "content": "Base directory for this skill: /s\n\nCode B-17 means the disk is full."}],
        "tools": [{"type": "function", "function": {"name": "Skill", "description": "Load a skill.",
                                                    "parameters": TOOLS[0]["input_schema"]}}]})
    assert chat.model_dump() == want.model_dump()
    r = to_chat(MessagesRequest.model_validate({**claude_code_turns(), "tool_choice": {
        "type": "tool", "name": "Skill", "disable_parallel_tool_use": True}}))
    assert r.tool_choice == {"type": "function", "function": {"name": "Skill"}} and r.parallel_tool_calls is False
    assert to_chat(MessagesRequest.model_validate({**claude_code_turns(), "tool_choice": {"type": "any"}})) \
        .tool_choice == "required"


@pytest.mark.parametrize("change, needle", [
    (lambda b: b["messages"][2]["content"][0].update(tool_use_id="toolu_99"), "unknown tool_use id"),
    (lambda b: b["messages"][0]["content"].append({"type": "image", "source": {}}), "'image' block"),
    (lambda b: b.update(tool_choice={"type": "sometimes"}), "tool_choice type"),
    (lambda b: b.update(stop_sequences=list("abcde")), "stop_sequences"),
    (lambda b: b.update(stop_sequences=[""]), "stop"),  # refused by the chat request it maps to: still a 400
])
def test_bad_messages_requests_are_400s_naming_what(change, needle):
    body = claude_code_turns()
    change(body)
    with pytest.raises(ApiError, match=needle) as e:
        to_chat(MessagesRequest.model_validate(body))
    assert e.value.status == 400


def _client(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def test_the_anthropic_sdk_end_to_end(server, scripted):
    client = _client(server)
    scripted[0] = "Loading it." + "\n" + CALL
    first = claude_code_turns(final=False)
    r = client.messages.create(**first)
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["text", "tool_use"]
    assert r.content[0].text == "Loading it.\n" and r.content[1].name == "Skill"
    assert r.content[1].input == {"skill": "beta-codes"} and r.content[1].id.startswith("toolu_")
    count = client.messages.count_tokens(model="default", messages=first["messages"], system=first["system"],
                                         tools=TOOLS)
    assert count.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens

    scripted[0] = "Code B-17 means the disk is full."
    turn = claude_code_turns()
    r2 = client.messages.create(**turn)
    assert r2.stop_reason == "end_turn" and r2.content[0].text == scripted[0] and len(r2.content) == 1
    assert r2.usage.cache_read_input_tokens >= 16 and r2.usage.output_tokens > 0  # the first turn's pages reused

    with client.messages.stream(**turn) as stream:
        deltas = [t for t in stream.text_stream]
        final = stream.get_final_message()
    assert "".join(deltas) == r2.content[0].text and final.content[0].text == r2.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == r2.usage.output_tokens

    scripted[0] = "Sure." + CALL
    with client.messages.stream(**first) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[1].input == {"skill": "beta-codes"}
    assert final.stop_reason == "tool_use"

    scripted[0] = "The disk is full. END and more"
    r3 = client.messages.create(**{**turn, "stop_sequences": ["END"]})
    assert r3.stop_reason == "stop_sequence" and r3.stop_sequence == "END"
    assert r3.content[0].text == "The disk is full. "


def test_a_forced_tool_use_on_random_weights_matches_its_schema(server):
    r = _client(server).messages.create(**{**claude_code_turns(final=False), "max_tokens": 200,
                                           "tool_choice": {"type": "any"}})
    assert r.stop_reason == "tool_use" and r.content[-1].type == "tool_use"
    assert r.content[-1].name == "Skill" and r.content[-1].input["skill"] in ("beta-codes", "alpha")


def test_errors_in_anthropics_shape(server):
    import urllib.error
    import urllib.request

    for body, status, needle in [
        ({"model": "default", "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
        ({**claude_code_turns(), "model": "claude-opus"}, 404, "not found"),
        ({"model": "default", "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({**claude_code_turns(), "tool_choice": {"type": "tool", "name": "Nope"}}, 400, "Nope"),
    ]:
        req = urllib.request.Request(server.url + "/v1/messages", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        got = json.loads(e.value.read())
        assert e.value.code == status and got["type"] == "error" and set(got["error"]) == {"type", "message"}
        assert needle in got["error"]["message"], got
