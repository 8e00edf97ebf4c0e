"""The engine thread of `skillkv serve`: threads, the queue and the HTTP mapping around the one engine loop.

It alone touches the SkillKV (its runner, tiers, store), the loop (sched/loop.py: the same one `skillkv ask` runs
a request of one on) and the watcher. HTTP handlers talk to it through a queue (`submit`, `call`, `cancel`) and get
events back on their own asyncio queue: ("accepted", info) or ("error", ApiError) first, then ("text", delta) and,
for a request declaring tools, ("call", tool call) (serve/tool_calls.py)..., then ("done", result) or ("error",
ApiError). One iteration: take new requests (validate, map the messages to a
prompt, build the request: `SkillKV.request`), poll the watcher, run one loop step (admission, one batched runner
step, sampling, stops; cancelled requests' pages freed first).

Requests are opened as `skillkv ask` opens one (`SkillKV.open_request`: the same mode choice, the prefix cache over
every prompt, skill KV resident or paged in through the tiers, compose, pins, the same snapshots and fingerprint).
When the watcher recompiles a skill, the entries whose chain is no longer current are retired as soon as no running
request holds them (a request that started on the old version finishes on it), and pinned skills are warmed again.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable

from skillkv.errors import PromptTooLong, SkillkvError
from skillkv.generate import SamplingParams
from skillkv.sched.loop import Loop
from skillkv.sched.request import Req
from skillkv.serve.protocol import ApiError, ChatRequest, api_error, usage
from skillkv.select.spans import SpanIndex
from skillkv.serve.constraints import constraint_for
from skillkv.serve.render import render
from skillkv.serve.tool_calls import CallStream, call_format

CHANGES = {"compiled", "recompiled", "deleted", "renamed"}


@dataclass(eq=False)
class Job:
    """One chat request as the engine thread sees it: the HTTP body, where its events go, and its request once
    accepted (sched/request.Req)."""

    body: ChatRequest
    emit: Callable[[tuple], None]  # thread-safe: puts an event on the request's asyncio queue
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancelled: bool = False
    req: Req | None = None
    calls: CallStream | None = None  # a request declaring tools: its answer's tool calls, read as it streams


class Worker:
    """`kv` is the server's SkillKV (its pins are warmed at start)."""

    def __init__(self, kv, max_batch: int = 64, max_step_tokens: int = 4096, watch: bool = True,
                 default_max_tokens: int = 256, on_log: Callable[[str], None] = print,
                 neighbours: bool | None = None):
        self.kv, self.neighbours = kv, neighbours
        self.max_batch, self.max_step_tokens = max_batch, max_step_tokens
        self.watch, self.default_max_tokens, self.log = watch, default_max_tokens, on_log
        self.inbox: queue.Queue = queue.Queue()
        self.runner = None
        self.loop: Loop | None = None
        self.watcher = None
        self.skipped: dict[str, str] = {}  # skill or folder -> why it is not served (invalid, too long, ...)
        self._pending: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="skillkv-stats")
        self.steps = 0
        self.served = 0
        # answers with tools or a grammar since start (/health, /stats): calls parsed, call-like text left as
        # content, answers constrained by tool_choice or response_format
        self.protocol = {"tool_calls": 0, "invalid_tool_calls": 0, "constrained_tool_choice": 0,
                         "constrained_response_format": 0}

    # ------------------------------------------------------------------ lifecycle (caller's thread)

    @property
    def model_name(self) -> str:
        return self.kv.handle.name

    def start(self) -> None:
        """Compile what is out of date, load the runner, warm pinned skills, start the watcher and the thread."""
        kv = self.kv
        self._compile_all()
        if self.watch:
            from skillkv.watch import Watcher

            self.watcher = Watcher(kv, kv.skills_dir, on_line=lambda ln: self.log(f"watch: {ln}"))
            self.watcher.learn(kv.load_skills().skills)
        self.runner = kv.runner
        self.loop = kv.make_loop(self.max_batch, self.max_step_tokens)
        self._warm_pins()
        if self.watcher is not None:
            self.watcher.start()
        self._thread = threading.Thread(target=self._run, name="skillkv-engine", daemon=True)
        self._thread.start()

    def _compile_all(self) -> None:
        """Compile every skill that is out of date: one that cannot (malformed, too long for the model, ...) is
        logged and left out of serving with its reason (GET /skills), the others serve."""
        self.skipped = {}
        for r in self.kv.compile(neighbours=self.neighbours):
            if r.status == "skipped":
                self.skipped[r.skill] = r.reason
                self.log(f"skipped: {r.reason}")
            elif r.status != "up to date":
                self.log(f"compile: {r.skill} {r.tokens} tokens {r.seconds:.2f} s {r.status}")

    def stats_written(self) -> concurrent.futures.Future:
        """A future done once every answer finished so far is in the stats database (records are written in
        order, off the engine thread)."""
        return self._stats.submit(lambda: None)

    def close(self) -> None:
        self._stopping = True
        self.inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.watcher is not None:
            self.watcher.stop()
        self._stats.shutdown(wait=True)

    # ------------------------------------------------------------------ API for HTTP handlers (any thread)

    def submit(self, body: ChatRequest, emit: Callable[[tuple], None]) -> Job:
        job = Job(body, emit)
        self.inbox.put(("job", job))
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: free the request's pages at the next step (no-op once it is done)."""
        job.cancelled = True
        if job.req is not None:
            job.req.cancelled = True
        self.inbox.put(("wake",))

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread (between steps) and return its future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("call", fn, fut))
        return fut

    def prompt_tokens(self, body: ChatRequest) -> int:
        """The prompt tokens `body` would be answered over (skills injected as they would be): count_tokens. Run
        on the engine thread (`call`)."""
        b, kv = body, self.kv
        b.check()
        rd = render(kv, b)
        pieces = [p for _, p in kv.compiler.pieces(rd.skills)] if rd.skills else []
        return sum(map(len, pieces)) + len(rd.ids)

    def snapshot(self) -> dict:
        """Counters for /health, read without locking (approximate while a step runs)."""
        sched = self.loop.sched
        return {"running": len(sched.running), "waiting": len(sched.waiting), "steps": self.loop.steps,
                "served": self.served, "protocol": dict(self.protocol), "runner": self.runner.name,
                "pool": self.runner.usage()}

    # ------------------------------------------------------------------ the loop (engine thread)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain(block=not self.loop.has_work())
                self._watch_tick()
                self.loop.step()
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server: fail what was running
                self.log(f"error: engine step failed: {type(e).__name__}: {e}")
                self.loop.fail_running(ApiError(500, f"engine error: {type(e).__name__}: {e}", "server_error"))
        self.loop.fail_running(ApiError(503, "server shutting down", "server_error"))

    def _drain(self, block: bool) -> None:
        timeout = 0.1 if self.watcher is not None else None
        try:
            item = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "job":
                self._accept(item[1])
            elif item[0] == "call":
                fn, fut = item[1], item[2]
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, job: Job) -> None:
        """Validate the request and map its messages to a prompt; queue it on the loop or answer an error."""
        if job.cancelled:
            return
        kv, b = self.kv, job.body
        try:
            b.check()
            if b.model not in (self.model_name, "default", "skillkv"):
                raise ApiError(404, f"model {b.model!r} not found; this server serves {self.model_name!r}",
                               "not_found_error", "model", "model_not_found")
            rd = render(kv, b)  # the conversation as the template renders it; skills injected or not (why)
            chosen, q_ids, select_on = rd.skills, rd.ids, rd.select_on
            params = SamplingParams(max_tokens=b.answer_limit or self.default_max_tokens,
                                    temperature=b.temperature or 0.0, top_p=b.top_p if b.top_p is not None else 1.0,
                                    seed=b.seed if b.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4],
                                                                                          "little"))
            try:
                req = kv.request(chosen, q_ids, params, b.mode, stop=b.stop or [], preamble=bool(chosen),
                                 emit=lambda ev: self._event(job, ev))
                if b.answer_limit:
                    kv.check_fits(len(req.ids), b.answer_limit, len(q_ids))
            except PromptTooLong as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            r = self.runner
            if r.pages_for(len(req.ids) + req.max_new) > r.num_pages:
                raise ApiError(400, f"prompt of {len(req.ids)} tokens plus {req.max_new} answer tokens does not fit "
                               f"the KV pool ({r.num_pages} pages of {r.page_size} tokens; raise --gpu-kv-budget)",
                               param="max_tokens", code="kv_pool_exceeded")
        except ApiError as e:
            job.emit(("error", e))
            return
        except SkillkvError as e:
            job.emit(("error", ApiError(400, str(e))))
            return
        req.data, req.select_on, req.injection, job.req = job, select_on, rd.injection, req
        # the compiled skills the conversation itself holds, and where (issue 23: reported; placement is next)
        shift = len(req.ids) - len(q_ids)
        req.spans = [replace(sp, start=sp.start + shift, end=sp.end + shift) for sp in
                     SpanIndex.of(kv.load_skills().skills, kv.builder.tokenizer).find(q_ids)]
        if b.tools and b.tool_choice != "none":
            job.calls = CallStream(call_format(kv.builder.tokenizer), {t.function.name for t in b.tools if t.function},
                                   parallel=b.parallel_tool_calls is not False)
        try:
            req.constraint = constraint_for(kv, b, job.calls.fmt if job.calls else "hermes")
        except (ApiError, SkillkvError) as e:
            job.emit(("error", e if isinstance(e, ApiError) else ApiError(400, str(e))))
            return
        self.loop.add(req)
        job.emit(("accepted", {"prompt_tokens": len(req.ids), "skills": [s.name for s in chosen]}))

    def _event(self, job: Job, ev: tuple) -> None:
        """The loop's events of `job`'s request, as the HTTP handler hears them."""
        kind = ev[0]
        if kind == "text":
            for out in job.calls.push(ev[1]) if job.calls else [ev]:
                job.emit(out)
        elif kind == "done":
            self._complete(job, ev[1])
        elif kind == "error":
            job.emit(("error", api_error(ev[1])))

    def _complete(self, job: Job, req: Req) -> None:
        self.served += 1
        ext = {"skills": [x.name for x in req.skills], "injection": req.injection, "mode": req.mode, "tiers": req.tiers,
               "tokens": req.tokens, "spans": [sp.to_json() for sp in req.spans],
               "output_token_ids": list(req.output), "timings_ms": req.timings_ms()}
        text, calls, finish = req.text, [], req.finish_reason
        if job.calls is not None:
            for out in job.calls.finish():
                job.emit(out)
            text, calls = job.calls.text, job.calls.calls
            finish = "tool_calls" if calls and finish == "stop" else finish
            ext["tool_calls"] = {"format": job.calls.fmt, "parsed": len(calls), "invalid": job.calls.invalid}
            self.protocol["tool_calls"] += len(calls)
            self.protocol["invalid_tool_calls"] += job.calls.invalid
        if req.constraint is not None:
            ext["constrained"] = req.constraint.what
            self.protocol["constrained_" + req.constraint.what] += 1
        try:  # queued before the answer is out, so a /stats after it waits for this record
            self._stats.submit(self._record, req)
        except RuntimeError:  # shutting down: statistics are never worth a failed request
            pass
        job.emit(("done", {"text": text, "tool_calls": calls, "finish": finish, "stop_sequence": req.stop_text.which,
                           "usage": usage(len(req.ids), len(req.output), req.cached), "ext": ext}))

    def _record(self, req: Req) -> None:
        """Record the request in the store's statistics (a background thread; never fails a request)."""
        from skillkv.answer import Answer

        ans = Answer.of(req, req.select_on, self.model_name, 0.0, req.t_submit, req.t_submit)
        self.kv.record(ans, req.skills)

    # ------------------------------------------------------------------ skills: pins and live edits

    def _warm_pins(self, again: bool = False) -> None:
        for name, tiers in self.kv.warm_pins(again):
            self.log(f"pin: {name} {'already resident' if tiers == ['l1'] else 'warmed'}")

    def _watch_tick(self) -> None:
        if self.watcher is None:
            return
        try:
            lines = self.watcher.poll(self._pending)
        except SkillError as e:
            self.log(f"watch: {e}")
            self.watcher.stop()
            self.watcher = None
            return
        if any(ln.result in CHANGES for ln in lines):
            self._invalidate()

    def _invalidate(self) -> None:
        """After a skill changed: forget parsed skills, retire resident prefixes that are no longer current (once
        no running request holds them), warm pinned skills again."""
        kv = self.kv
        kv.reload()
        live = kv.live_keys()
        self.runner.retire(lambda key: key in live)
        try:
            self._warm_pins(again=True)
        except SkillkvError as e:
            self.log(f"pin: {e}")
