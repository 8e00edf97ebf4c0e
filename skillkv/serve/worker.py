"""The engine thread of `skillkv serve`: it alone touches the SkillKV (its runner, tiers, store) and the watcher.

HTTP handlers talk to it through a queue (`submit`, `call`, `cancel`) and get events back on their own asyncio
queue: ("accepted", info) or ("error", ApiError) first, then ("text", delta)..., then ("done", result) or
("error", ApiError). One loop iteration: take new requests (validate, tokenize, choose skills), poll the watcher,
drop cancelled sequences (their pages are freed at once), then run one batched step planned by the Scheduler
and sample every sequence's next token.

A request is opened exactly as `skillkv ask` opens one (SkillKV.open: the same mode choice, L1 / host / L2 paging
through the tiers, compose, pins, the same snapshots and fingerprint); continuous batching is the runner's batched
prefill (a decode step is a 1-token prefill). Skill prefixes are resident entries of the runner keyed by their
chain key, shared by every request that uses the same skills in the same order. When the watcher recompiles a
skill, the entries whose chain is no longer current are retired as soon as no running request holds them (a request
that started on the old version finishes on it), and pinned skills are warmed again.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from skillkv.generate import SamplingParams, StopText, TextStream, sample
from skillkv.engine.pages import PoolFull
from skillkv.errors import PromptTooLong, SkillError, SkillkvError
from skillkv.serve.messages import question_ids
from skillkv.serve.protocol import ApiError, ChatRequest, usage
from skillkv.serve.scheduler import Scheduler, Seq, Step

CHANGES = {"compiled", "recompiled", "deleted", "renamed"}


@dataclass(eq=False)
class Job:
    """One chat request as the engine thread sees it."""

    body: ChatRequest
    emit: Callable[[tuple], None]  # thread-safe: puts an event on the request's asyncio queue
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    seq: Seq | None = None
    chosen: list = field(default_factory=list)
    key: str | None = None  # the exact prefix's chain key (None: no skills)
    mode: str = "auto"
    select_on: str = ""
    params: SamplingParams | None = None
    gen: torch.Generator | None = None
    stream: TextStream | None = None
    stop: StopText | None = None
    cached: int = 0
    tiers: list[str] = field(default_factory=list)
    snapshot_load: float = 0.0
    t_start: float = 0.0
    t_first: float = 0.0


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
        self.sched: Scheduler | None = None
        self.watcher = None
        self.skipped: dict[str, str] = {}  # skill or folder -> why it is not served (invalid, too long, ...)
        self._pending: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="skillkv-stats")
        self.steps = 0
        self.served = 0

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
        self.sched = Scheduler(self.max_batch, self.max_step_tokens, self.runner.page_size,
                               held=lambda s: self.runner.held_pages(s.req) if s.req is not None else 0)
        self.stop_ids = set(kv.handle.stop_ids)
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
        if job.seq is not None:
            job.seq.cancelled = True
        self.inbox.put(("wake",))

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread (between steps) and return its future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("call", fn, fut))
        return fut

    def snapshot(self) -> dict:
        """Counters for /health, read without locking (approximate while a step runs)."""
        return {"running": len(self.sched.running), "waiting": len(self.sched.waiting), "steps": self.steps,
                "served": self.served, "runner": self.runner.name, "pool": self.runner.usage()}

    # ------------------------------------------------------------------ the loop (engine thread)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drain(block=not self.sched.has_work())
                self._watch_tick()
                for s in self.sched.drop_cancelled():
                    self._release(s)
                step = self.sched.plan(self._admit, self._fail)
                if step is not None:
                    self._step(step)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server: fail what was running
                self.log(f"error: engine step failed: {type(e).__name__}: {e}")
                for s in list(self.sched.running):
                    self.sched.finish(s)
                    self._release(s)
                    s.data.emit(("error", ApiError(500, f"engine error: {type(e).__name__}: {e}", "server_error")))
        for s in list(self.sched.running) + list(self.sched.waiting):
            s.data.emit(("error", ApiError(503, "server shutting down", "server_error")))

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
        """Validate and tokenize a new request; queue it or answer an error."""
        if job.cancelled:
            return
        kv, b = self.kv, job.body
        try:
            b.check()
            if b.model not in (self.model_name, "default", "skillkv"):
                raise ApiError(404, f"model {b.model!r} not found; this server serves {self.model_name!r}",
                               "not_found_error", "model", "model_not_found")
            q_ids, job.select_on = question_ids(kv.builder, b.messages, kv.handle.max_context)
            if b.skills is not None:
                try:
                    job.chosen = kv.pick(b.skills)
                except SkillError as e:
                    raise ApiError(400, str(e), param="skills", code="skill_not_found") from None
            else:
                job.chosen = kv.select(job.select_on)
            prefix = len(kv.builder.preamble_ids()) + sum(len(kv.builder.skill_ids(s)) for s in job.chosen)
            total = prefix + len(q_ids)
            want = b.answer_limit
            try:
                kv.check_fits(total, want or 1, len(q_ids))
            except PromptTooLong as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            max_new = min(want or self.default_max_tokens, kv.handle.max_context - total)
            job.key = kv.compiler.keys(job.chosen)[-1] if job.chosen else None
            job.mode = b.mode
            # full mode and a prompt without skills prefill their prefix into the request's own pages
            seq = Seq(job.rid, q_ids, max_new, prefix, data=job, shared_prefix=bool(job.chosen) and b.mode != "full")
            r = self.runner
            if seq.worst_pages(r.page_size) + r.pages_for(prefix) > r.num_pages:
                raise ApiError(400, f"prompt of {total} tokens plus {max_new} answer tokens does not fit the KV pool "
                               f"({r.num_pages} pages of {r.page_size} tokens; raise --gpu-kv-budget)",
                               param="max_tokens", code="kv_pool_exceeded")
        except ApiError as e:
            job.emit(("error", e))
            return
        except SkillkvError as e:
            job.emit(("error", ApiError(400, str(e))))
            return
        job.params = SamplingParams(max_tokens=max_new, temperature=b.temperature or 0.0,
                                    top_p=b.top_p if b.top_p is not None else 1.0, seed=b.seed or 0)
        if job.params.temperature > 0:
            job.gen = torch.Generator().manual_seed(job.params.seed if b.seed is not None else
                                                    int.from_bytes(uuid.uuid4().bytes[:4], "little"))
        job.stop = StopText(b.stop or [], lambda s: job.emit(("text", s)))
        job.stream = TextStream(kv.handle.tokenizer, job.stop.push)
        job.seq = seq
        self.sched.add(seq)
        job.emit(("accepted", {"prompt_tokens": total, "skills": [s.name for s in job.chosen]}))

    def _admit(self, seq: Seq, reserved: int) -> bool:
        """Open the sequence's prefix (SkillKV.open: resident, paged in, composed or computed) and start it, if the
        pool can hold its worst case now."""
        job, r = seq.data, self.runner
        worst = seq.worst_pages(r.page_size)
        if not (job.key is not None and r.resident(job.key)) and not r.can_alloc(
                r.pages_for(seq.prefix_tokens) + reserved + worst):
            return self._wait_or_fail()
        opened = self.kv.open(job.chosen, job.mode, settle=True)
        if not r.can_alloc(reserved + worst - r.held_pages(opened.seq)):
            r.release(opened.seq)
            return self._wait_or_fail()
        info = opened.info
        job.mode, job.cached, job.tiers, job.snapshot_load = opened.mode, info["cached"], info["tiers"], \
            info["snapshot_load"]
        seq.req, job.t_start = opened.seq, time.perf_counter()
        return True

    def _wait_or_fail(self) -> bool:
        if not self.sched.running:
            raise PoolFull("the KV pool cannot hold this request even with nothing else running "
                           "(raise --gpu-kv-budget)")
        return False

    def _fail(self, seq: Seq, e: Exception) -> None:
        if isinstance(e, ApiError):
            err = e
        elif isinstance(e, PoolFull):
            err = ApiError(400, str(e), param="max_tokens", code="kv_pool_exceeded")
        elif isinstance(e, SkillkvError):
            err = ApiError(400, str(e))
        else:
            err = ApiError(500, f"{type(e).__name__}: {e}", "server_error")
        seq.data.emit(("error", err))

    def _step(self, step: Step) -> None:
        seqs = step.seqs
        logits = self.runner.prefill([s.req for s in seqs], step.inputs())
        self.steps += 1
        greedy = torch.argmax(logits, dim=-1).tolist()
        now = time.perf_counter()
        for i, s in enumerate(seqs):
            job = s.data
            tok = greedy[i] if job.params.temperature <= 0 else sample(logits[i], job.params, job.gen)
            if not s.output and not job.t_first:
                job.t_first = now
            if tok in self.stop_ids:
                self._complete(s, "stop")
                continue
            s.output.append(tok)
            job.stream.push(tok)
            if job.stop.hit:
                self._complete(s, "stop")
            elif len(s.output) >= s.max_new:
                self._complete(s, "length")

    def _release(self, s: Seq) -> None:
        if s.req is not None:
            self.runner.release(s.req)
            s.req = None

    def _complete(self, s: Seq, finish: str) -> None:
        job, kv = s.data, self.kv
        self.sched.finish(s)
        self._release(s)
        job.stop.flush()
        self.served += 1
        end = time.perf_counter()
        prompt = s.prefix_tokens + len(s.prompt)
        timings = {"queue": round((job.t_start - job.t_submit) * 1e3, 1),
                   "snapshot_load": round(job.snapshot_load * 1e3, 1),
                   "ttft": round((job.t_first - job.t_submit) * 1e3, 1),
                   "total": round((end - job.t_submit) * 1e3, 1)}
        ext = {"skills": [x.name for x in job.chosen], "mode": job.mode, "tiers": job.tiers,
               "output_token_ids": list(s.output), "timings_ms": timings}
        try:  # queued before the answer is out, so a /stats after it waits for this record
            self._stats.submit(self._record, job, s, prompt, finish, timings)
        except RuntimeError:  # shutting down: statistics are never worth a failed request
            pass
        job.emit(("done", {"text": job.stop.text, "finish": finish, "usage": usage(prompt, len(s.output), job.cached),
                           "ext": ext}))

    def _record(self, job: Job, s: Seq, prompt: int, finish: str, timings: dict) -> None:
        """Record the request in the store's statistics (a background thread; never fails a request)."""
        from skillkv.answer import Answer

        ans = Answer(question=job.select_on, answer=job.stop.text, output_token_ids=list(s.output),
                     skills=[x.name for x in job.chosen], mode=job.mode,
                     tokens={"prompt": prompt, "cached": job.cached, "computed": prompt - job.cached},
                     timings_ms={"model_load": 0.0, "snapshot_load": timings["snapshot_load"],
                                 "ttft": timings["ttft"], "total": timings["total"]},
                     model=self.model_name, finish_reason=finish, tiers=job.tiers)
        self.kv.record(ans, job.chosen)

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
