"""The prompt mapping (skillkv/serve/render.py): agent conversations as the chat template renders them, turn N's
prompt plus its answer a token prefix of turn N+1's on three real templates, server-side injection only where it
cannot break that prefix or duplicate text, the generic tool format, and the request shapes. Tokenizers only: no
model weights are loaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent_shapes import SHAPES, SKILL, plain_conversation, request, skill_body, skill_md
from conftest import REPO
from skillkv.prompt import PromptBuilder
from skillkv.serve import tool_format
from skillkv.serve.injection import body_held, message_lines
from skillkv.serve.protocol import ApiError, ChatRequest
from skillkv.serve.render import Caps, render, template_caps

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "chat_templates"
# each family's own pre-tokenizer split (tokenizer.json), over the default model's vocabulary: token boundaries
# around the templates' newlines are the family's, not SmolLM2's
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    from skillkv.api import SkillKV

    return SkillKV(model="default", store=tmp_path_factory.mktemp("store"), skills=REPO / "skills", device="cpu")


def _family(kv, template: str, split: str, specials: dict):
    """`kv` whose tokenizer has another family's template, special tokens and pre-tokenizer split."""
    from tokenizers import Regex, pre_tokenizers

    from skillkv.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(kv.handle.path)
    tok.chat_template = (TEMPLATES / template).read_text()
    tok.add_special_tokens(specials)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=False)])
    other = copy.copy(kv)
    other.builder = PromptBuilder(tok)
    return other


def hermes(msg: dict) -> str:
    """What a model says for an assistant message in the Hermes format (the generic format is the same)."""
    calls = [f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}\n'
             f'</tool_call>' for c in msg.get("tool_calls") or []]
    return "\n".join(([msg["content"]] if msg.get("content") else []) + calls)


def llama_json(msg: dict) -> str:
    """What a Llama-3 JSON-tools model says for an assistant message: one JSON call, or its text."""
    if msg.get("tool_calls"):
        [c] = msg["tool_calls"]
        return f'{{"name": "{c["function"]["name"]}", "parameters": {c["function"]["arguments"]}}}'
    return msg["content"].strip()


@pytest.fixture(scope="module")
def families(kv):
    llama = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]}
    return {"smollm2": (kv, hermes),
            "hermes": (_family(kv, "hermes_tools.jinja", QWEN2_SPLIT, {}), hermes),
            "llama3-json": (_family(kv, "llama3_json_tools.jinja", LLAMA3_SPLIT, llama), llama_json)}


def assert_turns_extend(kv, emit, conv) -> int:
    """Every turn's prompt ids + the encoded answer are a prefix of the next turn's prompt ids; returns the turns."""
    msgs = conv["messages"]
    ids = render(kv, ChatRequest(**request(msgs, conv["tools"]))).ids
    for n, (answer, follow) in enumerate(conv["turns"]):
        msgs = msgs + [answer] + follow
        nxt = render(kv, ChatRequest(**request(msgs, conv["tools"]))).ids
        want = ids + kv.builder.encode(emit(answer))
        same = next((i for i, (a, b) in enumerate(zip(want, nxt)) if a != b), min(len(want), len(nxt)))
        assert nxt[:len(want)] == want, (f"turn {n + 1}: differs at token {same} of {len(want)}: "
                                         f"{kv.builder.tokenizer.decode(want[same - 5:same + 5])!r} vs "
                                         f"{kv.builder.tokenizer.decode(nxt[same - 5:same + 5])!r}")
        ids = nxt
    return len(conv["turns"])


# ------------------------------------------------------------------ agents: what they send, turn after turn

def test_template_capabilities_are_probed(families):
    assert template_caps(families["smollm2"][0].builder.tokenizer) == Caps(tools=False, calls=False, tool_role=True)
    assert template_caps(families["hermes"][0].builder.tokenizer) == Caps(True, True, True)
    assert template_caps(families["llama3-json"][0].builder.tokenizer) == Caps(True, True, True)


