"""Threads and OpenMP's wait policy on the lean CPU runner, measured (issue 15): which settings the CLI should use.

    .venv/bin/python eval/cpu_threads.py [--store DIR] [--reps 5]

For every combination of OMP_WAIT_POLICY (PASSIVE: what the CLI sets; ACTIVE; unset: the OpenMP runtime's own
default) and torch threads (1, 2), a fresh process loads the default model on the lean runner and measures, on the
~2,000-token skill: the cached first token (exact mode, the snapshot in memory), a full prefill's first token and
greedy decode tokens/s (64 tokens). Medians of --reps. The machine's load average before each process is printed:
the numbers only mean something on an otherwise idle machine. Writes docs/results/cpu-threads-<date>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
fu = [kv.ask(q, [skill], mode="full", params=one).timings_ms["ttft"] for _ in range(max(2, reps - 2))]
rates = []
for _ in range(max(2, reps - 2)):
    a = kv.ask(q, [skill], mode="exact", params=SamplingParams(max_tokens=64))
    rates.append((len(a.output_token_ids) - 1) / ((a.timings_ms["total"] - a.timings_ms["ttft"]) / 1e3))
print(json.dumps({"engine": kv.engine, "exact_ms": round(statistics.median(ex), 1),
                  "full_ms": round(statistics.median(fu), 1), "decode_tok_s": round(statistics.median(rates), 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="cache_store")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for policy, threads in itertools.product(("PASSIVE", "ACTIVE", None), (2, 1)):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(REPO)}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        load = round(os.getloadavg()[0], 2)
        p = subprocess.run([sys.executable, "-c", CHILD, args.store, str(threads), str(args.reps)], env=env,
                           cwd=REPO, capture_output=True, text=True, check=True)
        row = {"omp_wait_policy": policy or "unset", "threads": threads, "load_before": load,
               **json.loads(p.stdout.splitlines()[-1])}
        rows.append(row)
        print(row, file=sys.stderr)
    print("| OMP_WAIT_POLICY | threads | cached first token | full prefill | decode | load before |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['omp_wait_policy']} | {r['threads']} | {r['exact_ms']} ms | {r['full_ms']} ms | "
              f"{r['decode_tok_s']} tok/s | {r['load_before']} |")
    out = REPO / "docs" / "results" / f"cpu-threads-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
