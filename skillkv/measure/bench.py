"""`skillkv bench` on the CPU with the default model: the numbers in docs/BENCHMARKS.md.

Every ratio is computed from medians measured side by side in one run, in one process, after a warm-up.
Scenarios:
  compile        seconds per 1k skill tokens (fresh store)
  snapshot size  bytes per token, raw and zstd (byte-plane shuffled), ratio, decompression GB/s on real KV
  ttft           first-token time, exact (snapshot from the store, question prefilled; and again with the KV still
                 resident in the pool, as a second question or `serve` finds it) vs full (no cache), at ~500 and
                 ~2,000 skill tokens; the answers are checked to be identical
  decode         tokens/s of a greedy answer over the ~2,000-token skill (exact mode, 64 tokens at most)
  cold process   wall time of a fresh `skillkv ask --max-tokens 1` process (import, model load, snapshot, token),
                 and of a fresh `skillkv ls` (no model computation: neither torch nor transformers is imported)
  batch          100 questions over shared skills in one process, exact vs full: questions/s, prefill tokens
  reference      the same first-token, decode and cold-process measurements on the transformers runner
                 (`--engine hf`, the CPU path before the lean runner became the default), in the same run
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from skillkv.generate import SamplingParams

SIZES = {"~500": "git-commit-messages", "~2000": "gpu-performance"}
BATCH_SKILLS = ["git-commit-messages", "release-notes"]
QUESTION = "Summarise the most important rule in one sentence."


def machine() -> dict:
    from importlib.metadata import version

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python":
            platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "date": time.strftime("%Y-%m-%d"),
            "load_average": round(os.getloadavg()[0], 2)}


def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 1)


def bench_compile(kv) -> dict:
    results = kv.compile()
    done = [r for r in results if r.status in ("compiled", "recompiled")]
    tokens = sum(r.tokens for r in done)
    secs = sum(r.seconds for r in done)
    return {"skills": len(done), "tokens": tokens, "seconds": round(secs, 2),
            "seconds_per_1k_tokens": round(secs / tokens * 1000, 2),
            "per_skill": [{"skill": r.skill, "tokens": r.tokens, "seconds": round(r.seconds, 2)} for r in done]}


def bench_zstd(kv) -> dict:
    from skillkv.snapshot import decode, encode

    skill = kv.pick([SIZES["~2000"]])[0]
    key = kv.compiler.keys([skill])[0]
    snap = kv.snapshots.get(key)
    raw = encode(snap, "none")
    t0 = time.perf_counter()
    comp = encode(snap, "zstd")
    t_comp = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        decode(comp)
        times.append(time.perf_counter() - t0)
    raw_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        decode(raw)
        raw_times.append(time.perf_counter() - t0)
    kv_bytes = snap.nbytes
    return {"skill": skill.name, "tokens": snap.n_tokens, "dtype": str(snap.keys[0].dtype),
            "raw_bytes_per_token": round(len(raw) / snap.n_tokens), "zstd_bytes_per_token":
            round(len(comp) / snap.n_tokens), "ratio": round(len(raw) / len(comp), 3),
            "compress_gb_s": round(kv_bytes / t_comp / 1e9, 3),
            "decode_zstd_ms": median_ms(times), "decode_raw_ms": median_ms(raw_times),
            "decompress_gb_s": round(kv_bytes / statistics.median(times) / 1e9, 3),
            "threads": min(8, os.cpu_count() or 1)}


def bench_ttft(kv, reps: int, sizes: dict[str, str] = SIZES) -> list[dict]:
    rows = []
    params = SamplingParams(max_tokens=1)
    for label, name in sizes.items():
        kv.ask(QUESTION, [name], mode="exact", params=params)  # warm-up (and compile if needed)
        kv.ask(QUESTION, [name], mode="full", params=params)
        ex, res, fu, same = [], [], [], True
        for _ in range(reps):
            kv.forget_resident()  # every exact run reads and verifies its snapshot from the store
            a = kv.ask(QUESTION, [name], mode="exact", params=params)
            c = kv.ask(QUESTION, [name], mode="exact", params=params)  # the KV still resident (serve, a 2nd ask)
            b = kv.ask(QUESTION, [name], mode="full", params=params)
            ex.append(a.timings_ms["ttft"] / 1e3)
            res.append(c.timings_ms["ttft"] / 1e3)
            fu.append(b.timings_ms["ttft"] / 1e3)
            same &= a.output_token_ids == b.output_token_ids == c.output_token_ids
        rows.append({"size": label, "skill": name, "skill_tokens": a.tokens["cached"],
                     "prompt_tokens": a.tokens["prompt"], "exact_ms": median_ms(ex), "full_ms": median_ms(fu),
                     "exact_resident_ms": median_ms(res),
                     "speedup": round(statistics.median(fu) / statistics.median(ex), 1),
                     "speedup_resident": round(statistics.median(fu) / statistics.median(res), 1),
                     "identical_first_token": same, "reps": reps})
    return rows


def bench_decode(kv, reps: int) -> dict:
    rates = []
    for _ in range(reps):
        a = kv.ask(QUESTION, [SIZES["~2000"]], mode="exact", params=SamplingParams(max_tokens=64))
        n = len(a.output_token_ids)
        rates.append((n - 1) / ((a.timings_ms["total"] - a.timings_ms["ttft"]) / 1e3))
    return {"tokens_per_s": round(statistics.median(rates), 1), "tokens": n, "reps": reps}


def bench_cold(store: Path, reps: int, engine: str = "auto", model: str | None = None) -> dict:
    exe = Path(sys.executable).parent / "skillkv"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "skillkv"]
    cmd = base + ["ask", QUESTION, "--skill", SIZES["~2000"], "--store", str(store), "--max-tokens", "1", "--json",
                  "--engine", engine] + (["--model", model] if model else [])
    walls, inner, ls = [], [], []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - t0)
        inner.append(json.loads(p.stdout.splitlines()[-1])["timings_ms"])
        t0 = time.perf_counter()
        subprocess.run(base + ["ls", "skills", "--store", str(store), "--json"], capture_output=True, check=True)
        ls.append(time.perf_counter() - t0)
    walls, inner, ls = walls[1:], inner[1:], ls[1:]  # the first run warms the OS page cache
    return {"wall_ms": median_ms(walls), "model_load_ms": statistics.median(i["model_load"] for i in inner),
            "snapshot_load_ms": statistics.median(i["snapshot_load"] for i in inner),
            "ttft_in_process_ms": statistics.median(i["ttft"] for i in inner), "ls_wall_ms": median_ms(ls),
            "reps": reps}


def batch_questions(n: int) -> list[tuple[str, list[str]]]:
    topics = ["a bug fix", "a new feature", "a refactor", "a dependency bump", "a documentation change",
              "a security patch", "a performance improvement", "a breaking API change", "a test-only change",
              "a revert"]
    forms = ["How should I describe {} in a commit subject?", "What belongs in the release notes for {}?",
             "Give a one-line commit message for {}.", "Which changelog section fits {}?",
             "Should {} bump the major, minor or patch version?", "What should the commit body say for {}?",
             "Write a release-note bullet for {}.", "What trailer lines fit {}?",
             "How long may the subject line for {} be?", "Is {} worth a separate commit?"]
    qs = [f.format(t) for f in forms for t in topics][:n]
    return [(q, BATCH_SKILLS if i % 2 else BATCH_SKILLS[:1]) for i, q in enumerate(qs)]


def bench_batch(kv, n: int) -> dict:
    params = SamplingParams(max_tokens=4)
    items = batch_questions(n)
    out = {}
    answers = {}
    for mode in ("exact", "full"):
        kv.forget_resident()
        t0 = time.perf_counter()
        prefill = 0
        answers[mode] = []
        for q, skills in items:
            a = kv.ask(q, skills, mode=mode, params=params)
            prefill += a.tokens["computed"]
            answers[mode].append(a.output_token_ids)
        dt = time.perf_counter() - t0
        out[mode] = {"seconds": round(dt, 2), "questions_per_s": round(n / dt, 2), "prefill_tokens": prefill}
    out["questions"] = n
    out["speedup"] = round(out["exact"]["questions_per_s"] / out["full"]["questions_per_s"], 1)
    out["prefill_token_ratio"] = round(out["full"]["prefill_tokens"] / max(1, out["exact"]["prefill_tokens"]), 1)
    out["identical_answers"] = sum(a == b for a, b in zip(answers["exact"], answers["full"]))
    return out


def markdown(r: dict) -> str:
    m, c, z = r["machine"], r["compile"], r["zstd"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
             f"OMP_WAIT_POLICY {m.get('omp_wait_policy', '?')}, load average {m.get('load_average', '?')} at the "
             f"start: the cores are shared), Python {m['python']}, torch {m['torch']}, transformers "
             f"{m['transformers']} (not imported by `ask`); model {r['model']} ({r['dtype']}), engine "
             f"{r.get('engine', '?')}. Medians; ratios from the same run. Regenerate: `make bench`.", "",
             "| what | measured |", "|---|---|",
             f"| compile | {c['seconds_per_1k_tokens']} s per 1k tokens ({c['tokens']} tokens in {c['skills']} "
             f"skills, {c['seconds']} s) |",
             f"| snapshot size, raw | {z['raw_bytes_per_token']:,} bytes/token ({z['dtype']}) |",
             f"| snapshot size, zstd (byte-plane shuffled) | {z['zstd_bytes_per_token']:,} bytes/token, ratio "
             f"{z['ratio']} |",
             f"| zstd compress / decompress ({z['threads']} threads, {z['tokens']}-token skill) | "
             f"{z['compress_gb_s']} / {z['decompress_gb_s']} GB/s; decode {z['decode_zstd_ms']} ms vs raw "
             f"{z['decode_raw_ms']} ms |"]
    for t in r["ttft"]:
        lines.append(f"| first token, {t['skill_tokens']} skill tokens ({t['skill']}) | exact {t['exact_ms']} ms (snapshot "
                     f"read from the store) vs full {t['full_ms']} ms: **{t['speedup']}x**; KV already resident "
                     f"{t.get('exact_resident_ms', '-')} ms: **{t.get('speedup_resident', '-')}x**; same first token: "
                     f"{t['identical_first_token']} |")
    d = r["decode"]
    lines.append(f"| decode, exact mode over {r['ttft'][-1]['skill_tokens']} skill tokens | {d['tokens_per_s']} "
                 f"tokens/s ({d['tokens']} tokens) |")
    cp = r["cold"]
    lines.append(f"| cold `skillkv ask` process to first token | {cp['wall_ms']} ms wall (model load "
                 f"{cp['model_load_ms']} ms, snapshot load {cp['snapshot_load_ms']} ms, first token "
                 f"{cp['ttft_in_process_ms']} ms in process) |")
    lines.append(f"| cold `skillkv ls` process | {cp['ls_wall_ms']} ms wall |")
    b = r["batch"]
    lines.append(f"| batch of {b['questions']} questions, 4 answer tokens | exact {b['exact']['questions_per_s']} q/s "
                 f"vs full {b['full']['questions_per_s']} q/s: **{b['speedup']}x**; prefill tokens "
                 f"{b['exact']['prefill_tokens']:,} vs {b['full']['prefill_tokens']:,} ({b['prefill_token_ratio']}x "
                 f"fewer); identical answers {b['identical_answers']}/{b['questions']} |")
    if "reference" in r:
        lines += reference_rows(r)
    return "\n".join(lines)


def reference_rows(r: dict) -> list[str]:
    """Lean runner vs the transformers runner (`--engine hf`), measured in the same run."""
    ref, lean = r["reference"], r["ttft"][-1]
    t, d, c = ref["ttft"], ref["decode"], ref["cold"]
    return [f"| transformers runner (`--engine hf`), first token, {t['skill_tokens']} skill tokens | exact "
            f"{t['exact_ms']} ms vs full {t['full_ms']} ms: {t['speedup']}x; the lean runner's exact is "
            f"**{round(t['exact_ms'] / lean['exact_ms'], 1)}x** faster |",
            f"| transformers runner, decode | {d['tokens_per_s']} tokens/s; the lean runner "
            f"**{round(r['decode']['tokens_per_s'] / d['tokens_per_s'], 2)}x** that |",
            f"| transformers runner, cold `skillkv ask` process | {c['wall_ms']} ms wall; the lean runner "
            f"**{round(c['wall_ms'] / r['cold']['wall_ms'], 1)}x** faster |"]


def update_doc(doc: Path, section: str, text: str) -> None:
    """Replace the text between <!-- section:begin --> and <!-- section:end --> in `doc`."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    body = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in body:
        body += f"\n{begin}\n{end}\n"
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def bench_reference(model: str | None, store: Path, device: str | None, reps: int) -> dict:
    """The transformers runner over the same store (its snapshots are its own: another fingerprint) at ~2,000 skill
    tokens: first token exact vs full, decode, and a cold process, for the lean runner's rows to be read against."""
    from skillkv.api import SkillKV

    ref = SkillKV(model=model, store=store, skills="skills", device=device, engine="hf")
    ref.runner
    ttft = bench_ttft(ref, reps, {"~2000": SIZES["~2000"]})[0]
    decode = bench_decode(ref, reps)
    cold = bench_cold(store, max(2, reps - 2), "hf", model)
    return {"engine": ref.engine, "ttft": ttft, "decode": decode, "cold": cold}