@pytest.mark.parametrize("family", ["smollm2", "hermes", "llama3-json"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_turn_extends_the_last_exactly(families, family, shape):
    kv, emit = families[family]
    conv = SHAPES[shape](kv)
    assert assert_turns_extend(kv, emit, conv) >= 5
    full = conv["messages"] + [m for a, follow in conv["turns"] for m in [a] + follow]
    r = render(kv, ChatRequest(**request(full, conv["tools"])))
    assert r.skills == [] and "declares tools" in r.injection
    text = kv.builder.tokenizer.decode(r.ids)
    body_line = "Review correctness first, then safety, then performance."
    assert text.count(body_line) == 1  # the body where the agent put it, once
    assert "web_search" not in text  # codex declares it too: not a function tool, accepted and left out
    for t in conv["tools"]:
        if t["type"] == "function":
            assert t["function"]["name"] in text


def test_the_generic_format_on_the_default_template(families):
    kv, _ = families["smollm2"]
    conv = SHAPES["gemini-cli"](kv)
    msgs = conv["messages"] + [conv["turns"][0][0]] + conv["turns"][0][1]
    text = kv.builder.tokenizer.decode(render(kv, ChatRequest(**request(msgs, conv["tools"]))).ids)
    section = tool_format.tools_section(tool_format.function_tools(ChatRequest(**request(msgs, conv["tools"])).tools))
    system = msgs[0]["content"]
    assert text.startswith(f"<|im_start|>system\n{system}\n\n# Tools\n\n") and section in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "activate_skill", "arguments": {"name": "sql-review"}}\n' \
           '</tool_call><|im_end|>\n<|im_start|>tool\n<activated_skill' in text
    assert text.endswith("<|im_start|>assistant\n")
    # no system message: the tools are one of their own at the front (the template's default system prompt goes)
    text = kv.builder.tokenizer.decode(render(kv, ChatRequest(**request(msgs[1:], conv["tools"]))).ids)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call") and "SmolLM" not in text


def test_the_generic_format_is_the_hermes_format(families):
    """The tools section and the calls the generic format writes are what a Hermes-format template writes."""
    kv, _ = families["hermes"]
    conv = SHAPES["gemini-cli"](kv)
    answer, follow = conv["turns"][1]
    body = ChatRequest(**request(conv["messages"] + [answer] + follow, conv["tools"]))
    text = kv.builder.tokenizer.decode(render(kv, body).ids)
    tools = tool_format.function_tools(body.tools)
    assert tool_format.with_tools(conv["messages"][0]["content"], tools) + "<|im_end|>" in text
    call = body.messages[2]
    assert "<|im_start|>assistant\n" + tool_format.assistant_text(call.text, call.tool_calls) + "<|im_end|>" in text


def test_a_template_without_a_tool_role_gets_tool_responses_as_user_messages(kv):
    from skillkv.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(kv.handle.path)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}"
                         "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    other = copy.copy(kv)
    other.builder = PromptBuilder(tok)
    assert template_caps(tok) == Caps(False, False, False)
    conv = SHAPES["opencode"](other)
    assert assert_turns_extend(other, hermes, conv) >= 5
    msgs = conv["messages"] + [conv["turns"][0][0]] + conv["turns"][0][1]
    text = tok.decode(render(other, ChatRequest(**request(msgs, conv["tools"]))).ids)
    assert "<|im_start|>user\n<tool_response>\n## Skill: sql-review" in text and "\n</tool_response><|im_end|>" in text


def test_a_conversation_the_template_refuses_is_rendered_in_the_generic_format(families):
    kv, _ = families["llama3-json"]
    conv = SHAPES["opencode"](kv)
    two = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "read", "arguments": '{"filePath": "a.sql"}'}},
        {"id": "b", "type": "function", "function": {"name": "read", "arguments": "not json"}}]}
    msgs = conv["messages"] + [two, {"role": "tool", "tool_call_id": "a", "content": "SELECT 1;"},
                               {"role": "tool", "tool_call_id": "b", "content": "SELECT 2;"}]
    text = kv.builder.tokenizer.decode(render(kv, ChatRequest(**request(msgs, conv["tools"]))).ids)
    assert '<tool_call>\n{"name": "read", "arguments": {"filePath": "a.sql"}}\n</tool_call>\n<tool_call>\n' \
           '{"name": "read", "arguments": "not json"}\n</tool_call>' in text and "SELECT 2;" in text


