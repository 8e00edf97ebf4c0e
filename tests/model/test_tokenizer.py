"""skillkv's tokenizer (tokenizers + tokenizer_config.json, no transformers) against transformers' AutoTokenizer on
the default model: the same ids, the same text back, the same specials, vocabulary and chat template."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from skillkv.model import resolve_model
from skillkv.prompt import PromptBuilder, template_parts
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    h = resolve_model("default", device="cpu")
    return h.tokenizer, AutoTokenizer.from_pretrained(h.path)


def _texts() -> list[str]:
    skills = [p.read_text() for p in sorted((REPO / "skills").glob("*/SKILL.md"))]
    texts = skills + ["", " ", "  two spaces", "<|im_start|>user\nx<|im_end|>\n", "Ünïcødé ✓ 🚀\n\t\r\n",
                      "<|endoftext|><repo_name>a<file_sep>", "x" * 300, "\u00a0\u200b\ufeff"]
    rnd = random.Random(0)
    for _ in range(300):  # arbitrary cuts of the skills: words split anywhere, specials half-cut
        base = rnd.choice(skills)
        i = rnd.randrange(len(base) + 1)
        texts.append(base[i:rnd.randrange(i, len(base) + 1)])
    return texts


def test_encode_and_decode_equal_transformers(pair):
    mine, ref = pair
    for t in _texts():
        ids = mine(t, add_special_tokens=False)["input_ids"]
        assert ids == ref(t, add_special_tokens=False)["input_ids"], t[:80]
        assert mine(t)["input_ids"] == ref(t)["input_ids"]
        for skip in (True, False):
            assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_specials_vocabulary_and_template_equal_transformers(pair):
    mine, ref = pair
    assert mine.get_vocab() == ref.get_vocab()
    assert mine.special_tokens_map == ref.special_tokens_map
    for name in ("unk_token_id", "eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(mine, name) == getattr(ref, name), name
    toks = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "never-a-token"]
    assert mine.convert_tokens_to_ids(toks) == ref.convert_tokens_to_ids(toks)
    assert mine.chat_template == ref.chat_template
    assert template_parts(mine) == template_parts(ref)
    q = "How long should a subject line be?"
    assert PromptBuilder(mine).question_ids(q) == PromptBuilder(ref).question_ids(q)