def run_bench(model: str | None = None, out: Path = Path("bench_out"), quick: bool = False,
              device: str | None = None, doc: Path | None = Path("docs/BENCHMARKS.md")) -> dict:
    from skillkv.api import SkillKV

    out.mkdir(parents=True, exist_ok=True)
    reps = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="skillkv-bench-") as tmp:
        store = Path(tmp) / "store"
        kv = SkillKV(model=model, store=store, skills="skills", device=device)
        kv.runner  # load the model outside the timed parts
        print("bench: compile", file=sys.stderr)
        r = {"machine": machine(), "model": kv.handle.name, "dtype": str(kv.handle.dtype).replace("torch.", ""),
             "engine": kv.engine}
        r["compile"] = bench_compile(kv)
        print("bench: zstd", file=sys.stderr)
        r["zstd"] = bench_zstd(kv)
        print("bench: first token", file=sys.stderr)
        r["ttft"] = bench_ttft(kv, reps)
        print("bench: decode", file=sys.stderr)
        r["decode"] = bench_decode(kv, 3 if quick else 5)
        print("bench: cold process", file=sys.stderr)
        r["cold"] = bench_cold(store, 2 if quick else 3, model=model)
        print("bench: batch", file=sys.stderr)
        r["batch"] = bench_batch(kv, 20 if quick else 100)
        if kv.engine != "hf":
            print("bench: the transformers runner, for reference", file=sys.stderr)
            kv.forget_resident()
            r["reference"] = bench_reference(model, store, device, 2 if quick else 5)
    (out / "cpu.json").write_text(json.dumps(r, indent=1))
    md = markdown(r)
    print(md)
    if doc is not None and not quick:
        update_doc(doc, "cpu", md)
    return r
