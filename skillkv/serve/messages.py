"""From chat messages to the question segment: the prompt mapping of `skillkv serve`.

The prompt of a request is the same concatenation `skillkv ask` uses (skillkv.prompt):

    [preamble] [skill 1] ... [skill k] [question segment]

and the question segment carries the whole conversation:

  - the text of every `system` / `developer` message (joined by a blank line, in order) continues the system
    block right after the skills, so the skills stay an exact, shareable prefix and the client's instructions
    still sit in the system turn;
  - the other messages (user, assistant, tool), in order, are rendered by the model's own chat template after
    that, ending with the generation prompt.

It is computed by rendering the template with a marker as the system content (as PromptBuilder finds its
segments) and keeping what follows the marker, tokenized on its own. A single user message and no system
message therefore gives exactly `PromptBuilder.question_ids(question)`: the server's prompt for a plain question is
the prompt of `skillkv ask`. Skills are chosen (when the request names none) from the last user message.
"""

from __future__ import annotations

from skillkv.prompt import FALLBACK_TEMPLATE, PromptBuilder
from skillkv.serve.protocol import ApiError, Message

_MARK = "\x00SKILLKV_SYSTEM\x00"


def _render(builder: PromptBuilder, system: str, turns: list[dict]) -> str:
    tok = builder.tokenizer
    msgs = [{"role": "system", "content": _MARK + system}] + turns
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if isinstance(text, str) and text.count(_MARK) == 1:
                return text.split(_MARK, 1)[1]
        except Exception:  # noqa: BLE001 - a template that refuses a role sequence: fall back to ChatML below
            pass
    out = system
    for m in turns:  # ChatML, as FALLBACK_TEMPLATE
        out += f"<|im_end|>\n<|im_start|>{m['role']}\n{m['content']}"
    return out + FALLBACK_TEMPLATE[2]


def question_text(builder: PromptBuilder, messages: list[Message]) -> tuple[str, str]:
    """(text of the question segment, text to choose skills from). ApiError on a conversation without a user
    message."""
    system = "\n\n".join(m.text for m in messages if m.role in ("system", "developer"))
    turns = [{"role": m.role, "content": m.text} for m in messages if m.role not in ("system", "developer")]
    users = [t["content"] for t in turns if t["role"] == "user"]
    if not users or not users[-1].strip():
        raise ApiError(400, "messages need a non-empty user message", param="messages", code="no_user_message")
    return _render(builder, system, turns), users[-1]


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


def check_length(builder: PromptBuilder, messages: list[Message], max_context: int) -> None:
    """ApiError 400 (context_length_exceeded) for messages with more characters than `max_context` tokens can hold,
    before anything is rendered or tokenized: a 10 MB message costs a length check, not a tokenization."""
    limit = max_context * chars_per_token(builder.tokenizer)
    size = sum(len(m.text) for m in messages)
    if size > limit:
        raise ApiError(400, f"messages hold {size:,} characters; the model's context of {max_context:,} tokens "
                       f"holds at most {limit:,}", param="messages", code="context_length_exceeded")


def question_ids(builder: PromptBuilder, messages: list[Message], max_context: int | None = None
                 ) -> tuple[list[int], str]:
    """The question segment's ids and the text skills are chosen from; with `max_context`, messages that cannot
    fit are refused before tokenization (check_length)."""
    if max_context is not None:
        check_length(builder, messages, max_context)
    text, select_on = question_text(builder, messages)
    return builder.encode(text), select_on
