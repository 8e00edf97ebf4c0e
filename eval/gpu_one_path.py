"""One path on the GPU (issue 11's check): `skillkv compile` on CUDA, then `skillkv serve` over the same store.

    python eval/gpu_one_path.py --out DIR [--model dummy:llama-3.1-8b]

Checks, in one run, and prints a table last (JSON in DIR/one_path.json):
  1. `skillkv compile skills/ --device cuda` (a separate process) compiles every skill;
  2. a server over the same store starts without recompiling anything and the store holds one fingerprint folder;
  3. exact == full through serve for a single request (same output token ids; full computes everything);
  4. a skill evicted from the pool comes back through the tiers: from the host tier (written back when it was
     computed, or kept from its L2 read), and from L2 once the host tier is emptied too (the measured policy
     decides load or recompute; a snapshot in the OS page cache is read at the cached rate); the answer is the
     same every time;
  5. a two-skill compose request through serve succeeds (mode compose, repaired tokens reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{body.get('skills')} {body.get('mode')}: HTTP {e.code} {e.read()[:300]!r}") from None


def chat(q: str, skills: list[str], mode: str = "auto", max_tokens: int = 24) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
            "skills": skills, "mode": mode}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--store", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "skillkv-one-path")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": args.model}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "skillkv", "compile", str(REPO / "skills"), "--store", str(args.store),
                        "--model", args.model, "--device", args.device, "--json"], capture_output=True, text=True,
                       env=env, timeout=900)
    res["compile"] = {"exit": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
                      "stderr_tail": p.stderr[-800:]}
    if p.returncode == 0:
        out = json.loads(p.stdout.splitlines()[-1])
        res["compile"]["results"] = [(r["skill"], r["status"], r["tokens"]) for r in out["results"]]
    print(json.dumps(res["compile"], indent=1), flush=True)

    from skillkv.serve.server import ServeConfig, Server

    logs: list[str] = []
    t0 = time.perf_counter()
    srv = Server(ServeConfig(port=0, model=args.model, skills=REPO / "skills", store=args.store, device=args.device,
                             watch=False), log=logs.append).start_background(timeout=900)
    try:
        kv, runner = srv.kv, srv.worker.runner
        res["serve_start_s"] = round(time.perf_counter() - t0, 1)
        res["serve_log"] = logs[:]
        res["recompiled_by_serve"] = [ln for ln in logs if ln.startswith("compile:")]
        res["store_folders"] = sorted(d.name for d in args.store.iterdir() if d.is_dir())
        res["serve_fingerprint_folder"] = kv.tag
        res["runner"] = {"name": runner.name, **runner.usage()}
        q, skill = "How long should the subject line of a commit message be?", ["git-commit-messages"]
        exact = post(srv.url, chat(q, skill))
        full = post(srv.url, chat(q, skill, mode="full"))
        res["exact_vs_full"] = {
            "exact_mode": exact["skillkv"]["mode"], "full_mode": full["skillkv"]["mode"],
            "exact_tiers": exact["skillkv"]["tiers"], "exact_cached": exact["usage"]["skillkv"]["cached_tokens"],
            "full_cached": full["usage"]["skillkv"]["cached_tokens"],
            "identical": exact["skillkv"]["output_token_ids"] == full["skillkv"]["output_token_ids"],
            "tokens": len(exact["skillkv"]["output_token_ids"])}
        # evicted from the pool only: back from the host tier; then from the pool and the host tier: from L2
        srv.worker.call(lambda: runner.retire(lambda key: False)).result(60)
        host = post(srv.url, chat(q, skill))
        srv.worker.call(kv.forget_resident).result(60)
        l2 = post(srv.url, chat(q, skill))
        pol = kv.tiers._policy_value
        res["evicted"] = {"after_pool_eviction": host["skillkv"]["tiers"], "after_host_eviction": l2["skillkv"]["tiers"],
                          "same_answers": host["skillkv"]["output_token_ids"] == l2["skillkv"]["output_token_ids"]
                          == exact["skillkv"]["output_token_ids"],
                          "policy": None if pol is None else pol.m.to_json()}
        two = ["release-notes", "git-commit-messages"]
        comp = post(srv.url, chat("Write a commit subject for a release that fixes a crash.", two, mode="compose"))
        res["compose"] = {"mode": comp["skillkv"]["mode"], "tiers": comp["skillkv"]["tiers"],
                          "cached": comp["usage"]["skillkv"]["cached_tokens"],
                          "computed": comp["usage"]["skillkv"]["computed_tokens"],
                          "tokens": len(comp["skillkv"]["output_token_ids"])}
        res["health"] = json.loads(urllib.request.urlopen(srv.url + "/health").read())
    finally:
        srv.close()
    (args.out / "one_path.json").write_text(json.dumps(res, indent=1))
    skipped = [r for r in res["compile"].get("results", []) if r[1] == "skipped"]
    ok = {"compile ran (exit 0, or 1 with skills skipped by name)": res["compile"]["exit"] == 0
          or (res["compile"]["exit"] == 1 and skipped),
          "serve recompiled nothing": not res["recompiled_by_serve"],
          "one fingerprint folder": res["store_folders"] == [res["serve_fingerprint_folder"]],
          "exact == full through serve": res["exact_vs_full"]["identical"] and res["exact_vs_full"]["full_cached"] == 0
          and res["exact_vs_full"]["exact_cached"] > 0,
          "evicted skill back through the tiers": res["evicted"]["after_pool_eviction"] in (["host"], ["l2"])
          and res["evicted"]["same_answers"],
          "two-skill compose through serve": res["compose"]["mode"] == "compose"}
    res["checks"] = ok
    (args.out / "one_path.json").write_text(json.dumps(res, indent=1))
    print("\n| check | result |\n|---|---|")
    for k, v in ok.items():
        print(f"| {k} | {'ok' if v else 'FAILED'} |")
    print(f"| tiers after eviction (pool / pool+host) | {res['evicted']['after_pool_eviction']} / "
          f"{res['evicted']['after_host_eviction']} |")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
