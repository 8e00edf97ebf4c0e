"""HTTP middleware of `skillkv serve`: the request body limit and the access log (pure ASGI, no buffering).

BodyLimit  a body larger than `limit` bytes is answered 413 in the OpenAI error shape ({"error": {message, type,
           param, code: "request_too_large"}}) without being read: at once when its Content-Length says so, and
           as soon as the bytes received pass the limit when it is sent without one (chunked). Nothing of it is
           parsed or tokenized, so memory stays where it was.
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
                body = error_body(too_large(self.limit, size), code="request_too_large")
                return await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # sent without a Content-Length: stop reading here
                    raise HTTPException(413, too_large(self.limit))
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
    """What the access log says about a chat completion (skillkv.serve.worker.Job)."""
    seq = job.seq
    prompt = seq.prefix_tokens + len(seq.prompt) if seq is not None else 0
    return {"skills": [s.name for s in job.chosen], "mode": job.mode, "cached_tokens": job.cached,
            "computed_tokens": max(0, prompt - job.cached), "completion_tokens": len(seq.output) if seq else 0,
            "ttft_ms": round((job.t_first - job.t_submit) * 1e3, 1) if job.t_first else None}


def printable(text: str) -> str:
    """Control and other non-printable characters made visible: a client's path cannot move the terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                   for c in str(text))


def format_entry(e: dict) -> str:
    """The access log's text line."""
    parts = [f"{e['client']} {e['method']} {printable(e['path'] or '')} {e['status']}"]
    if "skills" in e:
        parts.append(printable(", ".join(e["skills"])) or "no skills")
        parts.append(f"{e['cached_tokens']:,} cached + {e['computed_tokens']:,} computed prompt tokens, "
                     f"{e['completion_tokens']:,} answer tokens")
        if e["ttft_ms"] is not None:
            parts.append(f"first token {e['ttft_ms']:,.0f} ms")
    total = e["total_ms"]
    parts.append(f"total {total:,.0f} ms" if total < 1000 else f"total {total / 1e3:.2f} s")
    return " | ".join(parts)
