"""The Anthropic Messages API over the same request mapping and loop as chat completions: `POST /v1/messages` (and
`/v1/messages/count_tokens`) bodies become a `ChatRequest` (`to_chat`), and the worker's events become Anthropic's
message and stream events (`message`, `Events`).

Request (Anthropic's shapes; unknown fields such as `metadata`, `thinking`, `context_management` and `cache_control`
accepted and ignored: skillkv caches every prefix anyway):
  system          text, or text blocks (joined by a blank line) -> one system message
  messages        user / assistant turns whose content is text or blocks:
                    text                          -> the turn's text
                    tool_use {id, name, input}    -> an assistant tool call (arguments: `input` as JSON)
                    tool_result {tool_use_id, content: text or text blocks, is_error}
                                                  -> a `tool` message, in block order with the turn's text
                    thinking / redacted_thinking  -> left out (the model writes none)
                    image, document, ...          -> 400
  tools           [{name, description, input_schema}] -> function tools (server tools, with a `type` other than
                  "custom", accepted and left out)
  tool_choice     {"type": "auto" | "any" | "tool" (+ name) | "none", disable_parallel_tool_use}
                  -> auto / required / the named function / none, parallel_tool_calls
  max_tokens (required), stop_sequences (up to 4), temperature (0-1), top_p, stream; skillkv's `skills`, `mode`
Response: {id: "msg_...", type: "message", role: "assistant", model, content: [text block?, tool_use blocks...],
stop_reason: end_turn | max_tokens | tool_use | stop_sequence, stop_sequence, usage: {input_tokens (computed),
cache_read_input_tokens (reused), cache_creation_input_tokens: 0, output_tokens}}; streamed as message_start,
content_block_start / _delta (text_delta, input_json_delta) / _stop per block, message_delta, message_stop. Errors:
{"type": "error", "error": {"type", "message"}} (`error_body`).
"""

from __future__ import annotations

import json
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skillkv.serve.protocol import ApiError, ChatRequest

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 499: "invalid_request_error",
               500: "api_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Block(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None
    id: Optional[str] = None  # tool_use
    name: Optional[str] = None
    input: Optional[dict] = None
    tool_use_id: Optional[str] = None  # tool_result
    content: Union[str, list["Block"], None] = None
    is_error: Optional[bool] = None


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    type: Optional[str] = None
    description: Optional[str] = None
    input_schema: Optional[dict] = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Turn] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # required by /v1/messages, not by count_tokens
    system: Union[str, list[Block], None] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[dict] = None
    skills: Optional[list[str]] = None
    mode: Literal["auto", "exact", "full", "compose"] = "auto"


def _text(blocks: Union[str, list[Block], None], where: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    out = []
    for b in blocks:
        if b.type != "text" or b.text is None:
            raise ApiError(400, f"{where}: a block of type {b.type!r} is not supported here (text only)",
                           param=where, code="unsupported_content")
        out.append(b.text)
    return "\n\n".join(out) if where == "system" else "".join(out)


def _turn(t: Turn, i: int) -> list[dict]:
    """One Anthropic turn as OpenAI messages, in block order."""
    where = f"messages.{i}.content"
    if isinstance(t.content, str):
        return [{"role": t.role, "content": t.content}]
    out, text, calls = [], [], []
    for b in t.content:
        if b.type == "text":
            text.append(b.text or "")
        elif b.type in ("thinking", "redacted_thinking"):
            continue
        elif b.type == "tool_use" and t.role == "assistant":
            if not b.id or not b.name:
                raise ApiError(400, f"{where}: a tool_use block needs an id and a name", param=where)
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input or {}, ensure_ascii=False)}})
        elif b.type == "tool_result" and t.role == "user":
            if not b.tool_use_id:
                raise ApiError(400, f"{where}: a tool_result block needs the tool_use_id it answers", param=where)
            if text:
                out.append({"role": "user", "content": "".join(text)})
                text = []
            body = _text(b.content, where)
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": body})
        else:
            raise ApiError(400, f"{where}: a {b.type!r} block is not supported in a {t.role} turn", param=where,
                           code="unsupported_content")
    if t.role == "assistant":
        return [{"role": "assistant", "content": "".join(text) or None, **({"tool_calls": calls} if calls else {})}]
    return out + ([{"role": "user", "content": "".join(text)}] if text or not out else [])


