"""Sampling, incremental detokenization and stop strings: the parts of decoding the engine loop (sched/loop.py)
uses for every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from skillkv.lazy import torch


@dataclass
class SamplingParams:
    """Greedy when temperature == 0 (the default, and what exactness is defined over)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


class TextStream:
    """Incremental detokenization: emits only complete characters (no half UTF-8 sequences)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text, self.ids, self.sent = tokenizer, on_text, [], 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if self.on_text and len(text) > self.sent:
            self.on_text(text[self.sent:])
        self.sent = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class StopText:
    """Streams text deltas, holding back what could be the start of a stop string; cuts at the first stop."""

    def __init__(self, stops: list[str], emit: Callable[[str], None]):
        self.stops, self.emit, self.buf, self.text, self.hit = stops, emit, "", "", False
        self.which: str | None = None  # the stop string that cut the text
        self.hold = max((len(s) for s in stops), default=1) - 1  # held back

    def push(self, delta: str) -> None:
        if self.hit:
            return
        self.buf += delta
        # every stop occurrence starts inside buf: what was sent was checked with `hold` characters after it
        found = [(i, s) for i, s in ((self.buf.find(s), s) for s in self.stops) if i >= 0]
        if found:
            at, self.which = min(found)
            self.buf, self.hit = self.buf[:at], True
            self.flush()
            return
        keep = len(self.buf) - self.hold
        if keep > 0:
            self._send(self.buf[:keep])
            self.buf = self.buf[keep:]

    def flush(self) -> None:
        if self.buf:
            self._send(self.buf)
            self.buf = ""

    def _send(self, s: str) -> None:
        self.text += s
        self.emit(s)
