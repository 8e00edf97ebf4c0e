"""Prompt layout: the preamble, skill segments and the question, as token segments.

The prompt IS the concatenation of independently tokenized segments:

    [preamble] [skill 1] [skill 2] ... [question]

  preamble  = chat-template head up to the system content + PREAMBLE
  skill     = '<skill name="...">\\n' + compiled text + '\\n</skill>\\n\\n'
  question  = chat-template text between system and user content + question + generation prompt

The segment boundaries come from rendering the model's own chat template with marker strings, so any template
with a system role works (ChatML for SmolLM2/Qwen, Llama 3 headers, ...). Because a snapshot of the first k
segments depends only on those segments, it is an exact prefix of every prompt that starts with them, and full
mode prefills the very same token ids from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

from skillkv.errors import PromptTooLong
from skillkv.skills import Skill

PREAMBLE = (
    "You are a helpful assistant. The skills below are instructions and reference material written for you; "
    "follow the ones that apply to the user's question and answer accurately and concisely.\n\n"
)
_SYS, _USER = "\x00SKILLKV_SYSTEM\x00", "\x00SKILLKV_USER\x00"
FALLBACK_TEMPLATE = ("<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
# Gemma's turn format, as its own chat template renders a system message: folded into the first user turn
GEMMA_TEMPLATE = ("<bos><start_of_turn>user\n", "\n\n", "<end_of_turn>\n<start_of_turn>model\n")


def _fallback(tokenizer) -> tuple[str, str, str]:
    """Gemma's turn format when the vocabulary has its turn tokens, else ChatML."""
    vocab = tokenizer.get_vocab()
    return GEMMA_TEMPLATE if all(t in vocab for t in ("<bos>", "<start_of_turn>", "<end_of_turn>")) \
        else FALLBACK_TEMPLATE


def template_parts(tokenizer) -> tuple[str, str, str]:
    """(head, middle, tail) around the system and user contents in the model's chat template. Without a usable
    template (none, as in a GGUF that carries none, or one without a system role): `_fallback`."""
    if not getattr(tokenizer, "chat_template", None):
        return _fallback(tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _SYS}, {"role": "user", "content": _USER}],
            add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - templates without a system role raise arbitrary errors
        return _fallback(tokenizer)
    if not isinstance(text, str) or text.count(_SYS) != 1 or text.count(_USER) != 1:
        return _fallback(tokenizer)
    head, rest = text.split(_SYS)
    middle, tail = rest.split(_USER)
    return head, middle, tail


def skill_segment_text(skill: Skill) -> str:
    return f'<skill name="{skill.name}">\n{skill.compiled_text}</skill>\n\n'


@dataclass
class Layout:
    """The token layout of one prompt. `segments[i]` are the ids of segment i; `ids` their concatenation."""

    segments: list[list[int]]
    names: list[str]  # "preamble", skill names..., "question"

    @property
    def ids(self) -> list[int]:
        return [t for seg in self.segments for t in seg]

    @property
    def bounds(self) -> list[int]:
        """Cumulative end position of each segment."""
        out, n = [], 0
        for seg in self.segments:
            n += len(seg)
            out.append(n)
        return out


class PromptBuilder:
    """Tokenizes segments for one tokenizer; skill segments are memoized by content hash."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.head, self.middle, self.tail = template_parts(tokenizer)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def preamble_ids(self) -> list[int]:
        if "preamble" not in self._cache:
            self._cache["preamble"] = self.encode(self.head + PREAMBLE)
        return self._cache["preamble"]

    def skill_ids(self, skill: Skill) -> list[int]:
        key = "skill:" + skill.content_hash
        if key not in self._cache:
            self._cache[key] = self.encode(skill_segment_text(skill))
        return self._cache[key]

    def question_ids(self, question: str) -> list[int]:
        return self.encode(self.middle + question + self.tail)

    def layout(self, skills: list[Skill], question: str) -> Layout:
        segs = [self.preamble_ids()] + [self.skill_ids(s) for s in skills] + [self.question_ids(question)]
        return Layout(segs, ["preamble"] + [s.name for s in skills] + ["question"])


def check_fits(prompt_tokens: int, answer_tokens: int, question_tokens: int | None, limit: int) -> None:
    """PromptTooLong (one line, with the numbers) unless `prompt_tokens` + `answer_tokens` <= `limit`."""
    if prompt_tokens + answer_tokens > limit:
        parts = (f"skills {prompt_tokens - question_tokens:,} + question {question_tokens:,}"
                 if question_tokens is not None else f"{prompt_tokens:,}")
        raise PromptTooLong(f"prompt of {prompt_tokens:,} tokens ({parts}) plus {answer_tokens} answer "
                            f"token{'s' if answer_tokens != 1 else ''} exceeds the model's context of {limit:,} tokens")
