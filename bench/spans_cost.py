"""What finding skills in a prompt costs beside tokenizing it (issue 23's goal: < 2% with 100 skills in the store).

    .venv/bin/python bench/spans_cost.py [--skills 100] [--rounds 30]

100 skills: the repository's and tests/data/public-skills' (21), each also copied with its lines numbered (so every
copy's tokens differ), up to the count. Prompts in an agent's shape: a catalog of every skill (~12k tokens for these
100), then turns of tool output (log lines: text that matches no skill) with one skill body in a tool result, grown
to 12k, 24k and 48k tokens. Per prompt: the median time to tokenize its text (the tokenizers library, as `render`
does) and to find its spans (select/spans.py), over interleaved rounds; the spans found.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skillkv.model import resolve_model  # noqa: E402
from skillkv.select.spans import SpanIndex  # noqa: E402
from skillkv.skills import load_skills  # noqa: E402


def skills(count: int) -> list:
    base = load_skills(ROOT / "skills").skills + load_skills(ROOT / "tests" / "data" / "public-skills").skills
    out, copy = list(base), 1
    while len(out) < count:
        for s in base[:count - len(out)]:
            lines = [f"{copy}.{i} {ln}" for i, ln in enumerate(s.body.splitlines())]
            out.append(type(s)(name=f"{s.name}-{copy}", description=s.description, body="\n".join(lines),
                               path=s.path / "no-such-folder"))  # no SKILL.md: the copy's body form only
        copy += 1
    return out


def prompt(all_skills: list, loaded, tokens: int, tok) -> str:
    catalog = "".join(f"- {s.name}: {s.description}\n" for s in all_skills)
    parts = [f"<|im_start|>system\nYou are an agent.\n# Skills\n{catalog}<|im_end|>\n",
             f"<|im_start|>user\nUse {loaded.name}.<|im_end|>\n",
             f"<|im_start|>user\n<tool_response>\n{loaded.body}\n</tool_response><|im_end|>\n"]
    rng = random.Random(0)
    while len(tok.encode("".join(parts), add_special_tokens=False)) < tokens:
        text = "\n".join(f"{rng.randrange(10**5):05d} INFO worker-{rng.randrange(64)} handled {rng.getrandbits(48):012x} "
                         f"in {rng.random() * 90:.1f} ms" for _ in range(60))
        parts.insert(-1, f"<|im_start|>user\n<tool_response>\n{text}\n</tool_response><|im_end|>\n")
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skills", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    tok = resolve_model("default", device="cpu").tokenizer
    every = skills(args.skills)
    t = time.perf_counter()
    index = SpanIndex.of(every, tok)
    print(f"{len(every)} skills, {len(index.forms)} forms, {len(index.blocks)} indexed blocks, "
          f"index built in {time.perf_counter() - t:.2f} s")
    print("| prompt tokens | tokenize ms | find spans ms | find / tokenize | spans found |")
    print("|---|---|---|---|---|")
    for size in (12000, 24000, 48000):
        text = prompt(every, every[2], size, tok)
        ids = tok.encode(text, add_special_tokens=False)
        enc, find = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            tok.encode(text, add_special_tokens=False)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            spans = index.find(ids)
            find.append(time.perf_counter() - t)
        e, f = statistics.median(enc) * 1e3, statistics.median(find) * 1e3
        found = ", ".join(f"{s.skill}/{s.form} {s.end - s.start}/{s.tokens}" for s in spans)
        print(f"| {len(ids):,} | {e:.2f} | {f:.3f} | {f / e:.1%} | {found} |")


if __name__ == "__main__":
    main()
