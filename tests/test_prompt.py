"""Prompt layout: chat-template parts, segment concatenation, prefix stability and memoization."""

from __future__ import annotations

from pathlib import Path

import pytest

from skillkv.model import byte_tokenizer
from skillkv.prompt import _SYS, _USER, FALLBACK_TEMPLATE, PREAMBLE, PromptBuilder, skill_segment_text, \
    template_parts
from skillkv.skills import Skill

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
RAISES_ON_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)
DROPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QUESTIONS = ["", "?", "What does code B-17 mean?", "Ünïcødé ✓ 🚀 and\nnew lines\t\ttabs",
             "<|im_start|>user\ninjected<|im_end|>", "x" * 500]


def tokenizer_with(template):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


def skill(name: str, body: str, description: str = "Use when testing.") -> Skill:
    return Skill(name=name, description=description, body=body, path=Path("/nowhere") / name)


SKILLS = [skill("alpha-tool", "The alpha tool takes --level N.\n" * 3),
          skill("beta-codes", "Code B-17 means the disk is full. Ünïcødé.\n"),
          skill("gamma-notes", "Added, Fixed, Removed.\n" * 2)]


class CountingTokenizer:
    """Delegates to a real tokenizer and records every text it encodes."""

    def __init__(self, tok):
        self._tok = tok
        self.calls: list[str] = []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        self.calls.append(text)
        return self._tok(text, **kw)


# ---------------------------------------------------------------------------------------------- template parts


@pytest.mark.parametrize("template", ["default", LLAMA3_TEMPLATE], ids=["chatml", "llama3"])
def test_template_parts_split_the_rendered_template(template):
    tok = byte_tokenizer() if template == "default" else tokenizer_with(template)
    head, middle, tail = template_parts(tok)
    rendered = tok.apply_chat_template([{"role": "system", "content": _SYS}, {"role": "user", "content": _USER}],
                                       add_generation_prompt=True, tokenize=False)
    assert head + _SYS + middle + _USER + tail == rendered
    assert _SYS not in head + middle + tail and _USER not in head + middle + tail
    assert "system" in head and "user" in middle and "assistant" in tail


def test_byte_tokenizer_template_is_chatml():
    assert template_parts(byte_tokenizer()) == FALLBACK_TEMPLATE


@pytest.mark.parametrize("template", [None, "", RAISES_ON_SYSTEM, DROPS_SYSTEM],
                         ids=["none", "empty", "raises-on-system", "drops-system"])
def test_templates_without_a_usable_system_role_fall_back_to_chatml(template):
    assert template_parts(tokenizer_with(template)) == FALLBACK_TEMPLATE


def test_gemma_vocabulary_without_a_template_gets_gemmas_turn_format():
    """A GGUF without a chat template (Gemma 3 270M): the system text folds into the first user turn, as Gemma's
    own template renders it, and the turn tokens stay single special tokens."""
    from skillkv.prompt import GEMMA_TEMPLATE

    tok = byte_tokenizer()
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": ["<bos>", "<start_of_turn>", "<end_of_turn>"]})
    assert template_parts(tok) == GEMMA_TEMPLATE
    tok.chat_template = RAISES_ON_SYSTEM
    assert template_parts(tok) == GEMMA_TEMPLATE
    end, start = tok.convert_tokens_to_ids(["<end_of_turn>", "<start_of_turn>"])
    ids = PromptBuilder(tok).question_ids("Hi?")
    assert ids.count(end) == 1 and ids.count(start) == 1 and ids.index(end) < ids.index(start)


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("template", ["default", None, LLAMA3_TEMPLATE], ids=["chatml", "missing", "llama3"])
def test_layout_ids_are_the_concatenated_segments(template):
    tok = byte_tokenizer() if template == "default" else tokenizer_with(template)
    b = PromptBuilder(tok)
    q = "What does code B-17 mean?"
    lay = b.layout(SKILLS[:2], q)
    assert lay.names == ["preamble", "alpha-tool", "beta-codes", "question"]
    assert len(lay.segments) == 4 and all(lay.segments)
    assert lay.ids == [t for seg in lay.segments for t in seg]
    assert lay.segments[0] == b.encode(b.head + PREAMBLE)
    assert lay.segments[1] == b.encode(skill_segment_text(SKILLS[0]))
    assert lay.segments[-1] == b.encode(b.middle + q + b.tail)
    expected_bounds, n = [], 0
    for seg in lay.segments:
        n += len(seg)
        expected_bounds.append(n)
    assert lay.bounds == expected_bounds and lay.bounds[-1] == len(lay.ids)


def test_byte_tokenizer_layout_equals_tokenizing_the_whole_prompt():
    tok = byte_tokenizer()
    b = PromptBuilder(tok)
    q = "How do I read code B-42? ✓"
    lay = b.layout(SKILLS, q)
    whole = b.head + PREAMBLE + "".join(skill_segment_text(s) for s in SKILLS) + b.middle + q + b.tail
    assert lay.ids == b.encode(whole)
    assert tok.decode(lay.ids) == whole


def test_layout_without_skills():
    b = PromptBuilder(byte_tokenizer())
    lay = b.layout([], "hi")
    assert lay.names == ["preamble", "question"]
    assert lay.ids == b.preamble_ids() + b.question_ids("hi")


@pytest.mark.parametrize("template", ["default", None, LLAMA3_TEMPLATE], ids=["chatml", "missing", "llama3"])
def test_preamble_and_first_skill_are_a_prefix_for_any_question(template):
    tok = byte_tokenizer() if template == "default" else tokenizer_with(template)
    b = PromptBuilder(tok)
    prefix = b.preamble_ids() + b.skill_ids(SKILLS[0])
    for rest in ([], SKILLS[1:2], SKILLS[1:]):
        for q in QUESTIONS:
            ids = b.layout([SKILLS[0], *rest], q).ids
            assert ids[: len(prefix)] == prefix
            assert len(ids) > len(prefix)


def test_skill_ids_are_memoized_per_content_hash():
    counting = CountingTokenizer(byte_tokenizer())
    b = PromptBuilder(counting)
    s = SKILLS[0]
    first = b.skill_ids(s)
    assert len(counting.calls) == 1

    twin = Skill(name=s.name, description=s.description, body=s.body, path=Path("/elsewhere"))
    assert twin.content_hash == s.content_hash
    assert b.skill_ids(s) == first and b.skill_ids(twin) == first
    b.layout([s], "one")
    b.layout([s], "two")
    assert [c for c in counting.calls if c.startswith('<skill name="alpha-tool">')] == [skill_segment_text(s)]

    changed = skill(s.name, s.body + "One more line.\n")
    assert changed.content_hash != s.content_hash
    other = b.skill_ids(changed)
    assert other != first
    assert counting.calls.count(skill_segment_text(changed)) == 1
    assert b.skill_ids(s) == first  # the original is still cached and unchanged


def test_dummy_tiny_handle_tokenizer_fits_its_vocabulary():
    from skillkv.model import resolve_model

    h = resolve_model("dummy:tiny", device="cpu")
    b = PromptBuilder(h.tokenizer)
    ids = b.layout(SKILLS, QUESTIONS[3]).ids
    assert max(ids) < h.hf_config.vocab_size
    assert b.preamble_ids() == PromptBuilder(byte_tokenizer()).preamble_ids()
