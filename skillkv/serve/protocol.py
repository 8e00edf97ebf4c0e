"""Request and response shapes of the OpenAI-compatible API (chat completions), and its error shape.

Requests are validated by pydantic; anything the server cannot honour is refused with a 400, never silently
ignored when it would change the answer (n > 1, logprobs, non-text content parts). `tool_choice` "required" or a
named function and `response_format` constrain the answer (serve/constraints.py). Unknown fields are accepted and
ignored, as OpenAI-compatible servers do (clients send `user`, `presence_penalty`, ... routinely).

Tools (OpenAI's chat-completions shapes): `tools` = [{"type": "function", "function": {name, description,
parameters}}] (other tool types, e.g. Codex's `web_search`, are accepted and left out of the prompt), `tool_choice`
"auto" | "none" | "required" | {"type": "function", "function": {"name"}}, `parallel_tool_calls`; assistant
messages may carry `tool_calls` = [{id, type: "function", function: {name, arguments: JSON string}}] with `content`
null or absent; `tool` messages carry `tool_call_id` (and optionally `name`). How they enter the prompt:
skillkv/serve/render.py; how the answer's calls come back as
`message.tool_calls` (`completion`, `call_deltas` when streamed): skillkv/serve/tool_calls.py.

skillkv extensions
  request   `skills: [name, ...]`  use these skills in this order ([] = none); omitted: serve/injection.py decides
            `mode: auto | exact | full | compose`  as `skillkv ask --mode` (default auto)
  response  `usage.prompt_tokens_details.cached_tokens` (as OpenAI) and `usage.skillkv` = {cached_tokens,
            computed_tokens}; a top-level `skillkv` object: skills, injection (why skills were or were not
            injected), mode, tokens, spans (compiled skills found in the prompt: skill, form, start, tokens, of),
            tool_calls ({format, parsed, invalid}: a request declaring tools), tiers
            (l1 | host | l2 | computed, where each skill's KV came from), output_token_ids, timings_ms (queue,
            snapshot_load, prefill: the engine steps that fed the prompt, ttft, total; measured in the server)
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ApiError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def api_error(e: Exception) -> ApiError:
    """The API error a failure inside the engine loop is answered with: 400 when the request is at fault (a
    SkillkvError: too long for the pool, an unknown skill...), 500 otherwise."""
    from skillkv.engine.pages import PoolFull
    from skillkv.errors import SkillkvError

    if isinstance(e, ApiError):
        return e
    if isinstance(e, PoolFull):
        return ApiError(400, str(e), param="max_tokens", code="kv_pool_exceeded")
    if isinstance(e, SkillkvError):
        return ApiError(400, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}", "server_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: Union[str, dict] = "{}"  # OpenAI sends a JSON string; an object is accepted as well


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None


class Tool(BaseModel):
    """A declared tool; only `function` tools reach the prompt (others are accepted and left out)."""

    model_config = ConfigDict(extra="ignore")
    type: str
    function: Optional[FunctionDef] = None

    @model_validator(mode="after")
    def _function(self):
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs a `function` object")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant only
    tool_call_id: Optional[str] = None  # tool only (required there)
    name: Optional[str] = None

    @model_validator(mode="after")
    def _roles(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are only valid on assistant messages, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @property
    def text(self) -> str:
        """The message's text; content parts must all be text (images etc. are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ApiError(400, f"content part of type {p.type!r} is not supported (text only)",
                               param="messages", code="unsupported_content")
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    logprobs: Optional[bool] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[str, dict, None] = None  # "auto" | "none" | "required" | a named function
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict] = None  # {"type": "text" | "json_object" | "json_schema", ...}
    skills: Optional[list[str]] = None  # skillkv extension: these skills, in this order
    mode: Literal["auto", "exact", "full", "compose"] = "auto"  # skillkv extension: as `skillkv ask --mode`

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop: at most 4 non-empty strings")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, str) and v not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function, not {v!r}")
        if isinstance(v, dict) and (v.get("type") != "function" or not (v.get("function") or {}).get("name")):
            raise ValueError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
        return v

    def check(self) -> None:
        """Refuse what the server cannot honour (ApiError 400)."""
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "skillkv": {"cached_tokens": cached, "computed_tokens": prompt - cached}}


def completion(cid: str, model: str, text: str, finish: str, use: dict, ext: dict,
               tool_calls: list[dict] | None = None) -> dict:
    """A whole answer; with `tool_calls` (serve/tool_calls.py's shape) the message carries them, its content null
    when only space is left around them."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text if text.strip() else None,
                   "tool_calls": [{k: c[k] for k in ("id", "type", "function")} for c in tool_calls]}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": use, "skillkv": ext}


def call_deltas(call: dict) -> list[dict]:
    """A complete tool call as OpenAI streams one: its index, id, type and name first, then its arguments."""
    i, fn = call["index"], call["function"]
    return [{"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                             "function": {"name": fn["name"], "arguments": ""}}]},
            {"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}]


def chunk(cid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
          use: dict | None = None, ext: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}]}
    if use is not None:
        out["usage"] = use
    if ext is not None:
        out["skillkv"] = ext
    return out
