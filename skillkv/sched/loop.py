"""The one engine loop: schedule -> run -> postprocess (nano-vllm's `step()`), for `skillkv ask` (a batch of one,
`run`) and `skillkv serve` (its engine thread calls `step` between taking new requests).

    loop = Loop(runner, opener=kv.open_request, stop_ids=..., tokenizer=...)
    loop.run(req)                 # ask: until the request is done
    loop.add(req); loop.step()    # serve: one batched step of every running request

One step: drop cancelled requests (their pages are freed at once), admit waiting ones (`opener(req)` opens the
prefix: prefix cache, skill KV resident or paged in, composed, or prefilled in full mode, and sets `req.pending`),
run ONE batched `runner.prefill` over what each running request has pending, then per request: a prompt fed only
in part waits for the next step; otherwise the next token is sampled, streamed (incremental detokenization, stop
strings held back; a request's grammar, sched/grammar.py, masks its logits first and accepts the token) and
checked against the stop ids, the stop strings and `max_new`; a finished request releases
its sequence (its full pages stay in the runner's prefix cache) and emits ("done", req).

A snapshot found damaged while it streams in fails the step: every request of the step that was reading a prefix
still arriving is released and reopened (its pieces removed from the store and recomputed: `on_damaged`), at most
twice; the others run the step again (nothing of a failed step was kept).
"""

from __future__ import annotations

import time
from typing import Callable

from skillkv.engine.pages import PoolFull
from skillkv.errors import SnapshotError
from skillkv.generate import StopText, TextStream, sample
from skillkv.lazy import torch
from skillkv.runners.base import Runner
from skillkv.sched.grammar import ConstraintError
from skillkv.sched.request import Req
from skillkv.sched.scheduler import Scheduler, Step


