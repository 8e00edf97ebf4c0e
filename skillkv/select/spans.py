"""Compiled skills found in any prompt (issue 23's first step): where a skill's text sits in a rendered
conversation's token ids, whatever wraps it: a tool result (Gemini CLI `activate_skill`, opencode `skill`), the
output of `cat SKILL.md` through a shell tool (Codex), a `<skill>` user message (Claude Code, Codex `$name`), the
system prompt.

    index = SpanIndex.of(skills, tokenizer)      # built once per list of skills (kv.load_skills().skills)
    index.find(ids) -> [Span(skill, form, start, end, at, tokens), ...]

Forms: each skill is looked for as its SKILL.md file as is (`file`: what `cat`, goose and opencode's readers send)
and as its body without the frontmatter (`body`: what Gemini CLI, Codex and Claude Code wrap). A form's token ids
are its text tokenized alone; inside a prompt the first and last tokens may merge with the wrapping (BPE), so a
match is anchored on the interior and extended token by token in both directions as far as the ids agree.

How (cost: a small fraction of tokenizing the prompt, with ~100 skills):
  - a block of BLOCK tokens every STRIDE tokens of every form: its polynomial hash (mod 2^64) maps to (form,
    offset) in a dict (a file's frontmatter blocks left out: its description is also in the
    skill catalogs agents put in their system prompts, which must not read as the skill);
  - the prompt's hash at every position (a sliding window of BLOCK tokens, Horner's rule over all windows at once)
    goes through a one-hash Bloom filter of the block hashes, then a binary search in them (both vectorized); only
    positions whose hash is an indexed block are examined;
  - a candidate (form, alignment) is verified and extended over the ids (hash collisions cost a comparison, never a
    wrong span), then the stretch it covers is skipped for that alignment;
  - a file span that starts where its body does is the body (the client sent the body; the token before it may
    be the wrapping's newline, which the file has too); otherwise spans that overlap keep the one that covers more
    prompt tokens (a file span holds the body span); a stretch shorter than STRIDE + BLOCK - 1
    tokens may be missed (one holding no indexed block), one shorter than MIN_SPAN is never reported (a phrase a
    skill catalog shares with the body it describes is not the skill).
A form edited after compilation matches in the pieces it still shares; a numbered listing (`cat -n`) interleaves
line numbers and matches only within long lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 16  # tokens per hashed block
STRIDE = 64  # a form's blocks are indexed every STRIDE tokens: any stretch of STRIDE + BLOCK - 1 tokens is found
_FILTER = 1 << 20  # bits of the filter in front of the block lookup
MIN_SPAN = 64  # shorter stretches are not reported (a phrase a catalog shares with a body is not the skill)
_BASE = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Span:
    skill: str
    form: str  # file | body
    start: int  # prompt ids [start, end) equal the form's ids [at, at + end - start)
    end: int
    at: int
    tokens: int  # the form's length in tokens

    @property
    def coverage(self) -> float:
        return (self.end - self.start) / self.tokens

    def to_json(self) -> dict:
        return {"skill": self.skill, "form": self.form, "start": self.start, "tokens": self.end - self.start,
                "of": self.tokens}


def window_hashes(ids) -> np.ndarray:
    """The hash of ids[p:p + BLOCK] for every p: sum of ids[p + j] * B^j (uint64, wrapping arithmetic), computed
    from one prefix sum of ids[i] * B^i and B's inverse powers (B is odd, so it has an inverse mod 2^64)."""
    a = np.asarray(ids, dtype=np.int64).view(np.uint64)
    n = len(a) - BLOCK + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    pw, ipw = _powers(len(a))
    with np.errstate(over="ignore"):
        prefix = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(a * pw[:len(a)], dtype=np.uint64)])
        return (prefix[BLOCK:] - prefix[:n]) * ipw[:n]


_POWERS = [np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64)]  # B^i and B^-i, grown on demand


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]), 1 << 14)
        _POWERS[:] = [_cumpow(int(_BASE), size), _cumpow(pow(int(_BASE), -1, 1 << 64), size)]
    return _POWERS[0], _POWERS[1]


def _cumpow(base: int, n: int) -> np.ndarray:
    """[1, base, base^2, ...] mod 2^64, n of them."""
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        out[1:] = np.cumprod(np.full(n - 1, base, dtype=np.uint64), dtype=np.uint64)
    return out


