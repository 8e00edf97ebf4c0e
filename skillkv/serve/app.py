"""The HTTP layer of `skillkv serve` (FastAPI): routes, SSE streaming, OpenAI-shaped errors, disconnects.

Routes
  POST /v1/chat/completions  streaming (SSE, `data: {chunk}` ... `data: [DONE]`) and not; see serve/protocol.py
  POST /v1/messages          Anthropic's Messages API over the same worker (serve/anthropic.py), streamed as its
                             `event:` / `data:` stream events or not; /v1/messages/count_tokens
  GET  /v1/models            the one served model
  GET  /skills               name, description, state (current | stale | missing | skipped, with the reason:
                             malformed, longer than the context...), tokens, resident, pinned
  GET  /stats                what `skillkv stats --json` prints
  GET  /health               status, model, running / waiting requests, pool pages

Every error is {"error": {"message", "type", "param", "code"}} (under /v1/messages Anthropic's {"type": "error",
"error": {"type", "message"}}) with a 4xx (the request's fault) or 5xx status; a body
over the limit (`body_limit`, default 1 MiB) is a 413 before it is read (serve/middleware.py). Each request is
logged in one line when its response is complete (`access_log`).
A client that disconnects (mid-stream, or while waiting for a non-streamed answer) cancels its request: the
engine thread frees its pages before the next step.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from skillkv import __version__
from skillkv.serve.anthropic import Events, MessagesRequest, message, message_id, to_chat
from skillkv.serve.anthropic import error_body as anthropic_error
from skillkv.serve.middleware import AccessLog, BodyLimit
from skillkv.serve.protocol import ApiError, ChatRequest, call_deltas, chunk, completion, completion_id, error_body
from skillkv.serve.worker import Worker


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg')}" if param else str(e.get("msg"))), param


def create_app(worker: Worker, body_limit: int = 1 << 20, access_log=None) -> FastAPI:
    app = FastAPI(title="skillkv", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=body_limit)
    if access_log is not None:
        app.add_middleware(AccessLog, log=access_log)  # outermost: it sees every response, 413s included
    started = int(time.time())

    def error(request: Request, status: int, openai: dict, headers=None) -> JSONResponse:
        """An error in the shape of the API the route speaks (Anthropic's under /v1/messages)."""
        if request.url.path.startswith("/v1/messages"):
            return JSONResponse(anthropic_error(status, openai["error"]["message"]), status_code=status,
                                headers=headers)
        return JSONResponse(openai, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(request, exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return error(request, 400, error_body(msg, param=param, code="invalid_request"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return error(request, exc.status_code, error_body(str(exc.detail), kind, code=code),
                     getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error(request, 500, error_body(f"{type(exc).__name__}: {exc}", "server_error"))

    async def on_engine(fn):
        return await asyncio.wrap_future(worker.call(fn))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": worker.model_name, **worker.snapshot()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": worker.model_name, "object": "model", "created": started,
                                            "owned_by": "skillkv"}]}

    @app.get("/skills")
    async def skills():
        def rows():
            kv, runner = worker.kv, worker.runner
            out = []
            for st in kv.status():
                why = worker.skipped.get(st.skill.name, "")
                out.append({"name": st.skill.name, "description": st.skill.description,
                            "state": "skipped" if why else st.state,
                            "tokens": st.tokens, "bytes": st.bytes,
                            "resident": runner.resident(kv.compiler.keys([st.skill])[0]),
                            "pinned": st.skill.name in kv.pin, "reason": why})
            served = {st["name"] for st in out}
            out += [{"name": name, "description": "", "state": "skipped", "tokens": 0, "bytes": 0, "resident": False,
                     "pinned": False, "reason": why} for name, why in worker.skipped.items() if name not in served]
            return {"object": "list", "data": out, "problems": kv.load_skills().problems}
        return await on_engine(rows)

    @app.get("/stats")
    async def stats():
        from skillkv.report import collect

        await asyncio.wrap_future(worker.stats_written())  # answers finished before this request are counted
        return await on_engine(lambda: {**collect(worker.kv, None)[0], "server": dict(worker.protocol)})

    async def submit(body: ChatRequest, request: Request):
        """Queue `body`; (job, its event queue) once accepted, else raise its ApiError."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

        job = worker.submit(body, emit)
        request.state.skillkv_job = job  # for the access log
        try:
            kind, val = await events.get()
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        if kind == "error":
            raise val
        return job, events, val

    async def whole(job, events: asyncio.Queue, request: Request) -> dict | None:
        """The "done" event of a non-streamed answer; None when the client went away (its request cancelled)."""
        getter = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter}, timeout=0.25)
                if not done:
                    if await request.is_disconnected():
                        return None
                    continue
                kind, val = getter.result()
                getter = None
                if kind == "error":
                    raise val
                if kind == "done":
                    return val
        finally:
            if getter is not None:
                getter.cancel()
            worker.cancel(job)  # no-op when done; frees the pages when the handler was cancelled

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        job, events, _ = await submit(body, request)
        cid, model = completion_id(), worker.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(worker, job, events, cid, model, include_usage),
                                     media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        val = await whole(job, events, request)
        if val is None:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        return completion(cid, model, val["text"], val["finish"], val["usage"], val["ext"], val.get("tool_calls"))

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        if body.max_tokens is None:
            raise ApiError(400, "max_tokens: field required", param="max_tokens")
        job, events, accepted = await submit(to_chat(body), request)
        mid, model = message_id(), worker.model_name
        if body.stream:
            return StreamingResponse(_anthropic_stream(worker, job, events, Events(mid, model,
                                                                                   accepted["prompt_tokens"])),
                                     media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        val = await whole(job, events, request)
        if val is None:
            return JSONResponse(anthropic_error(499, "client disconnected"), status_code=499)
        return message(mid, model, val)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: MessagesRequest):
        chat_body = to_chat(body)
        return {"input_tokens": await on_engine(lambda: worker.prompt_tokens(chat_body))}

    return app


async def _anthropic_stream(worker: Worker, job, events: asyncio.Queue, out: Events):
    def sse(ev: tuple) -> str:
        return f"event: {ev[0]}\ndata: {json.dumps(ev[1], ensure_ascii=False)}\n\n"

    try:
        yield sse(out.start)
        while True:
            kind, val = await events.get()
            evs = (out.text(val) if kind == "text" else out.call(val) if kind == "call" else
                   out.done(val) if kind == "done" else [("error", anthropic_error(val.status, val.message))])
            for ev in evs:
                yield sse(ev)
            if kind in ("done", "error"):
                return
    finally:
        worker.cancel(job)


async def _stream(worker: Worker, job, events: asyncio.Queue, cid: str, model: str, include_usage: bool):
    created = int(time.time())
    try:
        yield _sse(chunk(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            kind, val = await events.get()
            if kind == "text":
                yield _sse(chunk(cid, model, created, {"content": val}))
            elif kind == "call":
                for delta in call_deltas(val):
                    yield _sse(chunk(cid, model, created, delta))
            elif kind == "done":
                yield _sse(chunk(cid, model, created, {}, val["finish"], ext=val["ext"]))
                if include_usage:
                    yield _sse(chunk(cid, model, created, None, use=val["usage"], ext=val["ext"]))
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                yield _sse(val.body())
                yield "data: [DONE]\n\n"
                return
    finally:
        worker.cancel(job)  # a client gone mid-stream: its pages are freed before the next step
