"""CUDA graphs for the lean runner: one captured forward per (batch, tokens, page-table width) bucket, replayed
after a plan.

Why: the forward of an 8B model over a 100-token question is ~400 small kernels launched one by one from Python,
which costs more than the ~5 ms the GPU needs to read the weights. A replay launches the whole captured forward at
once. Any attention backend whose `for_graph` gives a capturable copy is captured (FlashInfer in its CUDA-graph
mode, FA3 with its metadata in fixed device buffers, engine/attention*.py); the element-wise ops (torch, Triton or
FlashInfer) and GEMMs are captured with it. Long prefills (more tokens than the largest bucket) run eagerly,
where launches are hidden behind compute anyway.

A graph's shapes are fixed, so a batch is padded to its bucket:
  - n real sequences round up to a batch bucket b; the b - n missing ones are filler sequences of one token;
  - one pad sequence at the end takes the rest of the token bucket t (at least one token), so every plan has
    b + 1 sequences and exactly t rows, as the captured one had. Token buckets step by 8 up to 128 rows (16 up
    to 256, 32 up to 512): the weight GEMMs run on t rows, so a 100-token question pays for 104, not 128;
  - backends whose kernels depend on the page-table width (FA3) add the width bucket to the key.
Filler and pad tokens write their KV to one scratch slot (a page the engine reserves and never hands out) and
attend over the scratch page only: they never read or write a page of a real sequence, and their rows are
dropped. Host work per replay: one pinned staging buffer filled with numpy, one host -> device copy (plus the
backend's plan: one more copy for FA3), one graph launch.
Contract: `run` returns what the eager forward would, up to the kernels' scheduling of the same math for the
padded shapes (checked on the GPU in tests/engine/test_paged_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skillkv.engine.attention import AttentionBackend, SeqView

TOKEN_BUCKETS = tuple(range(8, 129, 8)) + tuple(range(144, 257, 16)) + tuple(range(288, 513, 32))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def capturable(backend: AttentionBackend) -> bool:
    """Whether `backend` has a CUDA-graph mode (overrides `for_graph`)."""
    return type(backend).for_graph is not AttentionBackend.for_graph and backend.pool.device.type == "cuda"


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    backend: AttentionBackend
    inputs: torch.Tensor  # device int64 [3t + b]: ids, positions, slots, logits rows
    staging: torch.Tensor  # pinned host copy of `inputs`
    copied: torch.cuda.Event  # the last staging -> inputs copy has been done (staging may be rewritten)
    logits: torch.Tensor  # [b, vocab] float32, overwritten by every replay
    batch: int
    tokens: int


def bucket(n_seqs: int, n_tokens: int) -> tuple[int, int] | None:
    """The (batch, tokens) bucket for a batch, or None when it is larger than every bucket."""
    b = next((x for x in BATCH_BUCKETS if x >= n_seqs), None)
    if b is None:
        return None
    t = next((x for x in TOKEN_BUCKETS if x >= n_tokens + (b - n_seqs) + 1), None)
    return None if t is None else (b, t)


class CudaGraphs:
    """Captured forwards of `runner` over `pool`, captured lazily on a bucket's first use. `q_heads` and `scale`
    are kept for callers; the captured backends are made by the runner's own backend (`for_graph`)."""

    def __init__(self, runner, pool, q_heads: int, scale: float, scratch_page: int):
        self.runner, self.pool = runner, pool
        self.scratch_page, self.scratch_slot = scratch_page, scratch_page * pool.page_size
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.replays = 0
        self.last: tuple[int, int, int] | None = None  # the key of the graph last run (for profiling)

    def reset(self) -> None:
        """Drop every captured graph (they are captured again on use), e.g. after the runner's kernels changed.
        A fresh memory pool: torch does not let a pool whose graphs are all gone take new captures."""
        self.graphs.clear()
        self.last = None
        self.mempool = torch.cuda.graph_pool_handle()

    def _pad(self, seqs: list[SeqView], n_tokens: int, b: int, t: int) -> list[SeqView]:
        filler = [SeqView([self.scratch_page], 1, 1)] * (b - len(seqs))
        rest = t - n_tokens - len(filler)
        pad = SeqView([self.scratch_page] * self.pool.table.pages_for(rest), rest, rest)
        return list(seqs) + filler + [pad]

    def _capture(self, b: int, t: int, width: int) -> _Graph:
        dev = self.pool.device
        backend = self.runner.backend.for_graph(b + 1, t, width)
        inputs = torch.zeros(3 * t + b, dtype=torch.long, device=dev)
        inputs[2 * t:3 * t] = self.scratch_slot
        inputs[3 * t:] = torch.arange(b)
        backend.plan(self._pad([], 0, b, t))
        ids, pos, slots, rows = inputs[:t], inputs[t:2 * t], inputs[2 * t:3 * t], inputs[3 * t:]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocator, cuBLAS handles, JIT, lazy kernel loading)
                self.runner.compute(ids, pos, slots, rows, backend=backend)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = self.runner.compute(ids, pos, slots, rows, backend=backend)
        staging = torch.empty(3 * t + b, dtype=torch.long, pin_memory=True)
        copied = torch.cuda.Event()
        copied.record()
        return _Graph(graph, backend, inputs, staging, copied, logits, b, t)

    def run(self, ids: list[int], positions: list[int], slots: list[int], seqs: list[SeqView],
            logits_at: list[int], layer_ready=None) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] of the rows `logits_at`, by graph replay; None when the batch fits no bucket
        (the caller then runs the eager forward). With `layer_ready` (layer-pipelined paging, which a graph
        cannot wait for), the very same padded inputs and planned kernels run eagerly instead of replaying, so
        the result is bit for bit what the replay would give."""
        n_tokens = len(ids)
        bt = bucket(len(seqs), n_tokens)
        if bt is None:
            return None
        b, t = bt
        pages_for = self.pool.table.pages_for
        most = max(pages_for(s.kv_len) for s in seqs)
        if sum(pages_for(s.kv_len) for s in seqs) > b * self.pool.num_pages:
            return None
        width = self.runner.backend.graph_width(max(most, pages_for(t)))
        key = (b, t, width)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(b, t, width)
        self.last = key
        n_fill = b - len(seqs)
        g.copied.synchronize()  # the previous replay's inputs have left the staging buffer
        host = g.staging.numpy()
        host[:n_tokens] = ids
        host[n_tokens:t] = 0
        host[t:t + n_tokens] = positions
        host[t + n_tokens:2 * t] = 0
        host[2 * t:2 * t + n_tokens] = slots
        host[2 * t + n_tokens:3 * t] = self.scratch_slot
        host[3 * t:3 * t + len(seqs)] = logits_at
        host[3 * t + len(seqs):] = np.arange(n_tokens, n_tokens + n_fill)  # the fillers' own rows
        g.inputs.copy_(g.staging, non_blocking=True)
        g.copied.record()
        g.backend.plan(self._pad(seqs, n_tokens, b, t))
        if layer_ready is not None:
            i = g.inputs
            out = self.runner.compute(i[:t], i[t:2 * t], i[2 * t:3 * t], i[3 * t:], backend=g.backend,
                                      layer_ready=layer_ready)
            return out[:len(seqs)]
        g.graph.replay()
        self.replays += 1
        return g.logits[:len(seqs)].clone()
