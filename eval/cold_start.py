"""Where a cold `skillkv ask` process spends its time (issue 15's goal: first token <= 2 s on the lean runner).

    .venv/bin/python eval/cold_start.py [--store DIR] [--reps 3]

1. Wall time of fresh processes (median of --reps, after one warm-up run for the OS page cache): `--help`, an input
   error, `ls` and an up-to-date `compile` (neither imports torch), `ask --skill gpu-performance` (as `skillkv bench`
   measures it) and `ask` with automatic selection (which loads the embedding model, through transformers).
2. One fresh process timed phase by phase as the CLI runs it: the interpreter, typer and rich, torch, skillkv.api,
   resolving the model (config.json, tokenizer.json, chat template, fingerprint), reading the weights (safetensors)
   and building the lean runner, then one exact ask with --max-tokens 1.
The store needs gpu-performance and git-commit-messages compiled (`skillkv compile skills/ --store DIR`).
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
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the CLI sets (skillkv/cli/__init__.py); ACTIVE to compare

PHASES = r"""
import time, json, sys
t = [time.perf_counter()]
out = {}
def mark(name):
    now = time.perf_counter(); out[name] = round(now - t[0], 3); t[0] = now
import skillkv.cli, rich.console, rich.table; mark("import the CLI (typer, rich)")
from skillkv.api import SkillKV; mark("import skillkv.api (no torch)")
import torch; mark("import torch")
import skillkv.engine.llama, skillkv.runners.paged; mark("import the lean runner")
kv = SkillKV(model="default", store=sys.argv[1], skills="skills"); mark("resolve model (config, tokenizer, fingerprint)")
kv.runner; mark("read weights (safetensors), build the runner")
from skillkv.generate import SamplingParams
a = kv.ask("Summarise the most important rule in one sentence.", ["gpu-performance"],
           params=SamplingParams(max_tokens=1)); mark("ask (snapshot load + prefill of the question)")
assert "transformers" not in sys.modules
print(json.dumps(out))
"""


def wall(argv: list[str], reps: int) -> float:
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "skillkv", *argv], capture_output=True, env=ENV, cwd=REPO)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="cache_store")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}; OMP_WAIT_POLICY={ENV['OMP_WAIT_POLICY']}")
    q = "Summarise the most important rule in one sentence."
    rows = [("skillkv --help", ["--help"]), ('skillkv ask "" (an input error)', ["ask", ""]),
            ("skillkv ls", ["ls", "skills", "--store", a.store]),
            ("skillkv compile (everything up to date)", ["compile", "skills", "--store", a.store]),
            ("ask --skill gpu-performance --max-tokens 1", ["ask", q, "--skill", "gpu-performance", "--store", a.store,
                                                            "--max-tokens", "1", "--json"]),
            ("ask (automatic selection) --max-tokens 1",
             ["ask", "How should I write the subject line of a git commit message?", "--store", a.store,
              "--max-tokens", "1", "--json"])]
    print("| fresh process | wall (median) |\n|---|---|")
    for name, argv in rows:
        print(f"| {name} | {wall(argv, a.reps):.2f} s |")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=ENV, cwd=REPO)
    start = time.perf_counter() - t0
    p = subprocess.run([sys.executable, "-c", PHASES, a.store], capture_output=True, text=True, env=ENV, cwd=REPO)
    phases = {"start and stop the interpreter (an empty `python -c pass`)": round(start, 3),
              **json.loads(p.stdout.splitlines()[-1])}
    print("\n| phase (one fresh process) | seconds |\n|---|---|")
    for k, v in phases.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| total | {sum(phases.values()):.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
