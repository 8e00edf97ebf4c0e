"""CUDA graphs for the lean runner: one captured forward per (batch bucket, token bucket), replayed after a plan.

Why: the forward of an 8B model over a 100-token question is ~400 small kernels launched one by one from Python,
which costs more than the ~5 ms the GPU needs to read the weights. A replay launches the whole captured forward at
once. Only the FlashInfer backend is captured (its CUDA-graph mode keeps the page-table buffers at fixed
addresses and reads each new plan from them); long prefills (more tokens than the largest bucket) run eagerly,
where launches are hidden behind compute anyway.

A graph's shapes are fixed, so a batch is padded to its bucket:
  - n real sequences round up to a batch bucket b; the b - n missing ones are filler sequences of one token;
  - one pad sequence at the end takes the rest of the token bucket t (at least one token), so every plan has
    b + 1 sequences and exactly t rows, as the captured one had (FlashInfer derives its tile size from those).
Filler and pad tokens write their KV to one scratch slot (a page the engine reserves and never hands out) and
attend over the scratch page only: they never read or write a page of a real sequence, and their rows are
dropped. Contract: `run` returns what the eager forward would, up to FlashInfer's scheduling of the same math
(checked on the GPU in tests/test_paged_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skillkv.engine.attention import FlashInferBackend, SeqView

TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    backend: FlashInferBackend
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
    """Captured forwards of `runner` over `pool`, captured lazily on a bucket's first use."""

    def __init__(self, runner, pool, q_heads: int, scale: float, scratch_page: int):
        self.runner, self.pool, self.q_heads, self.scale = runner, pool, q_heads, scale
        self.scratch_page, self.scratch_slot = scratch_page, scratch_page * pool.page_size
        self.workspace = torch.empty(256 << 20, dtype=torch.uint8, device=pool.device)
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.replays = 0

    def _pad(self, seqs: list[SeqView], n_tokens: int, b: int, t: int) -> list[SeqView]:
        filler = [SeqView([self.scratch_page], 1, 1)] * (b - len(seqs))
        rest = t - n_tokens - len(filler)
        pad = SeqView([self.scratch_page] * self.pool.table.pages_for(rest), rest, rest)
        return list(seqs) + filler + [pad]

    def _max_indices(self, b: int, t: int) -> int:
        return b * self.pool.num_pages + b + self.pool.table.pages_for(t) + 1

    def _capture(self, b: int, t: int) -> _Graph:
        dev = self.pool.device
        backend = FlashInferBackend(self.pool, self.q_heads, self.scale, graph_batch=b + 1,
                                    max_indices=self._max_indices(b, t), workspace=self.workspace,
                                    kernel=self.runner.backend.kernel)
        inputs = torch.zeros(3 * t + b, dtype=torch.long, device=dev)
        inputs[2 * t:3 * t] = self.scratch_slot
        inputs[3 * t:] = torch.arange(b)
        backend.plan(self._pad([], 0, b, t))
        ids, pos, slots, rows = inputs[:t], inputs[t:2 * t], inputs[2 * t:3 * t], inputs[3 * t:]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (allocator, cuBLAS handles, lazy kernel loading)
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
        if sum(self.pool.table.pages_for(s.kv_len) for s in seqs) > b * self.pool.num_pages:
            return None
        g = self.graphs.get(bt)
        if g is None:
            g = self.graphs[bt] = self._capture(b, t)
        n_fill = b - len(seqs)
        g.copied.synchronize()  # the previous replay's inputs have left the staging buffer
        host = g.staging
        host[:n_tokens] = torch.tensor(ids)
        host[n_tokens:t] = 0
        host[t:t + n_tokens] = torch.tensor(positions)
        host[t + n_tokens:2 * t] = 0
        host[2 * t:2 * t + n_tokens] = torch.tensor(slots)
        host[2 * t + n_tokens:3 * t] = self.scratch_slot
        host[3 * t:3 * t + len(seqs)] = torch.tensor(logits_at)
        host[3 * t + len(seqs):] = torch.arange(n_tokens, n_tokens + n_fill)  # the fillers' own rows
        g.inputs.copy_(host, non_blocking=True)
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
