"""Server-side skill injection: which skills go in front of a conversation, and why (one short phrase).

Injection serves plain clients (a question, no skills of their own). It must never break the prompt's prefix from
turn to turn of one conversation, nor put text in the prompt twice, so the rule reads only what every turn of a
conversation resends unchanged, in this order:

 1. `"skills": [names]` in the request: those, in this order (unknown names: 400 skill_not_found); `"skills": []`:
    none.
 2. The client manages its skills: none when it declares `tools` (any, non-empty), or its head (the messages before
    the first assistant message: system, developer and user instructions) holds a skill catalog: an
    `<available_skills>` / `<skills_instructions>` block, or the name of a skill of the store (as a word) together
    with the start of its description (its first 40 characters, whitespace and case folded).
 3. Otherwise chosen once from the FIRST user message (skillkv.select, as `skillkv ask`), so every turn of the
    conversation gets the same skills; a chosen skill whose body the messages already hold is left out (pasted, a
    `<skill>` block, a tool result): at least 80% of its body's characters, counted over its lines of 8+
    characters (all lines when none is that long), are lines of the messages, compared with whitespace collapsed
    and a line-number prefix (`cat -n`'s "     1\\t", "1→") dropped; a literal "\\n" in a message (a JSON-escaped
    result) separates lines too. This check reads every message: a body that arrives on a later turn stops the
    injection from then on (the prefix changes once rather than the body being in the prompt twice).
"""

from __future__ import annotations

import re

from skillkv.errors import SkillError
from skillkv.serve.protocol import ApiError, ChatRequest, Message
from skillkv.skills import Skill

CATALOG_TAGS = ("<available_skills>", "<skills_instructions>")
DESCRIPTION_CHARS = 40  # how much of a description a catalog entry must show
HELD_SHARE = 0.8  # share of a body's characters that must already be in the messages
MIN_LINE = 8  # shorter body lines ("```", "---", "## Usage") say little about where the body is
_NUMBERED = re.compile(r"^\s*\d+(?:\t|→)")
_LINE_BREAK = re.compile(r"\r?\n|\\n")


def _fold(text: str) -> str:
    return " ".join(text.split()).lower()


def head(messages: list[Message]) -> list[Message]:
    """The messages before the first assistant message: the same on every turn of a conversation."""
    out = []
    for m in messages:
        if m.role == "assistant":
            break
        out.append(m)
    return out


def lists_catalog(text: str, skills: list[Skill]) -> bool:
    """Whether `text` (a client's head) holds a skill catalog (module docstring, rule 2)."""
    if any(tag in text for tag in CATALOG_TAGS):
        return True
    folded = _fold(text)
    for s in skills:
        start = _fold(s.description)[:DESCRIPTION_CHARS]
        if start and start in folded and re.search(rf"(?<![\w-]){re.escape(s.name.lower())}(?![\w-])", folded):
            return True
    return False


def _norm(line: str) -> str:
    return " ".join(_NUMBERED.sub("", line, count=1).split())


def message_lines(texts: list[str]) -> set[str]:
    return {_norm(ln) for t in texts for ln in _LINE_BREAK.split(t)}


def body_held(skill: Skill, lines: set[str]) -> bool:
    """Whether the messages (their `message_lines`) already hold `skill`'s body (module docstring, rule 3)."""
    body = [n for n in map(_norm, skill.body.splitlines()) if n]
    body = [n for n in body if len(n) >= MIN_LINE] or body
    total = sum(map(len, body))
    return total > 0 and sum(len(n) for n in body if n in lines) >= HELD_SHARE * total


def choose(kv, body: ChatRequest, select_on: str) -> tuple[list[Skill], str]:
    """(skills to inject in this order, why) for the request; `select_on` is its first user message."""
    if body.skills is not None:
        if not body.skills:
            return [], "none: the request asks for none"
        try:
            return kv.pick(body.skills), "named by the request"
        except SkillError as e:
            raise ApiError(400, str(e), param="skills", code="skill_not_found") from None
    if body.tools:
        return [], "none: the client declares tools (it loads skills itself)"
    if lists_catalog("\n".join(m.text for m in head(body.messages)), kv.load_skills().skills):
        return [], "none: the client's instructions list the skill catalog"
    chosen = kv.select(select_on)
    if not chosen:
        return [], "none: no skill matches the first user message"
    lines = message_lines([m.text for m in body.messages])
    held = [s for s in chosen if body_held(s, lines)]
    why = "chosen from the first user message"
    if held:
        why += "; already in the messages: " + ", ".join(s.name for s in held)
    return [s for s in chosen if s not in held], why
