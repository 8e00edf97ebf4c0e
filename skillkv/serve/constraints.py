"""What a chat request constrains its answer to, as a grammar (sched/grammar.py does the masking):

  tool_choice "required"        one call of any declared function, in the chat template's call format
                                (serve/tool_calls.py), its arguments an instance of that function's `parameters`
  tool_choice {"type": "function", "function": {"name": N}}   the same, of function N only
  response_format json_object   a JSON object
  response_format json_schema   an instance of `json_schema.schema`

A call wins over `response_format` (the answer is then the call). Calls are written as the parser reads them back:
hermes `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`, llama3_json `{"name": N, "parameters":
{...}}`, JSON with ", " and ": " separators and no other space (what the templates' `tojson` writes, so the call
the client resends renders to the same tokens). A schema xgrammar cannot compile, a named function that was not
declared, `required` without tools: ApiError 400 naming the field.
"""

from __future__ import annotations

import json
import re

from skillkv.sched.grammar import Constraint, Grammars
from skillkv.serve.protocol import ApiError, ChatRequest
from skillkv.serve.tool_calls import CLOSE, OPEN

SPACE = 8  # the longest run of space a response_format answer may hold (pretty-printed JSON, 2-3 levels deep)
DIGITS = 16  # the most digits in each part of a JSON number (bounded_numbers)


def _function_schema(fn, fmt: str) -> dict:
    key = "parameters" if fmt == "llama3_json" else "arguments"
    params = fn.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn.name}, key: params}, "required": ["name", key]}


def bounded_numbers(grammar):
    """`grammar` with every run of digits xgrammar writes for a JSON number bounded to DIGITS: more than a double
    holds. Unbounded, a small model can write `0.000000...` or `1000000...` until `max_tokens` (seen with the default
    model on `number` and `integer` values); JSON Schema has no way to say it, so the rules are rewritten: `[0-9]*`
    and repetitions `{1, -1}` / `{0, -1}` of a rule that is one digit, everywhere but in string patterns."""
    import xgrammar as xgr

    text = str(grammar)
    digit = set(re.findall(r"^(\w+) ::= \(\(\[0-9\]\)\)$", text, re.M))
    lines = []
    for line in text.splitlines():
        if "Regex(" not in line:
            line = line.replace("[0-9]*", f"[0-9]{{0,{DIGITS - 1}}}")
            line = re.sub(r"\b(\w+)\{([01]), -1\}", lambda m: f"{m[1]}{{{m[2]}, {DIGITS}}}" if m[1] in digit
                          else m[0], line)
        lines.append(line)
    return xgr.Grammar.from_ebnf("\n".join(lines))


def _call_grammar(schema: dict, fmt: str):
    import xgrammar as xgr

    call = bounded_numbers(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    if fmt == "llama3_json":
        return call
    literal = lambda s: xgr.Grammar.from_ebnf(f"root ::= {json.dumps(s)}")  # noqa: E731
    return xgr.Grammar.concat(literal(OPEN + "\n"), call, literal("\n" + CLOSE))


def _wanted_calls(body: ChatRequest) -> list | None:
    """The functions a call must be one of, or None when the request does not force a call."""
    choice = body.tool_choice
    if choice != "required" and not isinstance(choice, dict):
        return None
    fns = [t.function for t in body.tools or [] if t.type == "function" and t.function is not None]
    if not fns:
        raise ApiError(400, "tool_choice forces a tool call but the request declares no function tools",
                       param="tool_choice", code="invalid_request")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        fns = [f for f in fns if f.name == name]
        if not fns:
            raise ApiError(400, f"tool_choice names function {name!r}, which is not among the request's tools",
                           param="tool_choice", code="unknown_function")
    return fns


def _format_schema(body: ChatRequest) -> tuple[str, object] | None:
    """(key, grammar builder) of `response_format`, or None for text."""
    rf = body.response_format or {}
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", lambda: _json_grammar('{"type": "object"}', strict=False)
    spec = rf.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, 'response_format is {"type": "text" | "json_object"} or {"type": "json_schema", '
                       '"json_schema": {"name": ..., "schema": {...}}}', param="response_format",
                       code="invalid_request")
    schema = json.dumps(spec["schema"])  # the properties in the client's order: the answer's order
    return "schema:" + schema, lambda: _json_grammar(schema)


def _json_grammar(schema: str, strict: bool = True):
    """JSON of `schema` with space where JSON allows it but at most SPACE characters in a row: a small model under a
    grammar that allows any space can write nothing else until `max_tokens` (seen with the tiny model)."""
    import xgrammar as xgr

    return bounded_numbers(xgr.Grammar.from_json_schema(schema, any_whitespace=True, max_whitespace_cnt=SPACE,
                                                        strict_mode=strict))


def constraint_for(kv, body: ChatRequest, fmt: str) -> Constraint | None:
    """The grammar of `body`'s answer (module docstring) for `kv` (a skillkv.api.SkillKV), or None. `fmt`: the
    template's tool-call format."""
    fns = _wanted_calls(body)
    if fns is not None:
        schema = [_function_schema(f, fmt) for f in fns]
        schema = schema[0] if len(schema) == 1 else {"anyOf": schema}
        key, build, param = f"call:{fmt}:" + json.dumps(schema, sort_keys=True), \
            (lambda: _call_grammar(schema, fmt)), "tools"
    else:
        found = _format_schema(body)
        if found is None:
            return None
        (key, build), param = found, "response_format"
    h = kv.handle
    grammars = Grammars.of(h.tokenizer, h.config.vocab_size, h.stop_ids)
    try:
        c = grammars.constraint(key, build)
        c.what = "tool_choice" if fns is not None else "response_format"  # counted by the worker (/stats)
        return c
    except Exception as e:  # noqa: BLE001 - xgrammar's errors for a schema it cannot compile have no common type
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ApiError(400, f"{param}: the schema cannot be compiled into a grammar ({why})", param=param,
                       code="invalid_schema") from None
