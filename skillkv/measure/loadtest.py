"""The serve load test: many concurrent streaming clients over loopback, every answer checked against its solo answer.

    skillkv loadtest                                        # starts its own server (CPU default)
    skillkv loadtest --url http://127.0.0.1:8321          # against a running server
    skillkv loadtest --model dummy:llama-3.1-8b --device cuda --attention flashinfer   # the GPU shape

Bounded: `--requests` in all (over `--distinct` different prompts, questions from skillkv.measure.bench over its batch
skills, a quarter with skills chosen automatically), `--clients` threads each with a keep-alive connection, and
`--timeout` seconds for the whole run (clients stop taking requests at the deadline).

  1. solo: every distinct prompt is sent alone, one after the other (this also makes its skills hot): the
     reference answers; then 8 of them alone again (skills hot, same answers required): solo TTFT and tokens/s;
  2. load: the clients stream all requests at once; per request the time to the first content token (TTFT) and
     to the end; the answer's token ids must equal the solo answer's (greedy);
  3. report: TTFT p50/p99, latency p50/p99, output tokens/s and requests/s over the load phase, mismatches,
     errors; JSON to --out, Markdown to --doc between <!-- serve:begin/end --> (serve-gpu on CUDA).
The exit status is 1 when an answer differs from its solo answer or a request failed.
"""

from __future__ import annotations

import http.client
import json
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


@dataclass
class Result:
    index: int
    ttft: float | None = None
    latency: float = 0.0
    tokens: list[int] = field(default_factory=list)
    error: str = ""


def prompts(n: int, known: set[str]) -> list[dict]:
    from skillkv.measure.bench import batch_questions

    out = []
    for i, (q, skills) in enumerate(batch_questions(n)):
        if i % 4 == 3 or not set(skills) <= known:
            skills = None  # chosen by the server
        out.append({"q": q, "skills": skills})
    return out


def body(p: dict, max_tokens: int) -> dict:
    b = {"model": "default", "messages": [{"role": "user", "content": p["q"]}], "max_tokens": max_tokens,
         "stream": True, "stream_options": {"include_usage": True}}
    if p["skills"] is not None:
        b["skills"] = p["skills"]
    return b


class Client:
    """One keep-alive HTTP connection; `stream(body)` -> Result (timings from the request's send)."""

    def __init__(self, url: str, timeout: float):
        u = urlparse(url)
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.conn = None

    def stream(self, index: int, payload: dict) -> Result:
        r = Result(index)
        t0 = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request("POST", "/v1/chat/completions", json.dumps(payload),
                              {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
                return r
            while True:
                line = resp.readline()
                if not line:
                    r.error = "stream ended early"
                    break
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    resp.read()
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = obj["error"]["message"]
                    continue
                ch = obj.get("choices") or []
                if ch and (ch[0]["delta"].get("content") or ch[0].get("finish_reason")) and r.ttft is None:
                    r.ttft = time.perf_counter() - t0
                if "skillkv" in obj:
                    r.tokens = obj["skillkv"]["output_token_ids"]
        except (OSError, http.client.HTTPException, ValueError) as e:
            r.error = f"{type(e).__name__}: {e}"
            self.conn = None
        r.latency = time.perf_counter() - t0
        return r


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 1)


def run_load(url: str, clients: int, requests: int, distinct: int, max_tokens: int, timeout: float,
             log=print) -> dict:
    deadline = time.monotonic() + timeout
    with __import__("urllib.request").request.urlopen(url + "/skills", timeout=60) as f:
        known = {s["name"] for s in json.loads(f.read())["data"]}
    ps = prompts(min(distinct, requests), known)
    log(f"loadtest: solo answers for {len(ps)} distinct prompts")
    c = Client(url, timeout)
    solo = []
    for i, p in enumerate(ps):
        solo.append(c.stream(i, body(p, max_tokens)))
        if time.monotonic() > deadline:
            raise TimeoutError("the solo phase ran past --timeout")
    bad = [r.error for r in solo if r.error]
    if bad:
        raise RuntimeError(f"solo requests failed: {bad[0]}")
    # alone again with the skills hot (the first pass may have compiled skill combinations): TTFT and tokens/s
    hot = [c.stream(i, body(p, max_tokens)) for i, p in enumerate(ps[:8])]
    if any(h.tokens != solo[i].tokens for i, h in enumerate(hot)):
        raise RuntimeError("the same request sent alone twice gave two different answers")
    log(f"loadtest: {requests} requests from {clients} concurrent clients")
    todo: queue.Queue[int] = queue.Queue()
    for i in range(requests):
        todo.put(i)
    results: list[Result] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker():
        cl = Client(url, timeout)
        start.wait()
        while time.monotonic() < deadline:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            r = cl.stream(i, body(ps[i % len(ps)], max_tokens))
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 30)
    wall = time.perf_counter() - t0
    ok = [r for r in results if not r.error]
    mismatch = [r.index for r in ok if r.tokens != solo[r.index % len(ps)].tokens]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok]
    out_tokens = sum(len(r.tokens) for r in ok)
    return {"url": url, "clients": clients, "requests": requests, "completed": len(ok),
            "errors": len(results) - len(ok) + (requests - len(results)),
            "first_error": next((r.error for r in results if r.error), ""),
            "distinct_prompts": len(ps), "max_tokens": max_tokens, "identical_to_solo": len(ok) - len(mismatch),
            "mismatches": mismatch[:20], "wall_s": round(wall, 2),
            "ttft_ms": {"p50": ms(pct(ttfts, 50)), "p99": ms(pct(ttfts, 99)), "max": ms(max(ttfts, default=None))},
            "latency_ms": {"p50": ms(pct(lat, 50)), "p99": ms(pct(lat, 99))},
            "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / wall, 1) if wall else None,
            "requests_per_s": round(len(ok) / wall, 2) if wall else None,
            "solo_ttft_ms_p50": ms(statistics.median([r.ttft for r in solo if r.ttft is not None])),
            "solo_hot_ttft_ms_p50": ms(statistics.median([r.ttft for r in hot if r.ttft is not None])),
            "solo_tokens_per_s": round(sum(len(r.tokens) for r in hot) / sum(r.latency for r in hot), 1)}


