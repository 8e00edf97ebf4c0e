"""Constrained answers of the real default model (SmolLM2-135M, which on its own rarely writes a tool call): with
`tool_choice: "required"` every one of 50 varied function schemas gets a call that parses, names the function and
whose arguments are an instance of its schema; `response_format` json_schema gives JSON that parses and matches
(json_object: a JSON object as far as it goes: this model, free to add keys, adds them until `max_tokens`). Sent
concurrently, as agents do (the loop batches them)."""

from __future__ import annotations

import json
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

WORDS = ["city", "count", "color", "unit", "path", "enabled", "level", "tags", "owner", "limit", "query", "mode"]


def _prop(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["enum", "string", "integer", "number", "boolean", "array", "object" if depth < 1 else "enum"])
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "fast", "slow", "north", "south"], 3)}
    if kind == "string":
        return {"type": "string", "maxLength": 24}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 100, 5000])}
    if kind == "number":
        return {"type": "number"}
    if kind == "array":
        return {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}
    if kind == "object":
        return _object(rng, depth + 1)
    return {"type": "boolean"}


def _object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 3 if depth else 4))
    props = {n: _prop(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _check(value, schema: dict) -> bool:
    """The subset of JSON Schema the generator writes."""
    t = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        return False
    if t == "object":
        return isinstance(value, dict) and set(value) <= set(schema["properties"]) and \
            set(schema["required"]) <= set(value) and all(_check(value[k], schema["properties"][k]) for k in value)
    if t == "array":
        return isinstance(value, list) and len(value) <= schema["maxItems"] and \
            all(_check(x, schema["items"]) for x in value)
    if t == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 10 ** 9)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and \
            schema["minimum"] <= value <= schema["maximum"]
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool)


SCHEMAS = [_object(random.Random(i)) for i in range(50)]


@pytest.fixture(scope="module")
def server(real_store, tmp_path_factory):
    from conftest import REPO

    from skillkv.serve.server import ServeConfig, Server

    srv = Server(ServeConfig(port=0, skills=REPO / "skills", store=real_store, device="cpu", watch=False,
                             max_batch=64), log=lambda s: None, access=lambda e: None).start_background(timeout=600)
    yield srv
    srv.close()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def test_a_required_call_parses_on_every_one_of_50_schemas(server):
    def ask(i: int) -> tuple[int, dict]:
        name = f"tool_{i}_{WORDS[i % len(WORDS)]}"
        tools = [{"type": "function", "function": {"name": name, "description": "Does what the user asks.",
                                                   "parameters": SCHEMAS[i]}}]
        return i, _post(server.url, {"model": "default", "tools": tools, "tool_choice": "required",
                                     "max_tokens": 160, "messages": [
                                         {"role": "user", "content": f"Please run {name} for Paris, 3 items."}]})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(len(SCHEMAS))))
    bad = []
    for i, r in results:
        choice = r["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        ok = choice["finish_reason"] == "tool_calls" and len(calls) == 1 and \
            calls[0]["function"]["name"].startswith(f"tool_{i}_") and \
            _check(json.loads(calls[0]["function"]["arguments"]), SCHEMAS[i])
        if not ok:
            bad.append((i, choice))
    assert not bad, bad[:3]


def test_response_format_json_on_the_real_model(server):
    base = {"model": "default", "max_tokens": 120,
            "messages": [{"role": "user", "content": "Give the name and the population of a large city as JSON."}]}
    r = _post(server.url, {**base, "response_format": {"type": "json_object"}})
    text = r["choices"][0]["message"]["content"]
    assert text.startswith("{")  # a free-form object: this model keeps adding keys until max_tokens
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["name", "population"], "additionalProperties": False}
    r = _post(server.url, {**base, "response_format": {"type": "json_schema",
                                                       "json_schema": {"name": "city", "schema": schema}}})
    obj = json.loads(r["choices"][0]["message"]["content"])
    assert r["choices"][0]["finish_reason"] == "stop" and set(obj) == {"name", "population"}
    assert isinstance(obj["population"], int) and isinstance(obj["name"], str)
