"""skillkv serve end to end over HTTP on an ephemeral port: tiny random model for the many cases (errors, disconnects,
concurrency, watch, ask --server), the real default model with the official `openai` client (marked slow)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

from conftest import REPO, place_dependent_gemm, run_cli, write_skill


def post(url: str, body, path: str = "/v1/chat/completions", raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def chat(question: str, skills=None, max_tokens: int = 8, **extra) -> dict:
    body = {"model": "default", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, **extra}
    if skills is not None:
        body["skills"] = skills
    return body


def wait_idle(url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = get(url, "/health")
        if (h["running"] == 0 and h["waiting"] == 0 and h["pool"]["private"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from skillkv.serve.server import ServeConfig, Server

    root = tmp_path_factory.mktemp("serve-tiny")
    skills = root / "skills"
    write_skill(skills, "alpha-tool", "Use when the user asks about the alpha tool and its flags.",
                "The alpha tool takes --frobnicate and --level N. Level 7 is the default.\n" * 3)
    write_skill(skills, "beta-codes", "Use for beta error codes and what they mean.",
                "Code B-17 means the disk is full. Code B-42 means a checksum mismatch.\n" * 4)
    cfg = ServeConfig(port=0, model="dummy:tiny", skills=skills, store=root / "store", device="cpu",
                      kv_budget=8 << 20, pins=["beta-codes"], max_batch=16)
    srv = Server(cfg, log=lambda s: None).start_background()
    srv.skills_dir = skills
    yield srv
    srv.close()


def test_health_models_skills_stats(tiny_server):
    url = tiny_server.url
    h = get(url, "/health")
    assert h["status"] == "ok" and h["model"] == "dummy-tiny" and h["pool"]["resident"] >= 1
    # which GEMM holds batch invariance on this machine, checked at start (engine/invariance.py)
    assert h["pool"]["batch_invariant"] is True and "rows independent of the row count" in h["pool"]["invariance"]
    assert [m["id"] for m in get(url, "/v1/models")["data"]] == ["dummy-tiny"]
    skills = {s["name"]: s for s in get(url, "/skills")["data"]}
    assert set(skills) == {"alpha-tool", "beta-codes"}
    assert skills["beta-codes"]["state"] == "current" and skills["beta-codes"]["pinned"]
    assert skills["alpha-tool"]["description"].startswith("Use when")
    code, ans = post(url, chat("What does code B-17 mean?", ["beta-codes"]))
    assert code == 200
    st = get(url, "/stats")
    assert st["questions"] >= 1 and "beta-codes" in st["skills"] and st["model"] == "dummy-tiny"


def test_usage_reports_cached_and_computed_tokens(tiny_server):
    code, r = post(tiny_server.url, chat("What does code B-17 mean?", ["beta-codes"], max_tokens=5))
    assert code == 200 and r["object"] == "chat.completion"
    u = r["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] == u["skillkv"]["cached_tokens"] > 100
    assert u["skillkv"]["computed_tokens"] == u["prompt_tokens"] - u["skillkv"]["cached_tokens"] > 0
    assert r["skillkv"]["tiers"] == ["l1"]  # pinned: resident since start
    assert u["completion_tokens"] == len(r["skillkv"]["output_token_ids"]) <= 5
    t = r["skillkv"]["tokens"]  # where the prompt's KV came from
    assert t["skill_kv"] + t["prefix_cache"] == u["skillkv"]["cached_tokens"] and t["computed"] == u["skillkv"][
        "computed_tokens"]
    ask = chat("What does code B-17 mean, and B-42? Say which is worse for a database on a full disk.", [],
               max_tokens=3)
    code, r = post(tiny_server.url, ask)
    assert code == 200 and r["skillkv"]["skills"] == [] and r["skillkv"]["tokens"]["skill_kv"] == 0
    code, again = post(tiny_server.url, ask)  # no skill: the conversation itself, its full pages now cached
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["skillkv"]["tokens"]["prefix_cache"]
    assert again["skillkv"]["tokens"]["prefix_cache"] == (r["usage"]["prompt_tokens"] - 1) // 16 * 16 > 0


AGENT_TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}, {"type": "web_search"}]


@pytest.mark.parametrize("body,raw,status,param,code", [
    (None, b"{not json", 400, None, "invalid_request"),
    ({"model": "default"}, None, 400, "messages", "invalid_request"),
    ({"model": "default", "messages": []}, None, 400, "messages", "invalid_request"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, None, 400, None, "invalid_request"),
    (chat("hi", max_tokens=0), None, 400, "max_tokens", "invalid_request"),
    (chat("hi", temperature=5), None, 400, "temperature", "invalid_request"),
    (chat("hi", n=2), None, 400, "n", "unsupported_parameter"),
    (chat("hi", ["no-such-skill"]), None, 400, "skills", "skill_not_found"),
    ({**chat("hi"), "model": "gpt-4o"}, None, 404, "model", "model_not_found"),
    (chat("x " * 3000, max_tokens=2000), None, 400, "messages", "context_length_exceeded"),
    ({"model": "default", "messages": [{"role": "system", "content": "only system"}]}, None, 400, "messages",
     "no_user_message"),
    (chat("hi", tool_choice="required"), None, 400, "tool_choice", "invalid_request"),  # no tools to call
    (chat("hi", tools=AGENT_TOOLS, tool_choice={"type": "function", "function": {"name": "f"}}), None, 400,
     "tool_choice", "unknown_function"),
    (chat("hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "no-such-type"}}}}}], tool_choice="required"), None, 400, "tools", "invalid_schema"),
    (chat("hi", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}), None,
     400, "response_format", "invalid_schema"),
    (chat("hi", response_format={"type": "xml"}), None, 400, "response_format", "invalid_request"),
    (chat("hi", tool_choice="sometimes"), None, 400, "tool_choice", "invalid_request"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}, None,
     400, "messages", "invalid_request"),
    (chat("hi", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None,
     400, "messages", "unsupported_content"),
])
def test_errors_have_the_openai_shape(tiny_server, body, raw, status, param, code):
    got, r = post(tiny_server.url, body, raw=raw)
    assert got == status, r
    assert set(r) == {"error"} and set(r["error"]) == {"message", "type", "param", "code"}
    assert r["error"]["message"] and r["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert r["error"]["code"] == code
    if param:
        assert (r["error"]["param"] or "").startswith(param)


def test_agent_turns_with_tools_are_answered_and_extend_the_prompt(tiny_server):
    """An agent's request (tools, tool calls, tool results last) is answered with nothing injected; each turn's
    prompt is longer than the last by the new messages and reuses it from the prefix cache; a plain client still
    gets its skill injected."""
    msgs = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "What is code B-17?"}]
    prompts = []
    for i in range(3):
        code, r = post(tiny_server.url, {"model": "default", "messages": msgs, "tools": AGENT_TOOLS, "max_tokens": 3,
                                         "tool_choice": "auto", "parallel_tool_calls": False})
        assert code == 200, r
        assert r["skillkv"]["skills"] == [] and "declares tools" in r["skillkv"]["injection"]
        if prompts:  # every full page of the last turn's prompt is reused (its answer was not resent)
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompts[-1] // 16 * 16
        prompts.append(r["usage"]["prompt_tokens"])
        msgs = msgs + [{"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function",
                        "function": {"name": "read_file", "arguments": json.dumps({"path": f"f{i}.txt"})}}]},
                       {"role": "tool", "tool_call_id": f"c{i}", "content": f"Code B-17 means the disk is full ({i})."}]
    assert prompts[0] < prompts[1] < prompts[2]
    code, r = post(tiny_server.url, chat("What does code B-17 mean?"))
    assert code == 200 and r["skillkv"]["skills"] == ["beta-codes"]
    assert r["skillkv"]["injection"] == "chosen from the first user message"


def test_a_skill_the_conversation_holds_is_reported_where_it_is(tiny_server):
    """skillkv.spans: the alpha-tool body in a tool result (as Gemini CLI's activate_skill returns it), found in
    the prompt; nothing for a prompt that holds no skill text (an injected skill is in `skills`, not a span)."""
    body = (tiny_server.skills_dir / "alpha-tool" / "SKILL.md").read_text().split("---", 2)[2].strip()
    msgs = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Flags of alpha?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {
                "name": "activate_skill", "arguments": '{"name": "alpha-tool"}'}}]},
            {"role": "tool", "tool_call_id": "c0", "content": f"<activated_skill>\n{body}\n</activated_skill>"}]
    tools = [{"type": "function", "function": {"name": "activate_skill", "parameters": {"type": "object"}}}]
    code, r = post(tiny_server.url, {"model": "default", "messages": msgs, "tools": tools, "max_tokens": 2})
    assert code == 200 and r["skillkv"]["skills"] == []
    [span] = r["skillkv"]["spans"]
    assert (span["skill"], span["form"]) == ("alpha-tool", "body") and span["of"] - 2 <= span["tokens"] <= span["of"]
    assert span["tokens"] > 100  # the body as sent (stripped here: its last newline is not in the prompt)
    assert 0 < span["start"] < r["usage"]["prompt_tokens"] - span["tokens"]
    code, r = post(tiny_server.url, chat("What does code B-17 mean?", max_tokens=2))
    assert r["skillkv"]["skills"] == ["beta-codes"] and r["skillkv"]["spans"] == []


def test_unknown_route_and_method(tiny_server):
    code, r = post(tiny_server.url, {}, path="/v1/nothing")
    assert code == 404 and r["error"]["type"] == "not_found_error"
    try:
        urllib.request.urlopen(tiny_server.url + "/v1/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 405 and "error" in json.loads(e.read())


def _stream_lines(url: str, body: dict, keep: int | None = None) -> list[str]:
    """POST a streaming request; read `keep` data lines then drop the connection (None: read to the end)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    lines = []
    while keep is None or len(lines) < keep:
        line = resp.readline().decode()
        if not line:
            break
        if line.startswith("data: "):
            lines.append(line[6:].strip())
            if lines[-1] == "[DONE]":
                break
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return lines


def test_streaming_matches_non_streaming(tiny_server):
    body = chat("Which flags does the alpha tool take?", ["alpha-tool"], max_tokens=12)
    _, whole = post(tiny_server.url, body)
    lines = _stream_lines(tiny_server.url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    use, once = chunks[-1]["usage"], whole["usage"]
    assert chunks[-1]["choices"] == [] and (use["prompt_tokens"], use["completion_tokens"]) == (
        once["prompt_tokens"], once["completion_tokens"])
    # the same prompt again: every full page of it is in the prefix cache now
    assert use["prompt_tokens_details"]["cached_tokens"] >= once["prompt_tokens_details"]["cached_tokens"]


def test_disconnect_mid_stream_frees_pages(tiny_server):
    url = tiny_server.url
    before = wait_idle(url)
    lines = _stream_lines(url, {**chat("Tell me about the alpha tool", ["alpha-tool"], max_tokens=3000),
                                "stream": True}, keep=3)
    assert len(lines) == 3 and "[DONE]" not in lines
    after = wait_idle(url)
    assert after["running"] == 0 and after["pool"]["private"] == 0
    assert after["served"] == before["served"]  # cancelled, not completed


def test_disconnect_while_waiting_for_a_whole_answer_frees_pages(tiny_server):
    url = tiny_server.url
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat("alpha tool flags?", ["alpha-tool"], 3000)),
                 {"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while get(url, "/health")["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    h = wait_idle(url)
    assert h["running"] == 0 and h["pool"]["private"] == 0


def _requests(n: int) -> list[dict]:
    qs = ["alpha flags?", "What is code B-42?", "Level 7?", "frobnicate how", "disk full code", "checksum"]
    skills = [["alpha-tool"], ["beta-codes"], None, ["beta-codes", "alpha-tool"], [], ["alpha-tool", "beta-codes"]]
    return [chat(f"{qs[i % 6]} #{i}", skills[i % 6], max_tokens=4 + i % 9) for i in range(n)]


def test_concurrent_answers_equal_solo_answers(tiny_server):
    url = tiny_server.url
    reqs = _requests(24)
    solo = [post(url, r)[1] for r in reqs]
    with ThreadPoolExecutor(24) as ex:
        together = list(ex.map(lambda r: post(url, r)[1], reqs))
    for s, t in zip(solo, together):
        assert t["skillkv"]["output_token_ids"] == s["skillkv"]["output_token_ids"]
        assert t["choices"][0]["message"]["content"] == s["choices"][0]["message"]["content"]
    assert wait_idle(url)["pool"]["private"] == 0


def test_ask_server_cli(tiny_server, monkeypatch, capsys):
    q = "What does code B-42 mean?"
    code, out, err = run_cli(monkeypatch, capsys, "ask", q, "--server", tiny_server.url, "--skill", "beta-codes",
                             "--max-tokens", "6", "--json")
    assert code == 0, err
    ans = json.loads(out)
    _, ref = post(tiny_server.url, chat(q, ["beta-codes"], max_tokens=6))
    assert ans["output_token_ids"] == ref["skillkv"]["output_token_ids"]
    assert ans["answer"] == ref["choices"][0]["message"]["content"]
    assert ans["skills"] == ["beta-codes"] and ans["tokens"]["cached"] > 0 and ans["mode"] == "exact"
    monkeypatch.setenv("SKILLKV_SERVER", tiny_server.url)
    code, out, err = run_cli(monkeypatch, capsys, "ask", q, "--skill", "beta-codes", "--max-tokens", "6")
    assert code == 0 and out.strip() == ref["choices"][0]["message"]["content"].strip()
    code, out, err = run_cli(monkeypatch, capsys, "ask", q, "--skill", "nope")
    assert code != 0 and err.startswith("skillkv: error: server") and "unknown skill" in err
    monkeypatch.delenv("SKILLKV_SERVER")
    code, out, err = run_cli(monkeypatch, capsys, "ask", q, "--server", "http://127.0.0.1:9")
    assert code != 0 and "cannot reach" in err and "Traceback" not in err


def test_edited_skill_is_picked_up_without_restart(tiny_server):
    url = tiny_server.url
    body = chat("What does code B-17 mean?", ["beta-codes"], max_tokens=4)
    _, before = post(url, body)
    md = tiny_server.skills_dir / "beta-codes" / "SKILL.md"
    md.write_text(md.read_text() + "\nCode B-99 means the network is down.\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, after = post(url, body)
        if after["usage"]["prompt_tokens"] != before["usage"]["prompt_tokens"]:
            break
        time.sleep(0.2)
    assert after["usage"]["prompt_tokens"] > before["usage"]["prompt_tokens"]
    assert after["skillkv"]["tiers"] == ["l1"]  # pinned: warmed again after the recompile
    skills = {s["name"]: s for s in get(url, "/skills")["data"]}
    assert skills["beta-codes"]["state"] == "current" and skills["beta-codes"]["resident"]
    h = wait_idle(url)
    resident = h["pool"]["resident"]
    assert resident <= 6  # the old beta-codes prefixes were retired, not kept alongside


def test_serve_starts_and_answers_beside_malformed_and_overlong_skills(tmp_path):
    """A folder with a skill whose YAML is broken and one longer than the model's context: the server starts,
    GET /skills lists both with their reasons, and the good skill answers (exact == full through serve)."""
    from skillkv.serve.server import ServeConfig, Server

    skills = tmp_path / "skills"
    write_skill(skills, "beta-codes", "Use for beta error codes.", "Code B-17 means the disk is full.\n" * 4)
    broken = skills / "broken-yaml"
    broken.mkdir()
    (broken / "SKILL.md").write_text("---\nname: broken-yaml\ndescription: [unclosed\n---\nbody\n")
    write_skill(skills, "too-long", "Use for nothing, it is longer than the context.", "word " * 5000)
    srv = Server(ServeConfig(port=0, model="dummy:tiny", skills=skills, store=tmp_path / "store", device="cpu",
                             kv_budget=8 << 20, watch=False), log=lambda s: None).start_background()
    try:
        listed = {s["name"]: s for s in get(srv.url, "/skills")["data"]}
        assert listed["beta-codes"]["state"] == "current"
        assert listed["too-long"]["state"] == "skipped" and "context" in listed["too-long"]["reason"]
        assert listed["broken-yaml"]["state"] == "skipped" and "YAML" in listed["broken-yaml"]["reason"]
        code, exact = post(srv.url, chat("What does code B-17 mean?", ["beta-codes"], max_tokens=6))
        assert code == 200 and exact["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        code, full = post(srv.url, chat("What does code B-17 mean?", ["beta-codes"], max_tokens=6, mode="full"))
        assert code == 200 and full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert full["skillkv"]["mode"] == "full" and exact["skillkv"]["mode"] == "exact"
        assert full["skillkv"]["output_token_ids"] == exact["skillkv"]["output_token_ids"]
        code, err = post(srv.url, chat("What?", ["too-long"]))
        assert code == 400 and "context" in err["error"]["message"]
    finally:
        srv.close()


def test_serve_composes_and_shares_the_compiled_store(tmp_path, tiny_skills, monkeypatch, capsys):
    """`skillkv compile` then serve over the same store: no recompile (one fingerprint); a two-skill compose
    request answers with the compose mode; a skill evicted from the pool comes back from L2 through the tiers."""
    from skillkv.serve.server import ServeConfig, Server

    store = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "compile", str(tiny_skills), "--store", str(store),
                           "--model", "dummy:tiny", "--device", "cpu")
    assert code == 0, err
    logs: list[str] = []
    srv = Server(ServeConfig(port=0, model="dummy:tiny", skills=tiny_skills, store=store, device="cpu",
                             kv_budget=8 << 20, watch=False), log=logs.append).start_background()
    try:
        assert not [ln for ln in logs if ln.startswith("compile:")]  # nothing recompiled
        assert [d.name for d in store.iterdir() if d.is_dir()] == [srv.kv.tag]
        code, r = post(srv.url, chat("What does B-17 mean?", ["beta-codes"]))
        assert code == 200 and r["skillkv"]["tiers"] == ["l2"]
        code, c = post(srv.url, chat("What does B-17 mean?", ["beta-codes", "alpha-tool"], mode="compose"))
        assert code == 200 and c["skillkv"]["mode"] == "compose" and c["skillkv"]["tiers"][0] == "l1"
        srv.worker.call(srv.kv.forget_resident).result(30)  # evicted from the pool (and the host tier)
        code, again = post(srv.url, chat("What does B-17 mean?", ["beta-codes"]))
        assert code == 200 and again["skillkv"]["tiers"] == ["l2"]
        assert again["skillkv"]["output_token_ids"] == r["skillkv"]["output_token_ids"]
    finally:
        srv.close()


# ----------------------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def real_server(real_store, tmp_path_factory):
    from skillkv.serve.server import ServeConfig, Server

    skills = tmp_path_factory.mktemp("serve-real") / "skills"
    for name in ("git-commit-messages", "release-notes", "python-debugging"):
        shutil.copytree(REPO / "skills" / name, skills / name)
    srv = Server(ServeConfig(port=0, skills=skills, store=real_store, device="cpu", watch=False),
                 log=lambda s: None).start_background(timeout=600)
    yield srv
    srv.close()


REAL = [("How long should the subject line of a commit message be?", ["git-commit-messages"]),
        ("Which sections does a Keep a Changelog release note have?", ["release-notes"]),
        ("What does breakpoint() do in Python?", None),
        ("Write a commit subject for a release that fixes a crash.", ["release-notes", "git-commit-messages"]),
        ("How do I find which commit introduced a bug?", ["git-commit-messages", "python-debugging"]),
        ("Say hello.", [])]


@pytest.mark.slow
def test_openai_client_end_to_end_on_the_real_model(real_server, real_kv):
    from openai import OpenAI

    from skillkv.generate import SamplingParams

    client = OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0)
    q, skills = REAL[0]
    [model] = [m.id for m in client.models.list()]
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=16,
                                       extra_body={"skills": skills})
    ref = real_kv.ask(q, skills, params=SamplingParams(max_tokens=16))  # the CLI's path (transformers)
    assert r.choices[0].message.content == ref.answer
    assert r.usage.prompt_tokens == ref.tokens["prompt"]
    assert r.usage.prompt_tokens_details.cached_tokens == ref.tokens["cached"] > 500
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=16,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"skills": skills})
    parts, usage = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        usage = ch.usage or usage
    assert "".join(parts) == ref.answer and usage.completion_tokens == r.usage.completion_tokens
    multi = client.chat.completions.create(model=model, max_tokens=8, messages=[
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": q}, {"role": "assistant", "content": "About 50 characters."},
        {"role": "user", "content": "Hi, and what about the body?"}])
    assert multi.choices[0].message.content and multi.model_extra["skillkv"]["skills"]  # from the first question


