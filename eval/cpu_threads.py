"""Threads and OpenMP's wait policy on the lean CPU runner, measured (issue 15): which settings the CLI should use.

    .venv/bin/python eval/cpu_threads.py [--store DIR] [--reps 5] [--busy N] [--settings W,W] [--rounds N]

For each setting of OpenMP's waiting (OMP_WAIT_POLICY PASSIVE, ACTIVE or unset: torch's libgomp then spins
300,000 times before sleeping; GOMP_SPINCOUNT bounds that spin) and torch threads (1, 2), a fresh process loads the
default model on the lean runner and measures, on the ~2,000-token skill: the cached first token (exact mode: the
KV resident, and read from the store), a full prefill's first token and greedy decode tokens/s (64 tokens).
Medians of --reps. The machine's load average before each process is printed. --busy N runs N spinning processes
alongside (a machine shared with other work: what made PASSIVE the default).
Writes docs/results/cpu-threads-<date>[-busyN].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from skillkv.api import SkillKV
from skillkv.generate import SamplingParams
kv = SkillKV(model="default", store=sys.argv[1], skills="skills")
reps, skill, q = int(sys.argv[3]), "gpu-performance", "Summarise the most important rule in one sentence."
one = SamplingParams(max_tokens=1)
kv.ask(q, [skill], mode="exact", params=one)
kv.ask(q, [skill], mode="full", params=one)
ex = [kv.ask(q, [skill], mode="exact", params=one).timings_ms["ttft"] for _ in range(reps)]
st = []
for _ in range(reps):
    kv.forget_resident()
    st.append(kv.ask(q, [skill], mode="exact", params=one).timings_ms["ttft"])
fu = [kv.ask(q, [skill], mode="full", params=one).timings_ms["ttft"] for _ in range(max(2, reps - 2))]
rates = []
for _ in range(max(2, reps - 2)):
    a = kv.ask(q, [skill], mode="exact", params=SamplingParams(max_tokens=64))
    rates.append((len(a.output_token_ids) - 1) / ((a.timings_ms["total"] - a.timings_ms["ttft"]) / 1e3))
print(json.dumps({"engine": kv.engine, "exact_ms": round(statistics.median(ex), 1),
                  "store_ms": round(statistics.median(st), 1),
                  "full_ms": round(statistics.median(fu), 1), "decode_tok_s": round(statistics.median(rates), 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="cache_store")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--settings", default="", help="comma-separated waits to run with 2 threads (default: all 7 "
                    "rows), e.g. PASSIVE,unset,GOMP_SPINCOUNT=20000")
    ap.add_argument("--rounds", type=int, default=1, help="run the settings this many times, interleaved; each row "
                    "reports the median of its rounds (the cores are shared: rounds spread the noise evenly)")
    args = ap.parse_args()
    settings = [(w, 2) for w in args.settings.split(",")] if args.settings else SETTINGS
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        runs = [[measure(policy, threads, args) for policy, threads in settings] for _ in range(args.rounds)]
    finally:
        for p in busy:
            p.kill()
    rows = [dict(r[0], **{k: statistics.median(x[k] for x in r) for k in ("exact_ms", "store_ms", "full_ms",
                                                                           "decode_tok_s")}, rounds=r)
            for r in zip(*runs)]
    print("| waiting | threads | cached first token: resident / from the store | full prefill | full / cached "
          "(store) | decode | load before |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['wait']} | {r['threads']} | {r['exact_ms']} / {r['store_ms']} ms | {r['full_ms']} ms | "
              f"{round(r['full_ms'] / r['exact_ms'], 1)}x ({round(r['full_ms'] / r['store_ms'], 1)}x) | "
              f"{r['decode_tok_s']} tok/s | {r['load_before']} |")
    name = f"cpu-threads-{time.strftime('%Y-%m-%d')}" + (f"-busy{args.busy}" if args.busy else "") + (
        f"-{args.rounds}rounds" if args.rounds > 1 else "")
    (REPO / "docs" / "results" / f"{name}.json").write_text(json.dumps({"cpu_count": os.cpu_count(), "busy":
                                                                         args.busy, "rows": rows}, indent=1) + "\n")


SETTINGS = [("PASSIVE", 2), ("PASSIVE", 1), ("ACTIVE", 2), ("unset", 2), ("unset", 1), ("GOMP_SPINCOUNT=10000", 2),
            ("GOMP_SPINCOUNT=100000", 2)]


def measure(policy: str, threads: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO)
    if policy.startswith("GOMP_SPINCOUNT="):
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    elif policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    load = round(os.getloadavg()[0], 2)
    p = subprocess.run([sys.executable, "-c", CHILD, args.store, str(threads), str(args.reps)], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True)
    row = {"wait": policy, "threads": threads, "load_before": load, **json.loads(p.stdout.splitlines()[-1])}
    print(row, file=sys.stderr)
    return row


if __name__ == "__main__":
    main()
