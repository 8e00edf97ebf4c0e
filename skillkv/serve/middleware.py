"""HTTP middleware of `skillkv serve`: the request body limit and the access log (pure ASGI, no buffering).

BodyLimit  a body larger than `limit` bytes is answered 413 in the OpenAI error shape ({"error": {message, type,
           param, code: "request_too_large"}}) and never kept: when its Content-Length says so, before any of it
           is read; sent without one (chunked), as soon as the bytes received pass the limit. Nothing of it is
           parsed or tokenized, so memory stays where it was. Up to DRAIN bytes of the refused body are read and
           dropped chunk by chunk before the answer, so that a client still sending reads the 413 instead of a
           reset connection; a larger one is answered at once and the connection closed.
AccessLog  one line per request once its response is complete (a stream: at its end), as vLLM's and
           llama.cpp's servers log: client, method, path, status and, for chat completions, the skills, cached /
           computed prompt tokens, answer tokens, time to first token and total time. `log(entry)` gets a dict
           (`format_entry` makes the text line).
"""

from __future__ import annotations

import time
from typing import Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from skillkv.serve.protocol import error_body
from skillkv.skills import printable


DRAIN = 64 << 20


async def _drain(receive, budget: int) -> bool:
    """Read and drop the rest of a request body, at most `budget` bytes; whether it ended."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


def too_large(limit: int, size: int | None = None) -> str:
    got = f"of {size:,} bytes " if size is not None else ""
    return (f"request body {got}exceeds the server's limit of {limit:,} bytes (skillkv serve --max-body-size)")


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size < 0:
                return await JSONResponse(error_body("invalid Content-Length header"), 400)(scope, receive, send)
            if size > self.limit:
                ended = size <= DRAIN and await _drain(receive, DRAIN)
                body = error_body(too_large(self.limit, size), code="request_too_large")
                return await JSONResponse(body, 413, headers={} if ended else {"Connection": "close"})(
                    scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # sent without a Content-Length: nothing more is kept
                    ended = not message.get("more_body", False) or await _drain(receive, DRAIN)
                    raise HTTPException(413, too_large(self.limit), headers=None if ended else {"Connection": "close"})
            return message
        await self.app(scope, limited, send)


class AccessLog:
    def __init__(self, app, log: Callable[[dict], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        scope.setdefault("state", {})
        status = [0]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, watch)
        finally:
            entry = {"event": "request", "client": (scope.get("client") or ("-",))[0], "method": scope.get("method"),
                     "path": scope.get("path"), "status": status[0] or 499,
                     "total_ms": round((time.perf_counter() - t0) * 1e3, 1)}
            job = scope["state"].get("skillkv_job")
            if job is not None:
                entry.update(job_facts(job))
            try:
                self.log(entry)
            except Exception:  # noqa: BLE001 - a log line is never worth a failed request
                pass


def job_facts(job) -> dict:
    """What the access log says about a chat completion (its request, skillkv.sched.request.Req)."""
    req = job.req
    if req is None:
        return {"skills": [], "mode": job.body.mode, "cached_tokens": 0, "computed_tokens": 0,
                "completion_tokens": 0, "ttft_ms": None}
    facts = {"skills": [s.name for s in req.skills], "mode": req.mode, "cached_tokens": req.cached,
             "computed_tokens": len(req.ids) - req.cached, "completion_tokens": len(req.output),
             "ttft_ms": round((req.t_first - req.t_submit) * 1e3, 1) if req.t_first else None}
    if job.calls is not None:  # declared tools: calls parsed, and call-like text left as content
        facts.update(tool_calls=len(job.calls.calls), invalid_tool_calls=job.calls.invalid)
    if req.constraint is not None:
        facts["constrained"] = req.constraint.what
    return facts


def format_entry(e: dict) -> str:
    """The access log's text line."""
    parts = [f"{e['client']} {e['method']} {printable(e['path'] or '')} {e['status']}"]
    if "skills" in e:
        parts.append(printable(", ".join(e["skills"])) or "no skills")
        parts.append(f"{e['cached_tokens']:,} cached + {e['computed_tokens']:,} computed prompt tokens, "
                     f"{e['completion_tokens']:,} answer tokens")
        if e["ttft_ms"] is not None:
            parts.append(f"first token {e['ttft_ms']:,.0f} ms")
        if e.get("constrained"):
            parts.append(f"constrained by {e['constrained']}")
        if e.get("tool_calls") or e.get("invalid_tool_calls"):
            parts.append(f"{e['tool_calls']} tool calls" + (f" ({e['invalid_tool_calls']} not parsed, kept as text)"
                                                             if e["invalid_tool_calls"] else ""))
    total = e["total_ms"]
    parts.append(f"total {total:,.0f} ms" if total < 1000 else f"total {total / 1e3:.2f} s")
    return " | ".join(parts)