class Loop:
    def __init__(self, runner: Runner, opener: Callable[[Req], None], stop_ids, tokenizer, max_batch: int = 64,
                 max_step_tokens: int = 4096, on_damaged: Callable[[Exception, Req], None] | None = None):
        self.runner, self.opener, self.tokenizer = runner, opener, tokenizer
        self.stop_ids = set(stop_ids)
        self.on_damaged = on_damaged or (lambda e, req: None)
        self.sched = Scheduler(max_batch, max_step_tokens, split=runner.cache_exact, reserve=self._reserve)
        self.steps = 0

    # ------------------------------------------------------------------ requests

    def add(self, req: Req) -> None:
        p = req.params
        req.gen = torch.Generator().manual_seed(p.seed) if p.temperature > 0 else None
        req.stop_text = StopText(req.stop, lambda s: req.emit(("text", s)))
        req.stream = TextStream(self.tokenizer, req.stop_text.push)
        self.sched.add(req)

    def cancel(self, req: Req) -> None:
        """Drop `req` at the next step (a client gone); no-op once it is done."""
        req.cancelled = True

    def run(self, req: Req) -> Req:
        """Add `req` and step until it is done (`skillkv ask`). Raises what failed it."""
        self.add(req)
        while req.state != "done":
            self.step()
        if req.finish_reason == "error":
            raise req.error
        return req

    def has_work(self) -> bool:
        return self.sched.has_work()

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """Run one batched step; False when there was nothing to run."""
        for r in self.sched.drop_cancelled():
            self._release(r)
        step = self.sched.plan(self._admit, self._fail)
        if step is None:
            return False
        t0 = time.perf_counter()
        try:
            logits = self.runner.prefill([r.seq for r in step.reqs], step.inputs)
        except SnapshotError as e:
            self._damaged(e, step)
            return True
        took = time.perf_counter() - t0
        for r in step.reqs:
            if not r.t_first:  # its prompt still being fed (this step may give its first token)
                r.prefill_s += took
        self.steps += 1
        self._postprocess(step, logits)
        return True

    def _postprocess(self, step: Step, logits: torch.Tensor) -> None:
        failed = {}
        for i, (r, fed) in enumerate(zip(step.reqs, step.inputs)):
            if r.constraint is not None and len(r.pending) == len(fed):  # its next token is chosen now
                try:
                    with torch.inference_mode():  # the runner's logits are inference tensors: masked in place
                        r.constraint.mask(logits[i])
                except ConstraintError as e:
                    failed[i] = e
        greedy = torch.argmax(logits, dim=-1).tolist()
        now = time.perf_counter()
        for i, (r, fed) in enumerate(zip(step.reqs, step.inputs)):
            r.pending = r.pending[len(fed):]
            if r.pending:  # a prompt fed in part: the rest next step
                continue
            if r.logits is not None:
                r.logits.append(logits[i])
            tok = greedy[i] if r.params.temperature <= 0 else sample(logits[i], r.params, r.gen)
            if not r.t_first:
                r.t_first = now
            if r.constraint is not None and i not in failed:
                try:
                    r.constraint.accept(tok)
                except ConstraintError as e:
                    failed[i] = e
            if i in failed:
                self.sched.finish(r)
                self._fail(r, failed[i])
                continue
            if tok in self.stop_ids:
                self._complete(r, "stop")
                continue
            r.output.append(tok)
            r.stream.push(tok)
            if r.stop_text.hit:
                self._complete(r, "stop")
            elif len(r.output) >= r.max_new:
                self._complete(r, "length")
            else:
                r.pending = [tok]

    # ------------------------------------------------------------------ admission and the end of a request

    def _reserve(self, req: Req) -> int:
        r = self.runner
        return max(0, req.worst_pages(r.page_size, len(getattr(req.seq, "shared", ()))) - r.held_pages(req.seq))

    def _admit(self, req: Req, reserved: int) -> bool:
        """Open the request's prefix and start it, if the pool can hold its worst case now."""
        r = self.runner
        if not r.can_alloc(req.worst_pages(r.page_size, r.cached_tokens(req.ids) // r.page_size) + reserved):
            return self._wait_or_fail()
        (req.opener or self.opener)(req)
        if not r.can_alloc(reserved + self._reserve(req)):
            r.release(req.seq)
            req.seq = None
            return self._wait_or_fail()
        req.t_start = time.perf_counter()
        req.emit(("opened", req))
        return True

    def _wait_or_fail(self) -> bool:
        if not self.sched.running:
            raise PoolFull("the KV pool cannot hold this request even with nothing else running "
                           "(raise --gpu-kv-budget)")
        return False

    def _damaged(self, e: SnapshotError, step: Step) -> None:
        for r in step.reqs:
            if len(r.pending) <= 1 and r.output:  # a decode: its prefix had arrived; it runs the step again
                continue
            self.sched.finish(r)
            self._release(r)
            r.retries += 1
            if r.retries > 2:
                self._fail(r, e)
                continue
            self.on_damaged(e, r)
            r.state, r.pending = "waiting", []
            self.sched.waiting.appendleft(r)

    def _fail(self, req: Req, e: Exception) -> None:
        req.finish_reason, req.error, req.t_end = "error", e, time.perf_counter()
        req.state = "done"
        self._release(req)
        req.emit(("error", e))

    def fail_running(self, e: Exception) -> None:
        """Fail every running and waiting request (the loop's owner caught an unexpected error)."""
        for r in list(self.sched.running) + list(self.sched.waiting):
            self.sched.finish(r)
            self._fail(r, e)
        self.sched.waiting.clear()

    def _release(self, req: Req) -> None:
        if req.seq is not None:
            self.runner.release(req.seq)
            req.seq = None

    def _complete(self, req: Req, finish: str) -> None:
        self.sched.finish(req)
        self._release(req)
        req.stop_text.flush()
        req.text, req.finish_reason, req.t_end = req.stop_text.text, finish, time.perf_counter()
        req.emit(("done", req))
