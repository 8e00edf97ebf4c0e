"""Skill selection: which skills a question gets when none are named.

`choose_skills` ranks with skillkv.select.rank (BM25 over name, description and body, fused with all-MiniLM-L6-v2
embeddings when the `embed` extra is installed; a threshold so that a question needing no skill gets none; see
docs/EVAL.md). `--skill` always wins over this.

The previous scorer stays as `keyword_choose`, the baseline in the evaluation and the scorer for fewer than
MIN_RANKED skills: deliberately simple and deterministic, over names and descriptions. A question word that appears
in a skill's name scores 2, one that appears in its description scores 1 (after lower-casing, dropping stop words
and a plural 's'). Skills scoring at least MIN_SCORE are kept, best first, at most `top_k`.
"""

from __future__ import annotations

import re

from skillkv.skills import Skill

MIN_SCORE = 2
STOP = set("""a an and are as at be by can do does for from how i in into is it its me my of on or our should so
that the their them then there these this to use used using was we what when where which who why will with you
your skill skills when user asks about""".split())


def terms(text: str, stop: set[str], pattern: str = r"[a-z0-9]+") -> list[str]:
    """Lower-cased words of `text` minus `stop` and 1-letter words, with a plural 's' stripped."""
    out = []
    for w in re.findall(pattern, text.lower()):
        if w in stop or len(w) < 2:
            continue
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def words(text: str) -> set[str]:
    return set(terms(text, STOP))


def score(question_words: set[str], skill: Skill) -> int:
    name_words = words(skill.name.replace("-", " "))
    desc_words = words(skill.description)
    return 2 * len(question_words & name_words) + len(question_words & (desc_words - name_words))


def keyword_choose(question: str, skills: list[Skill], top_k: int = 2) -> list[Skill]:
    """The keyword baseline: best-matching skills for `question` (possibly none), best first."""
    return [s for sc, s in keyword_ranked(question, skills) if sc >= MIN_SCORE][:top_k]


def keyword_ranked(question: str, skills: list[Skill]) -> list[tuple[int, Skill]]:
    """(keyword score, skill) for every skill, best first, ties by name."""
    q = words(question)
    return [(sc, s) for sc, _, s in sorted(((score(q, s), s.name, s) for s in skills), key=lambda t: (-t[0], t[1]))]
