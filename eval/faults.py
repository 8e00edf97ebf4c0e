"""`make faults`: the fault-injection campaign of issue 12 on the real default model; writes docs/RELIABILITY.md.

Not part of `make test` (about 20 minutes on 2 CPU cores). Uses only the public API (SkillKV.compile / ask / gc /
snapshots, Store) and the CLI. Sections:
  1. snapshot and index faults (eval/fault_inject.py), >= 200 trials: each restores a pristine store, damages one
     snapshot or the index, and reads every snapshot back as a fresh process would (each must verify and equal the
     pristine KV, or be refused: never served damaged); every 5th trial also answers in exact mode with a fresh
     SkillKV (the answer must equal the clean full-prefill answer token for token), then compiles and checks the
     store healed. Stale snapshots (the skill edited) are trials too (exact == full on the edited skill).
  2. >= 50 kill -9 trials landing mid-compile (a skill edited before each: a new snapshot to write), and 10 more
     on `compile --force`; 3. 4 concurrent compiles on one store; 4. gc --max-bytes caps;
  5. a full disk (a small tmpfs store).
A sentinel folder beside the store is hashed before and after: 0 files touched outside the store.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_inject import FAULTS  # noqa: E402
from faults_procs import REPO, concurrent, full_disk, gc_caps, kill_trials  # noqa: E402

from skillkv.api import SkillKV  # noqa: E402
from skillkv.errors import SnapshotError  # noqa: E402
from skillkv.generate import SamplingParams  # noqa: E402
from skillkv.store import Store  # noqa: E402

SKILLS = ["git-commit-messages", "release-notes", "python-debugging"]
QUESTIONS = {"git-commit-messages": "How long should a commit subject line be?",
             "release-notes": "Which sections do release notes have?",
             "python-debugging": "How do I start the Python debugger at a line?"}
PARAMS = SamplingParams(max_tokens=24)


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or p.is_file():
            out[str(p.relative_to(root))] = (os.readlink(p) if p.is_symlink()
                                             else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def read_all(store: Store, pristine: dict) -> tuple[int, int, int]:
    """(intact, refused, wrong) over every pristine snapshot, read back through a fresh Store."""
    intact = refused = wrong = 0
    for key, snap in pristine.items():
        try:
            got = store.get(key, token_ids=snap.token_ids)
        except SnapshotError:
            refused += 1
            continue
        same = all(torch.equal(a, b) for a, b in zip(got.keys + got.values, snap.keys + snap.values))
        intact += same
        wrong += not same
    return intact, refused, wrong


def snapshot_trials(work: Path, kv: SkillKV, n: int, rng: random.Random, ctx: dict, refs: dict, log) -> dict:
    store_root, pristine_root = kv.store_root, work / "pristine"
    shutil.copytree(store_root, pristine_root, symlinks=True)
    base = Store(store_root, kv.tag, kv.fingerprint)
    pristine = {k: base.get(k) for k in base.entries()}
    files = {e.file: e.skill for e in base.entries().values()}
    res = {name: dict(trials=0, refused=0, intact=0, answered=0) for name in FAULTS}
    totals = dict(trials=0, wrong_kv=0, wrong_answers=0, tracebacks=0, healed=0, answered=0, unhealed=0)
    kinds = list(FAULTS)
    for i in range(n):
        name = kinds[i % len(kinds)]
        shutil.rmtree(store_root)
        shutil.copytree(pristine_root, store_root, symlinks=True)
        victim = rng.choice(sorted(files))
        totals["trials"] += 1
        res[name]["trials"] += 1
        try:
            FAULTS[name](store_root / kv.tag, victim, rng, ctx)
            intact, refused, wrong = read_all(Store(store_root, kv.tag, kv.fingerprint), pristine)
            res[name]["refused"] += refused
            res[name]["intact"] += intact
            totals["wrong_kv"] += wrong
            if i % 5 == 0:  # the victim may be the compose stand-in's snapshot: then ask about the first skill
                skill = files[victim] if files[victim] in QUESTIONS else SKILLS[0]
                fresh = SkillKV(model="default", store=store_root, skills=kv.skills_dir, device="cpu",
                                on_warning=lambda w: None)
                a = fresh.ask(QUESTIONS[skill], skills=[skill], mode="exact", params=PARAMS)
                totals["answered"] += 1
                res[name]["answered"] += 1
                totals["wrong_answers"] += a.output_token_ids != refs[skill]
                fresh.compile(verify=True)  # also repairs a damaged snapshot the ask did not read
                healed = read_all(Store(store_root, kv.tag, kv.fingerprint), pristine)
                totals["healed"] += healed[1] == healed[2] == 0
                totals["unhealed"] += healed[1] + healed[2] > 0
        except Exception as e:  # noqa: BLE001 - counted: the campaign's point is that none happens
            totals["tracebacks"] += 1
            log(f"TRACEBACK in {name}: {type(e).__name__}: {e}")
        log(f"trial {i + 1}/{n} {name} on {victim[:24]}: {res[name]}")
    shutil.rmtree(store_root)
    shutil.copytree(pristine_root, store_root, symlinks=True)
    return dict(totals=totals, by_fault=res)


def stale_trials(kv: SkillKV, n: int, log) -> dict:
    out = dict(trials=0, exact_equals_full=0, tracebacks=0)
    for i in range(n):
        skill = SKILLS[i % len(SKILLS)]
        md = kv.skills_dir / skill / "SKILL.md"
        old = md.read_text()
        md.write_text(old + f"\nNote {i}: this line makes the stored snapshot stale.\n")
        try:
            fresh = SkillKV(model="default", store=kv.store_root, skills=kv.skills_dir, device="cpu",
                            on_warning=lambda w: None)
            exact = fresh.ask(QUESTIONS[skill], skills=[skill], mode="exact", params=PARAMS)
            full = fresh.ask(QUESTIONS[skill], skills=[skill], mode="full", params=PARAMS)
            out["exact_equals_full"] += exact.output_token_ids == full.output_token_ids
        except Exception as e:  # noqa: BLE001
            out["tracebacks"] += 1
            log(f"TRACEBACK in stale: {type(e).__name__}: {e}")
        finally:
            md.write_text(old)
            out["trials"] += 1
        log(f"stale {i + 1}/{n}: {out}")
    return out


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
               "0")
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=224)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--stale", type=int, default=8)
    ap.add_argument("--force-kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="skillkv-faults-"))
    logf = open(work / "faults.log", "w")

    def log(msg: str) -> None:
        msg = f"{time.perf_counter() - t_start:7.1f}s {msg}"
        print(msg, file=logf, flush=True)
        print(msg, flush=True)

    sentinel = work / "sentinel"
    sentinel.mkdir()
    (sentinel / "precious.txt").write_text("must never be touched\n")
    (sentinel / "notes.md").write_text("outside the store\n")
    before = tree_digest(sentinel)
    skills = work / "skills"
    skills.mkdir()
    for s in SKILLS:
        shutil.copytree(REPO / "skills" / s, skills / s)
    (work / "outside").mkdir()
    kv = SkillKV(model="default", store=work / "store", skills=skills, device="cpu")
    kv.compile()
    refs = {s: kv.ask(q, skills=[s], mode="full", params=PARAMS).output_token_ids for s, q in QUESTIONS.items()}
    other = SkillKV(model="dummy:tiny", store=work / "other-store", skills=skills, device="cpu")
    other.compile(names=[SKILLS[0]])
    ctx = dict(sentinel_file=sentinel / "precious.txt", outside_dir=work / "outside",
               other_model_file=next((work / "other-store").rglob("*.safetensors")))
    report = {"snapshot_faults": snapshot_trials(work, kv, args.trials, rng, ctx, refs, log),
              "stale": stale_trials(kv, args.stale, log)}
    report["kill9"] = kill_trials(skills, work / "kill-store", kv.tag, kv.fingerprint, args.kills, rng, log,
                                  only=tuple(SKILLS[:2]))
    report["kill9_force"] = kill_trials(skills, work / "force-store", kv.tag, kv.fingerprint, args.force_kills, rng,
                                        log, only=tuple(SKILLS[:2]), force=True)
    report["concurrent"] = concurrent(skills, work / "conc-store", kv.tag, kv.fingerprint, 1, log)
    report["gc"] = gc_caps(skills, work / "gc-store", kv.tag, kv.fingerprint, log)
    report["full_disk"] = full_disk(skills, work, kv.tag, kv.fingerprint, SKILLS[0], log)
    report["outside_touched"] = sum(1 for k in set(before) | set(tree_digest(sentinel))
                                    if before.get(k) != tree_digest(sentinel).get(k))
    report["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    report["machine"] = machine()
    report["date"] = datetime.date.today().isoformat()
    log(json.dumps(report, indent=1))
    from faults_report import write_doc

    write_doc(args.doc, report)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