# ------------------------------------------------------------------ server-side injection

def test_plain_client_gets_skills_chosen_once_from_the_first_user_message(kv):
    conv = plain_conversation()
    msgs = conv["messages"]
    for answer, follow in conv["turns"]:
        r = render(kv, ChatRequest(**request(msgs, None)))
        assert [s.name for s in r.skills] == [SKILL] and r.injection == "chosen from the first user message"
        assert r.select_on == conv["messages"][0]["content"]
        msgs = msgs + [answer] + follow
    assert "git" in conv["turns"][-2][1][0]["content"]  # a later question that would choose another skill alone
    assert assert_turns_extend(kv, lambda m: m["content"], conv) >= 5


def test_single_user_message_is_the_ask_prompt(kv):
    q = "Review this SQL query for injection risks: SELECT * FROM users WHERE id = $1"
    r = render(kv, ChatRequest(**request([{"role": "user", "content": q}], None)))
    assert [s.name for s in r.skills] == [SKILL] and r.ids == kv.builder.question_ids(q) and r.select_on == q
    r = render(kv, ChatRequest(**request([{"role": "system", "content": "Answer in French."},
                                          {"role": "user", "content": "first"},
                                          {"role": "assistant", "content": "premier"},
                                          {"role": "user", "content": [{"type": "text", "text": "second"}]}],
                                         None, skills=[SKILL])))
    text = kv.builder.tokenizer.decode(r.ids)
    assert r.injection == "named by the request" and r.select_on == "first"
    assert text.startswith("Answer in French.") and text.index("first") < text.index("premier") < text.index("second")
    assert text.endswith(kv.builder.tail)


def test_no_injection_for_a_client_that_lists_the_catalog(kv):
    desc = kv.pick([SKILL])[0].description
    q = "Review this SQL query for injection risks: SELECT * FROM users WHERE id = $1"
    for system in (f"You can use these skills:\n- {SKILL}: {desc[:60]}... (file: ~/.skills/{SKILL}/SKILL.md)",
                   "<available_skills>\n<skill><name>other</name></skill>\n</available_skills>"):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        r = render(kv, ChatRequest(**request(msgs, None)))
        assert r.skills == [] and r.injection == "none: the client's instructions list the skill catalog"
        # the head only: a later message naming a skill does not flip it for a plain client
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": f"{SKILL}: {desc}"}]
    assert [s.name for s in render(kv, ChatRequest(**request(msgs, None))).skills] == [SKILL]
    r = render(kv, ChatRequest(**request([{"role": "user", "content": q}], None, skills=[])))
    assert r.skills == [] and r.injection == "none: the request asks for none"
    assert r.ids == kv.builder.encode(kv.builder.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False))  # the whole prompt


def test_named_skills_with_tools_render_the_tools_after_the_skills(kv):
    conv = SHAPES["gemini-cli"](kv)
    r = render(kv, ChatRequest(**request(conv["messages"], conv["tools"], skills=[SKILL])))
    text = kv.builder.tokenizer.decode(r.ids)
    assert [s.name for s in r.skills] == [SKILL] and text.startswith(conv["messages"][0]["content"] + "\n\n# Tools")
    with pytest.raises(ApiError) as e:
        render(kv, ChatRequest(**request(conv["messages"], None, skills=["no-such-skill"])))
    assert e.value.code == "skill_not_found"


def test_a_body_already_in_the_messages_is_not_injected_twice(kv):
    q = "Review this SQL query for injection risks: SELECT * FROM users WHERE id = $1"
    body = skill_body(kv)
    pasted = f"<skill>\n<name>{SKILL}</name>\n<path>/p/{SKILL}/SKILL.md</path>\n{body}\n</skill>"
    msgs = [{"role": "user", "content": q}, {"role": "user", "content": pasted}]
    r = render(kv, ChatRequest(**request(msgs, None)))
    assert r.skills == [] and r.injection == f"chosen from the first user message; already in the messages: {SKILL}"
    assert r.ids == render(kv, ChatRequest(**request(msgs, None, skills=[]))).ids  # the client's prompt as is
    twice = render(kv, ChatRequest(**request(msgs, None, skills=[SKILL])))  # what injecting it again would send
    prefix = len(kv.builder.preamble_ids()) + len(kv.builder.skill_ids(twice.skills[0]))
    assert prefix + len(twice.ids) >= len(r.ids) + len(kv.builder.encode(body))
    assert kv.builder.tokenizer.decode(r.ids).count(body.strip().splitlines()[-1]) == 1