@pytest.mark.slow
def test_concurrent_clients_get_their_solo_answers_on_the_real_model(real_server):
    url = real_server.url
    reqs = [chat(q, s, max_tokens=10 + i % 5) for i, (q, s) in enumerate(REAL * 2)]
    solo = [post(url, r)[1]["skillkv"]["output_token_ids"] for r in reqs]
    barrier = threading.Barrier(len(reqs))

    def go(r):
        barrier.wait()
        return post(url, r)[1]["skillkv"]["output_token_ids"]
    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(go, reqs))
    assert together == solo
    assert get(url, "/health")["steps"] > 0 and wait_idle(url)["pool"]["private"] == 0


def test_loadtest_against_a_running_server(tiny_server, tmp_path):
    from skillkv.measure.loadtest import run

    doc = tmp_path / "BENCH.md"
    doc.write_text("# B\n\n<!-- serve:begin -->\nold\n<!-- serve:end -->\ntail\n")
    r = run(url=tiny_server.url, clients=4, requests=10, distinct=3, max_tokens=3, timeout=120,
            out=tmp_path / "serve.json", doc=doc, log=lambda s: None)
    assert r["completed"] == 10 and r["errors"] == 0 and r["identical_to_solo"] == 10
    assert r["ttft_ms"]["p50"] > 0 and r["output_tokens"] > 0
    text = doc.read_text()
    assert "old" not in text and "**10/10**" in text and text.endswith("<!-- serve:end -->\ntail\n")
    assert json.loads((tmp_path / "serve.json").read_text())["requests"] == 10


