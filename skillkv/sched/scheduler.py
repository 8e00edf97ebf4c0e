"""Continuous batching: which requests run in the next engine step. Free of torch (tested on its own).

Each step is ONE batched runner call: every running request feeds what it has pending (a decode feeds its last
sampled token: a 1-token prefill; a newly opened one its prompt's rest). Policy:

  - FIFO admission, up to `max_batch` running requests and `max_step_tokens` prompt tokens per step. The first
    request of an idle engine is always admitted, however long, so nothing starves;
  - a prompt longer than what the step has left is fed in pieces over several steps when `split` is set (the
    runner is chunk-invariant: a row's KV does not depend on where a step starts), else whole;
  - KV pages are reserved for a request's worst case (prompt + max_new, less the pages it only references) at
    admission, so a running request never runs out of pages mid-answer (no preemption needed);
  - `admit(req, reserved_pages)` (the loop's side) opens the request's prefix and sets `req.pending`; it returns
    False when the pool cannot hold it yet (the request keeps its place) or raises to fail that one request.

A request's answer does not depend on the steps it ran in: the runner is batch-invariant (engine/llama.py), and a
prompt is split only where it is chunk-invariant.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass
class Step:
    reqs: list  # Req, decodes first
    inputs: list[list[int]]  # what each feeds


class Scheduler:
    def __init__(self, max_batch: int = 64, max_step_tokens: int = 4096, split: bool = False,
                 reserve: Callable[[object], int] = lambda req: 0):
        """`reserve(req)`: pages a running request may still allocate (its worst case less what it holds)."""
        self.max_batch, self.max_step_tokens, self.split, self.reserve = max_batch, max_step_tokens, split, reserve
        self.waiting: deque = deque()
        self.running: list = []

    def add(self, req) -> None:
        req.state = "waiting"
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reserved_pages(self) -> int:
        return sum(self.reserve(r) for r in self.running)

    def drop_cancelled(self) -> list:
        """Remove cancelled requests (waiting or running) and return them (the caller frees their pages)."""
        gone = [r for r in list(self.waiting) + self.running if r.cancelled]
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        self.running = [r for r in self.running if not r.cancelled]
        for r in gone:
            r.state = "done"
        return gone

    def finish(self, req) -> None:
        req.state = "done"
        if req in self.running:
            self.running.remove(req)

    def plan(self, admit: Callable[[object, int], bool], fail: Callable[[object, Exception], None]) -> Step | None:
        """The next step, or None when there is nothing to run."""
        budget = self.max_step_tokens - sum(1 for r in self.running if len(r.pending) == 1)
        while self.waiting and len(self.running) < self.max_batch and (budget > 0 or not self.running):
            req = self.waiting[0]
            try:
                ok = admit(req, self.reserved_pages())
            except Exception as e:  # noqa: BLE001 - the loop decides what is fatal for this request
                self.waiting.popleft()
                req.state = "done"
                fail(req, e)
                continue
            if not ok:
                break
            self.waiting.popleft()
            req.state = "running"
            self.running.append(req)
            budget -= len(req.pending)
        decodes = [r for r in self.running if len(r.pending) == 1]
        reqs, inputs = list(decodes), [list(r.pending) for r in decodes]
        left = self.max_step_tokens - len(decodes)
        for r in self.running:
            if len(r.pending) <= 1:
                continue
            if not reqs:  # an idle step takes the first prompt whole (or its first piece)
                take = len(r.pending) if not self.split else max(1, min(len(r.pending), left))
            elif left <= 0 or (len(r.pending) > left and not self.split):
                continue
            else:
                take = min(len(r.pending), left)
            reqs.append(r)
            inputs.append(list(r.pending[:take]))
            left -= take
        return Step(reqs, inputs) if reqs else None
