"""From a chat request to prompt token ids: the prompt mapping of `skillkv serve`.

The prompt is the client's conversation as the model's chat template renders it: messages in order (`developer`
read as `system`), nothing reordered, `tools` handed to the template, assistant `tool_calls` (arguments parsed from
their JSON string) and `tool` messages rendered by it, ending with the generation prompt. What the template cannot
render is written in the generic tool format (serve/tool_format.py), found per template by probing it once
(`template_caps`): tools absent from a rendering of a probe tool -> the tools section in the system message; tool
calls absent -> `<tool_call>` blocks in the assistant's content; a probe tool message absent or refused -> a user
message holding `<tool_response>`. A conversation the template refuses (e.g. Llama 3.1 and two parallel calls) is
rendered with all three in the generic format, and without a usable template as ChatML.

So the prompt of turn N, followed by the tokens of the model's answer as the template renders it, is a token prefix
of the prompt of turn N+1 (the client resends the same history plus new messages): a prefix cache reuses all of it,
for any template that renders earlier messages independently of later ones (tests/serve/test_render.py checks the
default model's and two templates with tools of their own: Hermes and Llama-3 JSON formats).

Skills chosen for injection (serve/injection.py says when) form the prefix `[preamble][skill 1]..[skill k]` of
skillkv.prompt, exactly as `skillkv ask` builds it; the conversation then continues that system block: the text of
every system / developer message (joined by a blank line; the generic tools section after it) comes right after the
skills, then the other messages. That segment is the template's rendering with a marker as the system content,
from after the marker, tokenized on its own; one user message and no system message therefore gives exactly
`PromptBuilder.question_ids(question)`, the prompt of `skillkv ask`.

`render` refuses (ApiError 400) messages that cannot fit the context before tokenizing them (serve/messages.py), a
conversation without a non-empty user message (`no_user_message`; the last message may be an assistant or tool
message, as agents send tool results last), non-text content parts, and unknown named skills.
"""

from __future__ import annotations

from dataclasses import dataclass

from skillkv.serve.injection import choose
from skillkv.serve.messages import check_length
from skillkv.serve.protocol import ApiError, ChatRequest, Message
from skillkv.serve.tool_format import arguments, assistant_text, function_tools, tool_response, tools_section, \
    with_tools
from skillkv.skills import Skill

_MARK = "\x00SKILLKV_SYSTEM\x00"
_PROBE, _PROBE_RESULT = "skillkv_probe_function", "skillkv probe result"


@dataclass
class Rendered:
    """One request's prompt: `skills` injected before the conversation (their compiled chain [preamble][skill..] is
    the prompt's prefix; [] = none), `ids` the prompt's token ids after that prefix (the whole prompt when nothing is
    injected), `select_on` the text skills are chosen from, `injection` why skills were or were not injected."""

    skills: list[Skill]
    ids: list[int]
    select_on: str
    injection: str


@dataclass(frozen=True)
class Caps:
    """What a chat template renders itself."""

    tools: bool  # the `tools` variable
    calls: bool  # an assistant message's `tool_calls`
    tool_role: bool  # a message of role `tool`


GENERIC = Caps(False, False, False)
_CAPS: dict[tuple[int, str], Caps] = {}


def _apply(tok, msgs: list[dict], tools: list[dict] | None) -> str | None:
    """The template's text, or None where there is no template or it refuses the messages."""
    if not getattr(tok, "chat_template", None):
        return None
    try:
        text = tok.apply_chat_template(msgs, tools=tools or None, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise arbitrary errors for what they do not support
        return None
    return text if isinstance(text, str) else None


def template_caps(tok) -> Caps:
    """Probe the tokenizer's chat template once: render a probe tool, a call of it and its result, and see which
    of them appear."""
    key = (id(tok), str(getattr(tok, "chat_template", None)))
    if key not in _CAPS:
        fn = {"type": "function", "function": {"name": _PROBE, "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}
        user = {"role": "user", "content": "A probe question."}
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_probe", "type": "function", "function": {"name": _PROBE, "arguments": {}}}]}
        text = _apply(tok, [user], [fn])
        tools = text is not None and _PROBE in text
        text = _apply(tok, [user, call], [fn]) if tools else None
        calls = text is not None and text.count(_PROBE) >= 2
        result = {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "call_probe", "name": _PROBE}
        prev = call if calls else {"role": "assistant", "content": "A probe answer."}
        text = _apply(tok, [user, prev, result], [fn] if tools else None)
        _CAPS[key] = Caps(tools, calls, text is not None and _PROBE_RESULT in text)
    return _CAPS[key]


def _turns(messages: list[Message], caps: Caps) -> list[dict]:
    """The messages as template dicts, what `caps` lacks written in the generic format."""
    called = {c.id: c.function.name for m in messages for c in m.tool_calls or []}
    out = []
    for m in messages:
        text = m.text
        if m.role in ("system", "developer"):
            out.append({"role": "system", "content": text})
        elif m.role == "assistant" and m.tool_calls and caps.calls:
            out.append({"role": "assistant", "content": text, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments(c)}}
                for c in m.tool_calls]})
        elif m.role == "assistant" and m.tool_calls:
            out.append({"role": "assistant", "content": assistant_text(text, m.tool_calls)})
        elif m.role == "tool" and caps.tool_role:
            out.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id,
                        "name": m.name or called.get(m.tool_call_id)})
        elif m.role == "tool":
            out.append({"role": "user", "content": tool_response(text)})
        else:
            out.append({"role": m.role, "content": text})
    return out


def _conversation(messages: list[Message], caps: Caps, tools: list[dict], marked: bool) -> list[dict]:
    """Template dicts of the whole conversation. `marked`: every system text joined into one leading system message
    that starts with the marker (the injected layout)."""
    turns = _turns(messages, caps)
    generic = bool(tools) and not caps.tools
    if marked:
        system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
        system = with_tools(system, tools) if generic else system
        return [{"role": "system", "content": _MARK + system}] + [t for t in turns if t["role"] != "system"]
    if generic and turns and turns[0]["role"] == "system":
        turns[0] = {**turns[0], "content": with_tools(turns[0]["content"], tools)}
    elif generic:
        turns.insert(0, {"role": "system", "content": tools_section(tools)})
    return turns


def _chatml(msgs: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"


def chat_text(tok, messages: list[Message], tools: list[dict], marked: bool = False) -> str:
    """The conversation's text (module docstring): the template with what it renders itself, else the template
    with everything tool-related in the generic format, else ChatML. `marked`: the injected layout's text from
    after the marker."""
    for caps in dict.fromkeys((template_caps(tok), GENERIC)):
        text = _apply(tok, _conversation(messages, caps, tools, marked), tools if caps.tools else None)
        if text is not None and (not marked or text.count(_MARK) == 1):
            return text.split(_MARK, 1)[1] if marked else text
    text = _chatml(_conversation(messages, GENERIC, tools, marked))
    return text.split(_MARK, 1)[1] if marked else text


def render(kv, body: ChatRequest) -> Rendered:
    """The prompt of `body` for `kv` (a skillkv.api.SkillKV: its builder, skills, select, pick, max_context)."""
    check_length(kv.builder, body, kv.handle.max_context)
    select_on = next((t for t in (m.text for m in body.messages if m.role == "user") if t.strip()), None)
    if select_on is None:
        raise ApiError(400, "messages need a non-empty user message", param="messages", code="no_user_message")
    skills, why = choose(kv, body, select_on)
    text = chat_text(kv.builder.tokenizer, body.messages, function_tools(body.tools), marked=bool(skills))
    return Rendered(skills, kv.builder.encode(text), select_on, why)
