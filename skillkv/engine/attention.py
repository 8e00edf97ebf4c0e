"""Attention over the paged KV pool: an interface, a registry, and three backends.

Contract: `plan(seqs)` once per batch (the new tokens of every sequence are already written to the pool before
`run`), then `run(layer, q, k, v)` per layer. q is [total_new_tokens, q_heads, head_dim], ragged by sequence in
`seqs` order; k, v [total_new_tokens, kv_heads, head_dim] are the same new rows as written to the pool (a backend
may read them instead of the pool, for a batch of one sequence with no cached prefix; the result must not depend on
where the pool placed the pages). Attention is causal with the new tokens at the *end* of each sequence
(lower-right aligned). The result depends only on the batch's shapes and contents, never on page placement, so
the same batch computed twice gives the same bits (exact mode rests on it).

CUDA graphs (engine/cuda_graph.py): `for_graph(batch, tokens, pages)` returns a backend whose `plan` only writes
device buffers at fixed addresses, so `run` can be captured once and replayed after every new plan; `graph_width`
says which page-table width a batch needs (part of a graph's key). Backends that cannot be captured return None.

  torch       attention in fixed key blocks over views of the pool (engine/block_attention.py): chunk-invariant;
              CPU and CUDA; the reference
  flashinfer  FlashInfer's BatchPrefillWithPagedKVCacheWrapper (CSR page table: kv_indptr, kv_indices,
              kv_last_page_len, int32); CUDA only, imported only when chosen
  fa3         FlashAttention-3 `flash_attn_with_kvcache` (paged KV, split-KV by its own heuristic, GQA packing);
              Hopper only, `pip install skillkv[fa3]` (engine/attention_fa3.py)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from skillkv.engine.block_attention import attend, keys_of
from skillkv.engine.pool import KVPool
from skillkv.errors import SkillkvError


@dataclass
class SeqView:
    """One sequence in a batch: its pages in order, its KV length after this step, and its new token count."""

    pages: list[int]
    kv_len: int
    q_len: int


class AttentionBackend(ABC):
    name = "?"

    def __init__(self, pool: KVPool, q_heads: int, scale: float):
        self.pool, self.q_heads, self.scale = pool, q_heads, scale

    @abstractmethod
    def plan(self, seqs: list[SeqView]) -> None: ...

    @abstractmethod
    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
            v: torch.Tensor | None = None) -> torch.Tensor: ...

    def for_graph(self, batch: int, tokens: int, width: int) -> AttentionBackend | None:
        """A backend of the same kernels for CUDA-graph capture: every plan has exactly `batch` sequences and
        `tokens` new tokens, no sequence listing more than `width` pages (when `graph_width` is not 0). None when
        this backend cannot be captured."""
        return None

    def graph_width(self, pages: int) -> int:
        """The page-table width a graph needs for sequences of at most `pages` pages (0: any width)."""
        return 0


class TorchBackend(AttentionBackend):
    """Attention in fixed key blocks (engine/block_attention.py), one sequence at a time: a query row's result
    depends only on that row and the keys at or before it, never on how the sequence was cut into steps, what it is
    batched with, or where its pages lie (a sequence whose pages are one run is read as a view of the pool, other
    ones gathered: the same bits; tests/engine/test_attention_backends.py). So a prefix cache's reuse of KV
    computed in other steps is bit for bit a full prefill (checked on the machine: `chunk_invariant`). CPU and
    CUDA; the reference."""

    name = "torch"
    # False: a one-row step (a decode token) takes SDPA with the grouped-query heads folded into its rows, 3-4x
    # faster at a few thousand keys but other bits than the same row computed in a longer step. Right where a
    # decode token's KV is never reused (`skillkv ask`: exact and full mode decode the same way); a runner with a
    # prefix cache keeps every step in blocks (runners/paged.py).
    invariant_decode = True

    def plan(self, seqs: list[SeqView]) -> None:
        self.seqs = seqs

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
            v: torch.Tensor | None = None) -> torch.Tensor:
        pool, outs, off = self.pool, [], 0
        for s in self.seqs:
            k, v = keys_of(pool.k[layer], pool.v[layer], s.pages, s.kv_len, pool.page_size, pool.zero_page)
            if s.q_len == 1 and not self.invariant_decode:
                outs.append(_folded_decode(q[off:off + 1], k[:s.kv_len], v[:s.kv_len], self.scale))
            else:
                outs.append(attend(q[off:off + s.q_len], k, v, s.kv_len - s.q_len, self.scale))
            off += s.q_len
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _folded_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row [1, q_heads, d] over k, v [L, kv_heads, d]: SDPA with the query heads that share a kv head
    attending as that many rows of it (each kv head read once)."""
    hk, d = k.shape[1], q.shape[-1]
    o = F.scaled_dot_product_attention(q.view(1, hk, -1, d), k.transpose(0, 1).unsqueeze(0),
                                       v.transpose(0, 1).unsqueeze(0), scale=scale)
    return o.reshape(1, -1, d)


