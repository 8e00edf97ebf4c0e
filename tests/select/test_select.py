"""Keyword skill selection: relevance, no match, top_k, deterministic ties, the repository's skills."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from skillkv.select import choose_skills
from skillkv.select.keyword import MIN_SCORE, score, words
from skillkv.skills import Skill, load_skills

REPO_SKILLS = Path(__file__).resolve().parents[2] / "skills"


def skill(name: str, description: str) -> Skill:
    return Skill(name=name, description=description, body="body", path=Path("/nowhere") / name)


SYNTHETIC = [
    skill("docker-compose", "Write and debug docker compose files, services, volumes and networks."),
    skill("regex-help", "Explain and build regular expressions for text matching."),
    skill("tax-forms", "Fill in income tax forms and deductions."),
]


@pytest.fixture(scope="module")
def repo_skills() -> list[Skill]:
    return load_skills(REPO_SKILLS).skills


def names(skills: list[Skill]) -> list[str]:
    return [s.name for s in skills]


def test_picks_the_skill_whose_name_and_description_match():
    assert names(choose_skills("My docker compose volumes are not mounted", SYNTHETIC)) == ["docker-compose"]
    assert names(choose_skills("Build a regex for matching dates", SYNTHETIC)) == ["regex-help"]


def test_description_words_alone_can_select():
    # no name word, two description words ("income", "deduction" after dropping the plural s)
    assert names(choose_skills("Which deductions lower my income?", SYNTHETIC)) == ["tax-forms"]


def test_a_single_description_word_is_not_enough():
    q = "Explain this to me"  # only "explain" (description of regex-help), score 1 < MIN_SCORE
    assert score(words(q), SYNTHETIC[1]) == 1 < MIN_SCORE
    assert choose_skills(q, SYNTHETIC) == []


def test_unrelated_question_selects_nothing(repo_skills):
    q = "What is the capital of France?"
    assert choose_skills(q, SYNTHETIC) == []
    assert choose_skills(q, repo_skills) == []
    assert choose_skills("", repo_skills) == []


def test_respects_top_k():
    many = [skill(f"db-tool-{c}", "Database index tuning.") for c in "abcd"]
    q = "database index tool"
    assert len(choose_skills(q, many, top_k=4)) == 4
    assert names(choose_skills(q, many, top_k=2)) == ["db-tool-a", "db-tool-b"]
    assert names(choose_skills(q, many, top_k=1)) == ["db-tool-a"]
    assert choose_skills(q, many, top_k=0) == []
    assert len(choose_skills(q, many)) == 2  # the default


def test_best_first():
    strong = skill("sql-index", "SQL index tuning and EXPLAIN plans.")
    weak = skill("general-notes", "Notes about sql and explain in general.")
    for order in ([strong, weak], [weak, strong]):
        assert names(choose_skills("Why is my sql index not used by EXPLAIN?", order)) == ["sql-index",
                                                                                          "general-notes"]


def test_ties_are_ordered_by_name_whatever_the_input_order():
    tied = [skill("zeta-cache", "cache eviction"), skill("alpha-cache", "cache eviction"),
            skill("mid-cache", "cache eviction")]
    q = "cache eviction policy"
    scores = {score(words(q), s) for s in tied}
    assert len(scores) == 1 and scores.pop() >= MIN_SCORE
    for perm in itertools.permutations(tied):
        assert names(choose_skills(q, list(perm), top_k=3)) == ["alpha-cache", "mid-cache", "zeta-cache"]
        assert names(choose_skills(q, list(perm), top_k=1)) == ["alpha-cache"]


def test_words_normalises_case_stop_words_and_plurals():
    assert words("How do I write the Commit Messages? Use git!") == {"write", "commit", "message", "git"}
    assert words("class bus gas") == {"class", "bus", "gas"}  # 'ss' endings and short words keep their s


def test_git_commit_question_selects_git_commit_messages_first(repo_skills):
    chosen = choose_skills("How do I write a good git commit message?", repo_skills)
    assert chosen and chosen[0].name == "git-commit-messages"