def _tool_choice(tc: dict | None) -> tuple[Union[str, dict, None], Optional[bool]]:
    if not tc:
        return None, None
    kind = tc.get("type")
    parallel = False if tc.get("disable_parallel_tool_use") else None
    if kind == "tool":
        if not tc.get("name"):
            raise ApiError(400, "tool_choice of type 'tool' needs a name", param="tool_choice")
        return {"type": "function", "function": {"name": tc["name"]}}, parallel
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if choice is None:
        raise ApiError(400, f"tool_choice type must be auto, any, tool or none, not {kind!r}", param="tool_choice")
    return choice, parallel


def to_chat(req: MessagesRequest, stream: bool | None = None) -> ChatRequest:
    """The chat-completions request a Messages request means (module docstring)."""
    known = {b.tool_use_id for t in req.messages if not isinstance(t.content, str) for b in t.content
             if b.type == "tool_result"}
    used = {b.id for t in req.messages if not isinstance(t.content, str) for b in t.content if b.type == "tool_use"}
    if known - used:
        raise ApiError(400, f"tool_result for an unknown tool_use id: {sorted(known - used)[0]!r}", param="messages")
    msgs = ([{"role": "system", "content": _text(req.system, "system")}] if req.system else [])
    for i, t in enumerate(req.messages):
        msgs += _turn(t, i)
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema or {"type": "object", "properties": {}}}}
             for t in req.tools or [] if t.type in (None, "custom")]
    choice, parallel = _tool_choice(req.tool_choice)
    if req.stop_sequences is not None and len(req.stop_sequences) > 4:
        raise ApiError(400, "stop_sequences: at most 4", param="stop_sequences")
    body = {"model": req.model, "messages": msgs, "max_tokens": req.max_tokens, "stream": req.stream,
            "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop_sequences or None,
            "tools": tools or None, "tool_choice": choice if tools or choice not in ("auto", "none") else None,
            "parallel_tool_calls": parallel, "skills": req.skills, "mode": req.mode}
    try:
        return ChatRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:  # what the chat request refuses of it (an empty stop sequence, ...): the client's
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or None
        raise ApiError(400, f"{where}: {err.get('msg')}" if where else str(err.get("msg")), param=where) from None


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def _usage(use: dict) -> dict:
    cached = use["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": use["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": use["completion_tokens"]}


def _stop(done: dict) -> tuple[str, str | None]:
    hit = done.get("stop_sequence")
    return ("stop_sequence", hit) if hit else (STOP_REASONS.get(done["finish"], "end_turn"), None)


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def message(mid: str, model: str, done: dict) -> dict:
    """A whole answer (the worker's "done" event) as an Anthropic message."""
    content = ([{"type": "text", "text": done["text"]}] if done["text"].strip() or not done.get("tool_calls")
               else [])
    content += [_tool_use(c) for c in done.get("tool_calls") or []]
    reason, seq = _stop(done)
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": seq, "usage": _usage(done["usage"]), "skillkv": done["ext"]}


class Events:
    """The worker's events of one streamed answer as Anthropic's stream events, each (event type, data)."""

    def __init__(self, mid: str, model: str, prompt_tokens: int):
        self.block, self.open = -1, None  # index of the open content block and its type
        self.start = ("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})

    def _close(self) -> list[tuple]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.block})]

    def _begin(self, block: dict) -> list[tuple]:
        out = self._close()
        self.block += 1
        self.open = block["type"]
        return out + [("content_block_start", {"type": "content_block_start", "index": self.block,
                                               "content_block": block})]

    def text(self, s: str) -> list[tuple]:
        out = [] if self.open == "text" else self._begin({"type": "text", "text": ""})
        return out + [("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                               "delta": {"type": "text_delta", "text": s}})]

    def call(self, call: dict) -> list[tuple]:
        use = _tool_use(call)
        out = self._begin({**use, "input": {}})
        return out + [("content_block_delta", {"type": "content_block_delta", "index": self.block, "delta": {
            "type": "input_json_delta", "partial_json": call["function"]["arguments"]}})]

    def done(self, done: dict) -> list[tuple]:
        out = self._close() if self.block >= 0 else self.text("") + self._close()
        reason, seq = _stop(done)
        return out + [("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason,
                                                                             "stop_sequence": seq},
                                         "usage": _usage(done["usage"]), "skillkv": done["ext"]}),
                      ("message_stop", {"type": "message_stop"})]