def markdown(r: dict, m: dict) -> str:
    tt, lt = r["ttft_ms"], r["latency_ms"]
    return "\n".join([
        f"Measured {m['date']} on {m['device']}; model {m['model']} ({m['dtype']}), attention `{m['attention']}`, "
        f"batch-invariant engine, KV pool {m['pool_gib']} GiB. {r['clients']} concurrent streaming clients over "
        f"loopback, {r['requests']} requests over {r['distinct_prompts']} distinct prompts (questions of "
        f"`skillkv bench`, 1-2 skills each or chosen automatically), up to {r['max_tokens']} answer tokens, "
        f"greedy. {m['note']} Regenerate: `{m['command']}`.", "",
        "| what | measured |", "|---|---|",
        f"| answers identical to the same request sent alone | **{r['identical_to_solo']}/{r['requests']}** "
        f"({r['errors']} errors) |",
        f"| time to first token under load, p50 / p99 | {tt['p50']} ms / {tt['p99']} ms |",
        f"| request latency under load, p50 / p99 | {lt['p50']} ms / {lt['p99']} ms |",
        f"| throughput under load | {r['output_tokens_per_s']} output tokens/s, {r['requests_per_s']} requests/s "
        f"({r['output_tokens']} tokens in {r['wall_s']} s) |",
        f"| one request alone, skills hot: first token (HTTP round trip included) | {r['solo_hot_ttft_ms_p50']} ms "
        f"(p50) |",
        f"| one request alone, skills hot, whole request | {r['solo_tokens_per_s']} output tokens/s; "
        f"under load: **{round(r['output_tokens_per_s'] / r['solo_tokens_per_s'], 1)}x** that |"])


def run(url: str | None = None, clients: int = 64, requests: int = 128, distinct: int = 32, max_tokens: int = 16,
        timeout: float = 900, out: Path | None = Path("bench_out/serve.json"), doc: Path | None = None,
        server_args: dict | None = None, note: str = "", section: str | None = None, log=print) -> dict:
    import platform

    srv = None
    meta = {"date": time.strftime("%Y-%m-%d"), "note": note, "command": "make loadtest", "gpu": False}
    if url is None:
        from skillkv.serve.server import ServeConfig, Server

        cfg = ServeConfig(port=0, max_batch=max(clients, 1), watch=False, **(server_args or {}))
        srv = Server(cfg, log=lambda s: log(f"server: {s}")).start_background(timeout=timeout)
        url = srv.url
        runner = srv.worker.runner
        dev = runner.device
        if dev.type == "cuda":
            import torch

            meta["device"], meta["gpu"] = torch.cuda.get_device_name(dev), True
            meta["command"] = ("skillkv loadtest --model dummy:llama-3.1-8b --device cuda "
                               "--attention flashinfer --doc docs/BENCHMARKS.md")
        else:
            from skillkv.measure.bench import machine

            mc = machine()
            meta["device"] = f"{mc['cpu']} ({mc['cores']} cores, {mc['torch_threads']} torch threads)"
        use = runner.usage()
        meta.update(model=srv.kv.handle.name, dtype=str(srv.kv.handle.dtype).replace("torch.", ""),
                    attention=use.get("attention", "transformers"), pool_gib=round(use["bytes"] / 2**30, 2))
    else:
        meta.update(device=platform.node(), model="(remote)", dtype="?", attention="?", pool_gib="?")
    try:
        r = run_load(url, clients, requests, distinct, max_tokens, timeout, log)
    finally:
        if srv is not None:
            srv.close()
    r["meta"] = meta
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=1))
    md = markdown(r, meta)
    log(md)
    if doc is not None:
        from skillkv.measure.bench import update_doc

        update_doc(doc, section or ("serve-gpu" if meta["gpu"] else "serve"), md)
    return r

