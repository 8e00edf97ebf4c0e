"""The agent-trace benchmark (issue 22, `skillkv bench --agent`): the trace generator (deterministic, every shape an
agent sends, sizes in range in the default model's tokens), the report's arithmetic on fabricated records, the
reading of reuse from each server's fields, and one small run end to end against an in-process skillkv server on
the tiny random model (no tools, quick). llama.cpp's column is exercised on the real GGUF (slow)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from conftest import REPO, TINY, one_line_error, run_cli

from skillkv.errors import SkillkvError
from skillkv.measure.agent_client import reuse
from skillkv.measure.agent_report import identical, markdown, ratios, summarize
from skillkv.measure.agent_traces import make_traces, request_messages


@pytest.fixture(scope="module")
def count():
    from skillkv.model import resolve_model

    tok = resolve_model("default", device="cpu").tokenizer
    return lambda s: len(tok.encode(s, add_special_tokens=False))


@pytest.fixture(scope="module")
def repo_skills():
    from skillkv.skills import load_skills

    return load_skills(REPO / "skills").skills


def test_traces_are_deterministic_and_fit(repo_skills, count):
    a = make_traces(repo_skills, 4, 20, seed=0, count=count)
    b = make_traces(repo_skills, 4, 20, seed=0, count=count)
    assert [asdict(t) for t in a] == [asdict(t) for t in b]
    assert [asdict(t) for t in make_traces(repo_skills, 4, 20, seed=1, count=count)] != [asdict(t) for t in a]
    assert [t.shape for t in a] == ["tool", "shell", "user", "tool"]  # the three client shapes rotate
    assert len({t.skill for t in a}) == 4
    for t in a:
        assert len(t.steps) == 20 and t.tokens["estimate"] <= 0.9 * 8192
    with pytest.raises(SkillkvError, match="do not fit"):
        make_traces(repo_skills, 1, 60, count=count)


def test_trace_shapes_and_sizes(repo_skills, count):
    traces = make_traces(repo_skills, 6, 20, seed=3, count=count)
    by_name = {s.name: s for s in repo_skills}
    for t in traces:
        assert 3 <= len(t.tools) <= 8 and 900 <= count(json.dumps(t.tools)) <= 2600
        for tool in t.tools:
            fn = tool["function"]
            assert tool["type"] == "function" and fn["parameters"]["type"] == "object" and fn["description"]
        assert "<available_skills>" in t.system and all(f"<name>{s.name}</name>" in t.system for s in repo_skills)
        skill_steps = [i for i, s in enumerate(t.steps) if s.kind == "skill"]
        assert len(skill_steps) == 1 and t.steps[skill_steps[0]].skill == t.skill
        body = by_name[t.skill].body.strip()
        brought = "\n".join(m["content"] for m in t.steps[skill_steps[0]].new)
        assert body in brought
        if t.shape == "tool":
            assert t.steps[skill_steps[0]].new[0]["role"] == "tool" and f'<skill_content name="{t.skill}">' in brought
        elif t.shape == "shell":
            assert brought.startswith(f"---\nname: {t.skill}") and t.steps[skill_steps[0] - 1].calls[0].args[
                "command"].startswith("cat ")
        else:
            assert t.steps[skill_steps[0]].new[0] == {"role": "user", "content": brought.split("\n</skill>")[0] +
                                                      "\n</skill>"} and f"<name>{t.skill}</name>" in brought
        later = [m["content"] for s in t.steps[skill_steps[0] + 1:] for m in s.new if m["role"] == "user"]
        assert later and all(t.skill in q for q in later)  # later tasks quote the skill
        for i, st in enumerate(t.steps):
            assert 16 <= st.max_tokens <= 32
            results = [m for m in st.new if m["role"] == "tool"]
            assert [m["tool_call_id"] for m in results] == [c.id for c in (t.steps[i - 1].calls if i else [])]
            if st.kind == "tool":
                assert all(50 <= count(m["content"]) <= 650 for m in results)


def test_request_messages_with_and_without_tools(repo_skills, count):
    t = make_traces(repo_skills, 1, 8, seed=0, count=count)[0]
    answers = [f"answer {i}" for i in range(8)]
    msgs = request_messages(t, 7, answers)
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    calls = [c for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert calls and all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls)
    ids = [m["tool_call_id"] for m in msgs if m["role"] == "tool"]
    assert ids == [c["id"] for c in calls]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == answers[:7]
    flat = request_messages(t, 7, answers, tools=False)
    assert len(flat) == len(msgs) and not any("tool_calls" in m or "tool_call_id" in m for m in flat)
    assert sum(m["content"].count("<tool_call>") for m in flat if m["role"] == "assistant") == len(calls)


def rec(conv, turn, kind, prompt, reused, ttft, ids=None, text="", error="", prefill=None):
    return {"conversation": conv, "turn": turn, "kind": kind, "skill_body": kind == "skill", "sent": True,
            "prompt_tokens": prompt, "reused": reused, "computed": None if reused is None else prompt - reused,
            "ttft_ms": ttft, "server_prompt_ms": prefill, "output_ids": ids, "text": text, "error": error}


def test_report_arithmetic():
    rs = [rec(0, 0, "first", 1000, 0, 900.0), rec(0, 1, "skill", 2000, 1000, 500.0),
          rec(0, 2, "tool", 2200, 2000, 100.0, prefill=80.0), rec(0, 3, "user", 2400, 2200, 200.0, prefill=100.0),
          rec(1, 0, "first", 1000, 100, 800.0), rec(1, 1, "tool", 1200, 1000, 300.0, prefill=0.0),
          rec(1, 2, "tool", 0, None, None, error="HTTP 500: boom"),
          {**rec(1, 3, "user", 0, None, None), "sent": False}]
    s = summarize(rs, wall_s=4.0)
    assert (s["requests"], s["answered"], s["errors"], s["not_sent"]) == (8, 6, 1, 1)
    assert s["first_error"] == "HTTP 500: boom"
    assert s["reused_share_after_first"] == round(6200 / 7800, 3)  # turns > 0: (1000+2000+2200+1000) / (2000+...)
    assert s["reused_share_no_new_skill"] == round(5200 / 5800, 3)
    assert s["ttft_ms"]["first"] == {"n": 2, "p50": 850.0, "p90": 900.0}
    assert s["ttft_ms"]["later"] == {"n": 3, "p50": 200.0, "p90": 300.0}
    assert s["ttft_over_prefill"] == {"n": 2, "p50": 1.62, "p90": 2.0}  # 100/80, 200/100; a 0 ms prefill left out
    assert s["answers_per_s"] == 1.5 and s["prompt_tokens"] == 9800 and s["computed_tokens"] == 9800 - 6300
    full = summarize([{**r, "reused": 0 if r["reused"] is not None else None, "computed": r["prompt_tokens"],
                       "ttft_ms": r["ttft_ms"] and r["ttft_ms"] * 4} for r in rs], 8.0)
    q = ratios(s, full)
    assert q["ttft_p50_speedup"]["later"] == 4.0 and q["answers_per_s"] == 2.0
    assert q["computed_tokens_fewer"] == round(9800 / 3500, 2) and q["reused_share_after_first"] is None
    same = identical([rec(0, 0, "first", 1, 0, 1.0, ids=[1, 2]), rec(0, 1, "tool", 1, 0, 1.0, text="a"),
                      rec(0, 2, "tool", 1, 0, 1.0, ids=[3])],
                     [rec(0, 0, "first", 1, 0, 1.0, ids=[1, 2], text="x"), rec(0, 1, "tool", 1, 0, 1.0, text="b"),
                      rec(0, 2, "tool", 1, 0, 1.0, ids=[4])])
    assert same == {"compared": 3, "identical": 1, "by": "output token ids or text",
                    "mismatches": [[0, 1], [0, 2]], "approximate": 0, "approximate_mismatches": []}
    over_cache = rec(0, 2, "tool", 1, 0, 1.0, ids=[3])
    over_cache["mode"] = "cached"  # the approximate prefix cache (a GPU's): a difference is counted, not a failure
    approx = identical([over_cache], [rec(0, 2, "tool", 1, 0, 1.0, ids=[4])])
    assert approx["mismatches"] == [] and approx["approximate_mismatches"] == [[0, 2]] and approx["identical"] == 0
    meta = {"date": "d", "device": "cpu", "skillkv": "0", "torch": "t", "model": "m", "context": 8192,
            "conversations": 2, "turns": 4, "seed": 0, "scale": 1.0, "tools": True, "concurrent": False,
            "threads": 2, "command": "make bench-agent", "xllamacpp": "1", "gguf": "m.gguf"}
    md = markdown({"meta": meta, "columns": {"skillkv": {"summary": s}, "skillkv-full": {"summary": full},
                                             "llama.cpp": {"summary": full}},
                   "ratios": {"skillkv_vs_skillkv-full": q, "skillkv_vs_llama.cpp": q}, "identical": same})
    assert ("| skillkv | skillkv `mode: full` | llama.cpp (xllamacpp 1) | skillkv vs full | skillkv vs llama.cpp |"
            in md)
    assert "**4.0x** faster" in md and "**1/3** turns (differ: [[0, 1], [0, 2]])" in md
    assert "| first token / the server's prefill of the new tokens" in md and "1.62x / 2.0x (n=2)" in md


def test_reuse_is_read_from_each_servers_fields():
    assert reuse({"prompt_tokens": 100}, None, {"tokens": {"prefix_cache": 60, "skill_kv": 30, "computed": 10}}) \
        == (100, 90, 10, "skillkv.tokens")
    assert reuse({"prompt_tokens": 57, "prompt_tokens_details": {"cached_tokens": 25}},
                 {"cache_n": 25, "prompt_n": 32, "prompt_ms": 5.0}, None) == (57, 25, 32, "timings")
    assert reuse({"prompt_tokens": 50, "prompt_tokens_details": {"cached_tokens": 20},
                  "skillkv": {"cached_tokens": 20, "computed_tokens": 30}}, None, {}) == (50, 20, 30, "cached_tokens")
    assert reuse(None, None, None) == (None, None, None, "")


@pytest.mark.parametrize("tools", [False, True], ids=["no-tools", "tools"])
def test_agent_bench_end_to_end_on_the_tiny_model(monkeypatch, capsys, tiny_skills, tmp_path, tools):
    """Every shape of agent conversation, with and without tools: answered, every answer equal to mode full token
    for token, and the prefix cache reusing the earlier turns."""
    from skillkv.model.presets import DUMMY_PRESETS

    doc = tmp_path / "BENCH.md"
    doc.write_text("# Benchmarks\n\n<!-- agent:begin -->\nold\n<!-- agent:end -->\ntail\n")
    model = TINY  # the tiny model's byte tokenizer makes the tools' JSON ~4x longer: a context that holds them
    if tools:
        (tmp_path / "tiny16k").mkdir()
        (tmp_path / "tiny16k" / "config.json").write_text(json.dumps({**DUMMY_PRESETS["tiny"],
                                                                      "max_position_embeddings": 16384}))
        model = ("--model", f"dummy:{tmp_path / 'tiny16k' / 'config.json'}", "--device", "cpu")
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--agent", "--quick", *([] if tools else ["--no-tools"]),
                             *model, "--skills", str(tiny_skills), "--store", str(tmp_path / "store"), "--scale", "0.1",
                             "--context", "12000" if tools else "4096", "--conversations", "3", "--out",
                             str(tmp_path / "out"), "--doc", str(doc), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r["columns"]) == {"skillkv", "skillkv-full"} and "llama.cpp column left out" in r["notes"][0]
    for name, s in r["columns"].items():
        assert (s["requests"], s["answered"], s["errors"]) == (18, 18, 0), name
        assert s["ttft_ms"]["later"]["n"] == 12 and s["answers_per_s"] > 0
        assert s["ttft_over_prefill"]["n"] == 12 and s["ttft_over_prefill"]["p50"] >= 1.0, s["ttft_over_prefill"]
    assert r["columns"]["skillkv-full"]["reused_share_after_first"] == 0.0
    assert r["columns"]["skillkv"]["reused_share_after_first"] > 0.8  # every earlier turn from the prefix cache
    assert r["identical"]["compared"] == 18 and r["identical"]["mismatches"] == []  # exact turns: always equal
    assert {t["shape"] for t in r["traces"]} == {"tool", "shell", "user"}
    full = json.loads((tmp_path / "out" / "agent.json").read_text())
    assert all(x["output_ids"] and x["source"] for x in full["columns"]["skillkv"]["records"])
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- agent:end -->\ntail\n") and "| skillkv vs full |" in text


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from conftest import write_skill

    from skillkv.serve.server import ServeConfig, Server
    from skillkv.skills import load_skills

    root = tmp_path_factory.mktemp("agent-tiny")
    write_skill(root / "skills", "alpha-tool", "Use when the user asks about the alpha tool and its flags.",
                "The alpha tool takes --frobnicate and --level N. Level 7 is the default.\n" * 3)
    write_skill(root / "skills", "beta-codes", "Use for beta error codes and what they mean.",
                "Code B-17 means the disk is full. Code B-42 means a checksum mismatch.\n" * 4)
    srv = Server(ServeConfig(port=0, model="dummy:tiny", skills=root / "skills", store=root / "store", device="cpu",
                             watch=False), log=lambda s: None, access=lambda e: None).start_background()
    srv.traces = make_traces(load_skills(root / "skills").skills, 3, 5, scale=0.1, context=4096, with_tools=False)
    yield srv
    srv.close()


def test_agent_bench_records_errors_without_crashing(tiny_server):
    """Every request refused (a field the server refuses, as main refuses tools): recorded, the conversation ends."""
    from skillkv.measure.agent_bench import drive

    recs, _ = drive(tiny_server.url, tiny_server.traces, tools=True, extra={"n": 2}, log=lambda s: None)
    assert [(x["turn"], x["sent"], bool(x["error"])) for x in recs if x["conversation"] == 0] == \
        [(0, True, True), (1, False, False), (2, False, False), (3, False, False), (4, False, False)]
    assert recs[0]["error"].startswith("HTTP 400")
    s = summarize(recs, 1.0)
    assert (s["errors"], s["not_sent"], s["answered"]) == (3, 12, 0)


def test_concurrent_conversations_get_the_round_robin_answers(tiny_server):
    """One thread per conversation (batched together by the server) or one request at a time: the same answers."""
    from skillkv.measure.agent_bench import drive

    rr, _ = drive(tiny_server.url, tiny_server.traces, tools=False, log=lambda s: None)
    cc, wall = drive(tiny_server.url, tiny_server.traces, tools=False, concurrent=True, log=lambda s: None)
    assert [(x["conversation"], x["turn"]) for x in cc] == [(x["conversation"], x["turn"]) for x in rr]
    assert all(x["output_ids"] and not x["error"] for x in rr + cc)
    assert identical(cc, rr)["mismatches"] == [] and summarize(cc, wall)["answered"] == 15


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--turns", "5"], "--turns belongs to the agent benchmark: add --agent"),
    (["bench", "--agent", "--gguf", "nope.gguf"], "--gguf nope.gguf: no such file"),
    (["bench", "--agent", "--url", "http://127.0.0.1:9", *TINY], "--url measures a running server"),
    (["bench", "--agent", "--url", "http://127.0.0.1:9", "--model", "dummy:tiny", "--scale", "0.1", "--context",
      "4096", "--quick", "--no-tools", "--no-llamacpp"],
     "skillkv: cannot reach the server at http://127.0.0.1:9 (ConnectionRefusedError"),
    (["bench", "--agent", "--model", "dummy:tiny", "--turns", "60", "--scale", "0.1", "--context", "4096"],
     "60 turns do not fit 90% of a 4,096-token context"),
])
def test_agent_bench_bad_input_is_one_line(monkeypatch, capsys, tiny_skills, argv, needle):
    """A one-line error and exit code 2 (after the progress lines of what had started), never a traceback."""
    code, out, err = run_cli(monkeypatch, capsys, *argv, *(["--skills", str(tiny_skills)] if "--model" in argv else []))
    assert code == 2 and out == ""
    one_line_error(code, err.strip().splitlines()[-1], needle)
    assert "Traceback" not in err


@pytest.mark.slow
def test_llamacpp_column_on_the_default_gguf(repo_skills, count):
    """llama.cpp's server (xllamacpp) on the default model's GGUF with tools: answered, reuse read from `timings`."""
    from skillkv.measure import llamacpp
    from skillkv.measure.agent_bench import drive
    from skillkv.model import default_gguf

    if llamacpp.version() is None:
        pytest.skip("xllamacpp is not installed (pip install xllamacpp)")
    traces = make_traces(repo_skills, 2, 4, seed=0, count=count)
    with llamacpp.LlamaCpp(default_gguf(), 8192, slots=2, threads=2) as peer:
        recs, wall = drive(peer.url, traces, tools=True, extra={"cache_prompt": True}, log=lambda s: None)
    assert all(not x["error"] and x["source"] == "timings" and x["text"] for x in recs)
    s = summarize(recs, wall)
    assert s["reused_share_after_first"] > 0.5 and s["answered"] == 8