def test_a_body_is_recognised_numbered_or_json_escaped(kv):
    skill = kv.pick([SKILL])[0]
    numbered = "\n".join(f"{i:6d}\t{ln}" for i, ln in enumerate(skill_md().splitlines(), 1))
    arrows = "\n".join(f"{i:>5}→{ln}" for i, ln in enumerate(skill.body.splitlines(), 1))
    escaped = json.dumps({"output": skill.body})
    for text in (numbered, arrows, escaped, skill_md()):
        assert body_held(skill, message_lines([text]))
    half = "\n".join(skill.body.splitlines()[: len(skill.body.splitlines()) // 2])
    assert not body_held(skill, message_lines([half, "unrelated"]))


# ------------------------------------------------------------------ errors and request shapes

def test_errors(kv):
    with pytest.raises(ApiError) as e:
        render(kv, ChatRequest(**request([{"role": "system", "content": "only a system message"}], None)))
    assert e.value.code == "no_user_message"
    # every tool_choice is accepted here; what a forced call cannot honour (no tools, an undeclared name) is refused
    # where its grammar is built (serve/constraints.py; tests/serve/test_serve.py's error shapes)
    for choice in ("auto", "none", "required", {"type": "function", "function": {"name": "read"}}):
        ChatRequest(**request([{"role": "user", "content": "hi"}], None), tool_choice=choice).check()
    bad = [{"tool_choice": "sometimes"}, {"tool_choice": {"type": "function"}},
           {"messages": [{"role": "tool", "content": "x"}]},
           {"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "tool_calls": [
               {"id": "a", "function": {"name": "f", "arguments": "{}"}}]}]},
           {"tools": [{"type": "function"}]}]
    for extra in bad:
        with pytest.raises(ValidationError):
            ChatRequest(**{**request([{"role": "user", "content": "hi"}], None), **extra})


def test_agent_request_shapes_round_trip(kv):
    conv = SHAPES["codex"](kv)
    msgs = conv["messages"] + [m for a, follow in conv["turns"] for m in [a] + follow]
    sent = request(msgs, conv["tools"], tool_choice="auto", parallel_tool_calls=True)
    back = ChatRequest.model_validate(json.loads(json.dumps(sent))).model_dump(exclude_none=True)
    strip = [{k: v for k, v in m.items() if v is not None} for m in sent["messages"]]
    assert back["messages"] == strip and back["tools"] == sent["tools"]
    assert back["tool_choice"] == "auto" and back["parallel_tool_calls"] is True
    assert tool_format.function_tools(ChatRequest(**sent).tools) == [t for t in sent["tools"]
                                                                     if t["type"] == "function"]


@pytest.mark.parametrize("family, fmt", [("smollm2", "hermes"), ("hermes", "hermes"), ("llama3-json", "llama3_json")])
def test_each_template_familys_calls_are_read_back_in_its_own_format(families, family, fmt):
    """The format probed from the template (serve/tool_calls.call_format) parses what a model of that family says
    for a call (the answer the template renders back into the next prompt), into the same call."""
    from skillkv.serve.tool_calls import CallStream, call_format

    kv, say = families[family]
    assert call_format(kv.builder.tokenizer) == fmt
    msg = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "read_file", "arguments": json.dumps({"path": "skills/pdf/SKILL.md", "lines": [1, 40]})}}]}
    s = CallStream(fmt, {"read_file"})
    s.push(say(msg))
    s.finish()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in s.calls] == \
        [("read_file", {"path": "skills/pdf/SKILL.md", "lines": [1, 40]})] and s.text == "" and s.invalid == 0