class FlashInferBackend(AttentionBackend):
    """FlashInfer paged prefill. With `graph_batch` set, the wrapper runs in CUDA-graph mode: its page-table
    buffers are fixed (sized for `graph_batch` sequences over the whole pool), every `plan` must have exactly
    `graph_batch` sequences listing at most `max_indices` pages in all, and `run` may be captured once and
    replayed after each new `plan`."""

    name = "flashinfer"

    def __init__(self, pool: KVPool, q_heads: int, scale: float, workspace_mb: int = 256,
                 graph_batch: int | None = None, max_indices: int = 0, workspace: torch.Tensor | None = None,
                 kernel: str = "fa2"):
        super().__init__(pool, q_heads, scale)
        self.kernel = kernel
        try:
            import flashinfer
        except ImportError:
            raise SkillkvError("the flashinfer backend needs `pip install skillkv[gpu]` (flashinfer-python)") from None
        if pool.device.type != "cuda":
            raise SkillkvError("the flashinfer backend runs on CUDA only; use --attention torch on the CPU")
        self.workspace = workspace if workspace is not None else torch.empty(
            workspace_mb << 20, dtype=torch.uint8, device=pool.device)
        graph = {}
        if graph_batch is not None:
            i32 = dict(dtype=torch.int32, device=pool.device)
            graph = dict(use_cuda_graph=True, qo_indptr_buf=torch.zeros(graph_batch + 1, **i32),
                         paged_kv_indptr_buf=torch.zeros(graph_batch + 1, **i32),
                         paged_kv_indices_buf=torch.zeros(max_indices, **i32),
                         paged_kv_last_page_len_buf=torch.zeros(graph_batch, **i32))
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=kernel, **graph)

    def plan(self, seqs: list[SeqView]) -> None:
        ps = self.pool.page_size
        qo = [0]
        kv_indptr, indices, last = [0], [], []
        for s in seqs:
            n_pages = -(-s.kv_len // ps)
            qo.append(qo[-1] + s.q_len)
            indices.extend(s.pages[:n_pages])
            kv_indptr.append(len(indices))
            last.append(s.kv_len - (n_pages - 1) * ps)
        i32 = dict(dtype=torch.int32)  # host tensors: plan() reads them on the CPU and copies what it needs
        self.wrapper.plan(torch.tensor(qo, **i32), torch.tensor(kv_indptr, **i32), torch.tensor(indices, **i32),
                          torch.tensor(last, **i32), self.q_heads, self.pool.kv_heads, self.pool.head_dim, ps,
                          causal=True, sm_scale=self.scale, q_data_type=self.pool.dtype,
                          kv_data_type=self.pool.dtype)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
            v: torch.Tensor | None = None) -> torch.Tensor:
        return self.wrapper.run(q, (self.pool.k[layer], self.pool.v[layer]))

    def for_graph(self, batch: int, tokens: int, width: int) -> FlashInferBackend:
        if getattr(self, "_graph_workspace", None) is None:  # one workspace for every captured graph
            self._graph_workspace = torch.empty(256 << 20, dtype=torch.uint8, device=self.pool.device)
        max_indices = batch * self.pool.num_pages + self.pool.table.pages_for(tokens) + 1
        return FlashInferBackend(self.pool, self.q_heads, self.scale, graph_batch=batch, max_indices=max_indices,
                                 workspace=self._graph_workspace, kernel=self.kernel)


def _fa3_backend(pool: KVPool, q_heads: int, scale: float, **kw) -> AttentionBackend:
    from skillkv.engine.attention_fa3 import FA3Backend

    return FA3Backend(pool, q_heads, scale, **kw)


BACKENDS = {"torch": TorchBackend, "flashinfer": FlashInferBackend, "fa3": _fa3_backend}


def make_backend(name: str, pool: KVPool, q_heads: int, scale: float) -> AttentionBackend:
    """`auto` | `torch` | `flashinfer[:KERNEL]` | `fa3[:SPLITS]`. KERNEL is FlashInfer's prefill implementation
    (fa2, the default: it splits long KV across SMs, which a batch of one short question over a long prefix needs;
    fa3; auto); SPLITS is FA3's num_splits (0, the default: its own heuristic). `auto` picks fa3 on a Hopper GPU
    with FlashAttention-3 installed (measured fastest there, docs/BENCHMARKS.md), else flashinfer on CUDA when
    installed, else torch."""
    if name == "auto":
        name = auto_backend(pool.device, pool.dtype)
    base, _, arg = name.partition(":")
    if base not in BACKENDS or (arg and base == "torch"):
        raise SkillkvError(f"unknown attention backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    if base == "flashinfer" and arg:
        return BACKENDS[base](pool, q_heads, scale, kernel=arg)
    if base == "fa3" and arg:
        return BACKENDS[base](pool, q_heads, scale, num_splits=int(arg))
    return BACKENDS[base](pool, q_heads, scale)


def auto_backend(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend `auto` means for a pool of `dtype` on `device` (see make_backend)."""
    if device.type != "cuda":
        return "torch"
    if (_has_fa3() and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device)[0] == 9):
        return "fa3"
    return "flashinfer" if _has_flashinfer() else "torch"


def _has_flashinfer() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


def _has_fa3() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn_interface") is not None
