"""A request's size bound before anything is rendered or tokenized: a 10 MB message costs a length check, not a
tokenization. The prompt itself is built by serve/render.py.
"""

from __future__ import annotations

import json

from skillkv.prompt import PromptBuilder
from skillkv.serve.protocol import ApiError, ChatRequest

_CHARS_PER_TOKEN: dict[int, int] = {}


def chars_per_token(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for: the longest entry of its vocabulary (a byte-level
    or SentencePiece token's text is at least as long as what it decodes to); 64 when the vocabulary is hidden."""
    key = id(tokenizer)
    if key not in _CHARS_PER_TOKEN:
        try:
            _CHARS_PER_TOKEN[key] = max(map(len, tokenizer.get_vocab()))
        except Exception:  # noqa: BLE001 - no vocabulary to read: a generous bound
            _CHARS_PER_TOKEN[key] = 64
    return _CHARS_PER_TOKEN[key]


def request_chars(body: ChatRequest) -> int:
    """Characters the prompt takes from the request: message texts, tool calls (names and arguments) and tool
    definitions (as JSON)."""
    size = 0
    for m in body.messages:
        size += len(m.text)
        for c in m.tool_calls or []:
            args = c.function.arguments
            size += len(c.function.name) + len(args if isinstance(args, str) else json.dumps(args))
    return size + sum(len(json.dumps(t.model_dump(exclude_none=True))) for t in body.tools or [])


def check_length(builder: PromptBuilder, body: ChatRequest, max_context: int) -> None:
    """ApiError 400 (context_length_exceeded) for a request with more characters than `max_context` tokens can hold."""
    limit = max_context * chars_per_token(builder.tokenizer)
    size = request_chars(body)
    if size > limit:
        raise ApiError(400, f"messages hold {size:,} characters; the model's context of {max_context:,} tokens "
                       f"holds at most {limit:,}", param="messages", code="context_length_exceeded")
