"""How well a neighbour text stands in for a real predecessor, without questions (skillkv.compose.repair, NEIGHBOUR).

For ordered pairs (a, b) of the project's own skills (skills/, disjoint from eval/compose), compare skill b's KV
as compose places it (compiled after [preamble][candidate], re-rotated to follow a) with a true prefill of
[preamble][a][b]: relative error per layer of keys and values, averaged. Lower is better; "none" places b's
single-skill rows (compose `plain`). Candidates: the shipped NEIGHBOUR and any text files given.

    .venv/bin/python eval/neighbour_criterion.py [--max-tokens 400] [--skills a,b,c] [candidate.md ...]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch

from skillkv.compose.neighbour import NEIGHBOUR
from skillkv.engine.rope import rerotate, rope_delta
from skillkv.api import SkillKV
from skillkv.skills import Skill

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("candidates", nargs="*", type=Path, help="text files: the body of a stand-in skill")
    ap.add_argument("--max-tokens", type=int, default=0, help="truncate each skill (0: whole skills)")
    ap.add_argument("--skills", default="", help="comma-separated skill names (default: all in skills/)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    kv = SkillKV(store=Path(tempfile.mkdtemp()), skills=ROOT / "skills", device="cpu")
    runner, rot = kv.runner, kv.runner.model.model.rotary_emb
    skills = [s for s in kv.load_skills().skills if not args.skills or s.name in args.skills.split(",")]
    pre = kv.builder.preamble_ids()
    cands: dict[str, Skill | None] = {"none": None, "NEIGHBOUR": NEIGHBOUR}
    for p in args.candidates:
        cands[p.stem] = Skill(name=p.stem, description=f"Reference for {p.stem}.", body=p.read_text(), path=p)

    def kv_of(ids: list[int]):
        cache = runner.new_cache()
        runner.forward(ids, cache)
        return runner.slice_kv(cache, 0, len(ids))

    cut = (lambda ids: ids[:args.max_tokens]) if args.max_tokens else (lambda ids: ids)
    for name, nb in cands.items():
        nb_ids = kv.builder.skill_ids(nb) if nb else []
        errs = []
        for a, b in itertools.permutations(skills, 2):
            a_ids, b_ids = cut(kv.builder.skill_ids(a)), cut(kv.builder.skill_ids(b))
            true, placed = kv_of(pre + a_ids + b_ids), kv_of(pre + nb_ids + b_ids)
            ctx, start = len(pre) + len(nb_ids), len(pre) + len(a_ids)
            cos, sin = rope_delta(rot, start - ctx, "cpu")
            e = 0.0
            for (tk, tv), (k, v) in zip(true, placed):
                e += float((rerotate(k[ctx:], cos, sin) - tk[start:]).norm() / tk[start:].norm())
                e += float((v[ctx:] - tv[start:]).norm() / tv[start:].norm())
            errs.append(e / (2 * len(true)))
        print(f"{name:12s} {len(nb_ids):5d} tokens  mean relative KV error {sum(errs) / len(errs):.4f}  "
              f"({len(errs)} pairs)", flush=True)


if __name__ == "__main__":
    main()
