"""FlashAttention-3 over the paged KV pool (`attention="fa3"`; Hopper; `pip install skillkv[fa3]`, the PyPI wheel
`tokenspeed-fa3`, imported as `flash_attn_interface`).

Why: a short question over a long cached prefix is a few query tiles over many keys. FA3's `flash_attn_with_kvcache`
splits the keys across SMs (`num_splits=0`: its own heuristic gives an upper bound from the page-table width, and
a small device kernel picks each sequence's split count from its real length), packs the 4 query heads of a GQA
group into one tile, and runs wgmma/TMA kernels: 83 us per layer for 100 queries over 20,580 keys on an H200,
against 149 us for FlashInfer's FA2 (docs/BENCHMARKS.md).

Layout: the pool's per-layer [num_pages, page_size, kv_heads, head_dim] tensors are FA3's paged layout as they
are; the page table is a dense int32 [batch, width] matrix (row i: sequence i's pages in position order, entries
past its last page unused), `cache_seqlens` each sequence's KV length, `cu_seqlens_q` the ragged query offsets.

Paths (each a function of the batch's shapes only, never of where the pool put the pages, so a batch computed
twice gives the same bits):
  fresh   one sequence with no cached prefix (a skill's prefill in compile and in full mode): attention over the
          step's own new K/V rows, contiguous (FA3's non-paged causal kernel: 5.13 ms a layer at 20,480 tokens on an
          H200 against 5.89 through the page table, and the same bits)
  paged   everything else: varlen queries over the paged pool
Graph mode (`for_graph`): the metadata lives in one device int32 buffer at a fixed address, refreshed by one
host -> device copy from a pinned staging buffer per plan; the kernels' launch decisions (split bound, tile
sizes) are fixed at capture from (batch, tokens, width).
"""

from __future__ import annotations

import numpy as np
import torch

from skillkv.engine.attention import AttentionBackend, SeqView
from skillkv.engine.pool import KVPool
from skillkv.errors import SkillkvError

MIN_WIDTH = 16  # smallest page-table width bucket of a graph (pages)


class FA3Backend(AttentionBackend):
    name = "fa3"

    def __init__(self, pool: KVPool, q_heads: int, scale: float, num_splits: int = 0,
                 graph: tuple[int, int, int] | None = None, kernel=None):
        """`kernel`: a callable with `flash_attn_with_kvcache`'s signature in place of FA3's (tests check the
        plans on the CPU with a torch reference); `graph`: (batch, tokens, width) of a CUDA-graph copy."""
        super().__init__(pool, q_heads, scale)
        if kernel is None:
            try:
                from flash_attn_interface import flash_attn_with_kvcache as kernel
            except ImportError:
                raise SkillkvError("the fa3 backend needs `pip install skillkv[fa3]` (tokenspeed-fa3)") from None
            if pool.device.type != "cuda" or torch.cuda.get_device_capability(pool.device)[0] != 9:
                raise SkillkvError("the fa3 backend runs on Hopper GPUs only (H100, H200); use flashinfer or torch")
            if pool.dtype not in (torch.bfloat16, torch.float16):
                raise SkillkvError(f"the fa3 backend needs a bf16 or fp16 KV pool, not {pool.dtype}")
        self.fn, self.num_splits, self.graph = kernel, num_splits, graph
        self.fresh = False
        if graph is not None:
            batch, tokens, width = graph
            n = (batch + 1) + batch + batch * width
            self.meta = torch.zeros(n, dtype=torch.int32, device=pool.device)
            self.staging = torch.zeros(n, dtype=torch.int32, pin_memory=True)
            self.host = self.staging.numpy()
            self.copied = torch.cuda.Event()
            self.copied.record()
            self._views(self.meta, batch, width)
            self.max_q = tokens

    def _views(self, meta: torch.Tensor, batch: int, width: int) -> None:
        self.cu_q = meta[:batch + 1]
        self.seqlens = meta[batch + 1:2 * batch + 1]
        self.table = meta[2 * batch + 1:].view(batch, width)

    def graph_width(self, pages: int) -> int:
        w = MIN_WIDTH
        while w < pages:
            w *= 2
        return w

    def for_graph(self, batch: int, tokens: int, width: int) -> FA3Backend:
        return FA3Backend(self.pool, self.q_heads, self.scale, self.num_splits, graph=(batch, tokens, width),
                          kernel=self.fn)

    def _fill(self, host: np.ndarray, seqs: list[SeqView], batch: int, width: int) -> None:
        """Write cu_seqlens_q, cache_seqlens and the page table of `seqs` into the int32 array `host`."""
        ps = self.pool.page_size
        q_lens = [s.q_len for s in seqs]
        host[0] = 0
        host[1:batch + 1] = np.cumsum(q_lens)
        host[batch + 1:2 * batch + 1] = [s.kv_len for s in seqs]
        table = host[2 * batch + 1:].reshape(batch, width)
        for i, s in enumerate(seqs):
            n = -(-s.kv_len // ps)
            if n > width:
                raise SkillkvError(f"a sequence of {n} pages does not fit a page table {width} wide")
            table[i, :n] = s.pages[:n]

    def plan(self, seqs: list[SeqView]) -> None:
        if self.graph is not None:
            batch, tokens, width = self.graph
            if len(seqs) != batch or sum(s.q_len for s in seqs) != tokens:
                raise SkillkvError(f"a graph plan needs {batch} sequences and {tokens} tokens")
            self.copied.synchronize()  # the previous plan's copy has left the staging buffer
            self._fill(self.host, seqs, batch, width)
            self.meta.copy_(self.staging, non_blocking=True)
            self.copied.record()
            return
        self.fresh = len(seqs) == 1 and seqs[0].q_len == seqs[0].kv_len
        if self.fresh:
            return
        batch = len(seqs)
        width = max(1, max(-(-s.kv_len // self.pool.page_size) for s in seqs))
        host = np.zeros((batch + 1) + batch + batch * width, dtype=np.int32)
        self._fill(host, seqs, batch, width)
        self._views(torch.from_numpy(host).to(self.pool.device), batch, width)
        self.max_q = max(s.q_len for s in seqs)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
            v: torch.Tensor | None = None) -> torch.Tensor:
        if self.fresh:
            if k is None or v is None:
                raise SkillkvError("the fa3 backend needs the step's new K/V rows for a sequence with no prefix")
            return self.fn(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), softmax_scale=self.scale, causal=True,
                           num_splits=self.num_splits)[0]
        return self.fn(q, self.pool.k[layer], self.pool.v[layer], cache_seqlens=self.seqlens, page_table=self.table,
                       cu_seqlens_q=self.cu_q, max_seqlen_q=self.max_q, softmax_scale=self.scale, causal=True,
                       num_splits=self.num_splits)