class SpanIndex:
    """The block hashes of every form of every skill (module docstring)."""

    _CACHE: dict[tuple[int, int], tuple[list, SpanIndex]] = {}

    def __init__(self, forms: dict[tuple[str, str], list[int]], heads: dict[tuple[str, str], int] | None = None):
        """`forms`: (skill, form) -> token ids; `heads`: tokens at the start of a form that are never anchors (a
        file's frontmatter)."""
        heads = heads or {}
        self.forms = {k: np.asarray(v, dtype=np.int64) for k, v in forms.items() if len(v) >= BLOCK}
        self.items = {k: list(v) for k, v in forms.items() if k in self.forms}  # the same ids, for Python compares
        self.blocks: dict[int, list[tuple[tuple[str, str], int]]] = {}
        self.head: dict[tuple[str, str], int] = {}  # a file form's frontmatter length in tokens (about)
        for key, ids in self.forms.items():
            # a file's frontmatter is not an anchor: its description is also in every skill catalog
            skip = self.head[key] = heads.get(key, 0)
            for i, h in enumerate(window_hashes(ids)[::STRIDE].tolist()):
                if i * STRIDE >= skip:
                    self.blocks.setdefault(h, []).append((key, i * STRIDE))
        self._keys = np.sort(np.fromiter(self.blocks, dtype=np.uint64, count=len(self.blocks)))
        self._seen = np.zeros(_FILTER, dtype=bool)  # a one-hash Bloom filter: most windows stop here
        self._seen[(self._keys & np.uint64(_FILTER - 1)).astype(np.int64)] = True

    @classmethod
    def of(cls, skills, tokenizer) -> SpanIndex:
        """The index of `skills` (a list of skillkv.skills.Skill, e.g. a LoadResult's `skills`) under `tokenizer`,
        built once per list: a new list (the folder read again) builds a new index."""
        key = (id(skills), id(tokenizer))
        held = cls._CACHE.get(key)
        if held is None or held[0] is not skills:
            forms, heads = {}, {}
            for s in skills:
                for form, (text, head) in forms_of(s).items():
                    forms[(s.name, form)] = tokenizer.encode(text, add_special_tokens=False)
                    heads[(s.name, form)] = len(tokenizer.encode(head, add_special_tokens=False)) if head else 0
            if len(cls._CACHE) > 8:
                cls._CACHE.clear()
            held = cls._CACHE[key] = (skills, cls(forms, heads))  # the list held: its id is not reused meanwhile
        return held[1]

    def find(self, ids: list[int]) -> list[Span]:
        """The skills' spans in `ids`, non-overlapping, in prompt order."""
        if not self.blocks or len(ids) < BLOCK:
            return []
        ids = ids.tolist() if isinstance(ids, np.ndarray) else ids
        prompt = np.asarray(ids, dtype=np.int64)  # one conversion of the list (most of the cost)
        hashes = window_hashes(prompt)
        maybe = np.flatnonzero(self._seen[(hashes & np.uint64(_FILTER - 1)).astype(np.int64)])
        at = np.minimum(np.searchsorted(self._keys, hashes[maybe]), len(self._keys) - 1)
        hits = maybe[self._keys[at] == hashes[maybe]]
        found: list[Span] = []
        done: dict[tuple, int] = {}  # (form, alignment) -> end of the stretch already covered
        for p, h in zip(hits.tolist(), hashes[hits].tolist()):
            for key, k in self.blocks[h]:
                align = p - k
                if done.get((key, align), -1) > p:
                    continue
                span = self._extend(ids, prompt, key, p, k)
                if span is not None:
                    done[(key, align)] = span.end
                    if span.end - span.start >= MIN_SPAN:
                        found.append(span)
        bodies = [s for s in found if s.form == "body"]
        found = [s for s in found if not self._body_only(s, bodies)]
        return _disjoint(found)

    def _body_only(self, s: Span, bodies: list[Span]) -> bool:
        """A file span that starts where the body does (give or take a token the wrapping merged) beside a body
        span it overlaps: the client sent the body, not the file."""
        head = self.head.get((s.skill, s.form), 0)
        return s.form == "file" and head > 0 and s.at >= head - 2 and any(
            b.skill == s.skill and b.start < s.end and s.start < b.end for b in bodies)

    def _extend(self, ids: list[int], prompt: np.ndarray, key: tuple[str, str], p: int, k: int) -> Span | None:
        """The stretch where the prompt and the form agree around prompt[p] = form[k], or None for a hash collision.
        The first MIN_SPAN tokens each way are compared in Python (near-duplicate text stops there, cheaply), the
        rest by numpy."""
        form, items = self.forms[key], self.items[key]
        ahead, behind = min(len(ids) - p, len(items) - k), min(p, k)
        f, lim = 0, min(ahead, MIN_SPAN)
        while f < lim and ids[p + f] == items[k + f]:
            f += 1
        if f < BLOCK:
            return None
        b, limb = 0, min(behind, MIN_SPAN)
        while b < limb and ids[p - 1 - b] == items[k - 1 - b]:
            b += 1
        if f == lim < ahead:
            f += _agree(prompt[p + f:], form[k + f:])
        if b == limb < behind:
            b += _agree(prompt[:p - b][::-1], form[:k - b][::-1])
        return Span(key[0], key[1], p - b, p + f, k - b, len(form))


def _agree(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements of `a` and `b` are equal (compared in growing pieces: a short agreement costs a
    short comparison)."""
    n, i, step = min(len(a), len(b)), 0, 32
    while i < n:
        j = min(n, i + step)
        diff = np.flatnonzero(a[i:j] != b[i:j])
        if len(diff):
            return i + int(diff[0])
        i, step = j, step * 4
    return n


def _disjoint(spans: list[Span]) -> list[Span]:
    """Longest first, dropping any span that overlaps one kept; then in prompt order."""
    kept: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start - s.end, s.start)):
        if all(s.end <= o.start or o.end <= s.start for o in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


def forms_of(skill) -> dict[str, tuple[str, str]]:
    """The texts a client sends of `skill`, each with its head that is never an anchor: its body (no head), and its
    SKILL.md as is where the body is in it (the frontmatter before the body as the head)."""
    forms = {"body": (skill.body, "")}
    try:
        text = (skill.path / "SKILL.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return forms
    at = text.find(skill.body.strip()[:200]) if skill.body.strip() else -1
    if at >= 0:
        forms["file"] = (text, text[:at])
    return forms