def test_where_no_gemm_is_batch_invariant_serve_says_so_and_refuses_the_flag(tmp_path, tiny_skills, monkeypatch,
                                                                            capsys):
    """The check's failing branch, forced on any CPU: every kernel gives a call's first row other bits."""
    from skillkv.serve.server import ServeConfig, Server

    place_dependent_gemm(monkeypatch)
    lines = []
    cfg = ServeConfig(port=0, model="dummy:tiny", skills=tiny_skills, store=tmp_path / "store", device="cpu",
                      kv_budget=8 << 20, watch=False)
    srv = Server(cfg, log=lines.append).start_background()
    try:
        h = get(srv.url, "/health")
        assert h["pool"]["batch_invariant"] is False and h["pool"]["invariance"].startswith("no GEMM here")
        assert any("batch-invariant off (no GEMM here" in ln for ln in lines)
        code, r = post(srv.url, chat("What does code B-17 mean?", ["beta-codes"], max_tokens=3))
        assert code == 200
    finally:
        srv.close()
    code, out, err = run_cli(monkeypatch, capsys, "serve", "--model", "dummy:tiny", "--skills", str(tiny_skills),
                             "--store", str(tmp_path / "s2"), "--device", "cpu", "--port", "0", "--batch-invariant",
                             "--no-watch")
    assert code == 2 and "batch invariance cannot hold here: no GEMM" in err and "Traceback" not in err
