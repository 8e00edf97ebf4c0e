"""Skill selection: which skills a question gets when none are named.

`choose_skills` ranks with select/rank.py (BM25 over name, description and body, fused with all-MiniLM-L6-v2
embeddings from select/embed.py when the `embed` extra is installed; a threshold so that a question needing no
skill gets none; see docs/EVAL.md). With fewer than MIN_RANKED skills BM25's IDF is degenerate (a word in every
skill weighs ~0), so the keyword scorer of select/keyword.py decides. `--skill` always wins over this.
"""

from __future__ import annotations

from skillkv.select.keyword import MIN_SCORE, keyword_choose, keyword_ranked
from skillkv.skills import Skill

MIN_RANKED = 5  # below this many skills BM25's IDF is degenerate (a word in every skill weighs ~0): keywords


def explain_skills(question: str, skills: list[Skill], top_k: int = 2):
    """Every skill as a skillkv.select.rank.Candidate (scores, chosen or not, and why), best first."""
    from skillkv.select.rank import Candidate, ranker_for

    if not question or not question.strip() or not skills:
        return []
    if len(skills) >= MIN_RANKED:
        return ranker_for(skills).rank(question, top_k)
    chosen = {s.name for s in keyword_choose(question, skills, top_k)}
    out = []
    for sc, s in keyword_ranked(question, skills):
        why = (f"keyword score {sc} >= {MIN_SCORE} (fewer than {MIN_RANKED} skills: keyword scorer)"
               if s.name in chosen else f"keyword score {sc}" + (" below " + str(MIN_SCORE) if sc < MIN_SCORE
                                                                 else f", top-{top_k} limit reached"))
        out.append(Candidate(s, float(sc), float(sc), None, float(sc), s.name in chosen, why))
    return out


def choose_skills(question: str, skills: list[Skill], top_k: int = 2) -> list[Skill]:
    """The best-matching skills for `question` (possibly none, e.g. with zero skills), best first."""
    return [c.skill for c in explain_skills(question, skills, top_k) if c.chosen]
