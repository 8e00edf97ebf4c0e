"""Continuous batching: which sequences run in the next engine step. Free of torch (tested on its own).

Each step is ONE batched engine call: every running sequence feeds its last sampled token (a decode is a
1-token prefill) and newly admitted sequences feed their whole prompt (their question segment). Policy:

  - FIFO admission, up to `max_batch` running sequences and `max_step_tokens` prompt tokens per step (the first
    waiting sequence is always admissible into an idle engine, however long, so nothing starves);
  - KV pages are reserved for a sequence's worst case (prompt + max_tokens) at admission, so a running sequence
    never runs out of pages mid-answer (no preemption needed): a sequence is admitted only if the pool can hold
    its worst case plus what the running ones may still claim;
  - `admit(seq)` (the engine side) makes the sequence's skill prefix resident and starts it; it returns False
    when the pool cannot hold it yet (the sequence keeps its place) or raises to fail that one sequence.

A sequence's answer does not depend on the batches it ran in: the engine is batch-invariant (engine/llama.py),
and prefills are never split, so a sequence's own computation has the same shapes alone or batched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass(eq=False)
class Seq:
    """One request's generation state."""

    rid: str
    prompt: list[int]  # ids to prefill on top of the prefix
    max_new: int  # answer token limit
    prefix_tokens: int = 0  # tokens of its prefix (preamble and skills)
    output: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting | running | done
    cancelled: bool = False
    req: object = None  # the engine's Request once started
    data: object = None  # the owner's per-request state
    shared_prefix: bool = True  # the prefix's full pages are a resident entry's (else the sequence's own)

    def worst_pages(self, page_size: int) -> int:
        """Private pages the sequence may need: its share of the prefix's partial page (or the whole prefix when
        it is not shared), prompt and answer."""
        total = self.prefix_tokens + len(self.prompt) + self.max_new
        return -(-total // page_size) - (self.prefix_tokens // page_size if self.shared_prefix else 0)



@dataclass
class Step:
    prefills: list[Seq]
    decodes: list[Seq]

    @property
    def seqs(self) -> list[Seq]:
        return self.decodes + self.prefills

    def inputs(self) -> list[list[int]]:
        return [[s.output[-1]] for s in self.decodes] + [s.prompt for s in self.prefills]


class Scheduler:
    def __init__(self, max_batch: int = 64, max_step_tokens: int = 4096, page_size: int = 16,
                 held: Callable[[Seq], int] = lambda seq: 0):
        """`held(seq)`: the pages a running sequence holds now (the runner's count)."""
        self.max_batch, self.max_step_tokens, self.page_size, self.held = max_batch, max_step_tokens, page_size, held
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reserved_pages(self) -> int:
        """Pages the running sequences may still allocate."""
        return sum(max(0, s.worst_pages(self.page_size) - self.held(s)) for s in self.running)

    def drop_cancelled(self) -> list[Seq]:
        """Remove cancelled sequences (waiting or running) and return them (the caller frees their pages)."""
        gone = [s for s in list(self.waiting) + self.running if s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self.running = [s for s in self.running if not s.cancelled]
        for s in gone:
            s.state = "done"
        return gone

    def finish(self, seq: Seq) -> None:
        seq.state = "done"
        self.running.remove(seq)

    def plan(self, admit: Callable[[Seq, int], bool], fail: Callable[[Seq, Exception], None]) -> Step | None:
        """The next step, or None when there is nothing to run. `admit(seq, reserved_pages)` starts a waiting
        sequence (True) or says it does not fit yet (False); an exception from it fails that sequence via
        `fail(seq, exc)`."""
        decodes = list(self.running)
        prefills: list[Seq] = []
        tokens = len(decodes)
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if (prefills or decodes) and tokens + len(seq.prompt) > self.max_step_tokens:
                break
            try:
                ok = admit(seq, self.reserved_pages())
            except Exception as e:  # noqa: BLE001 - the engine side decides what is fatal for this sequence
                self.waiting.popleft()
                seq.state = "done"
                fail(seq, e)
                continue
            if not ok:
                break
            self.waiting.popleft()
            seq.state = "running"
            self.running.append(seq)
            prefills.append(seq)
            tokens += len(seq.prompt)
        if not decodes and not prefills:
            return None
        return Step(prefills, decodes)
