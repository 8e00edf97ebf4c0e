"""The paged engine: skill prefixes resident in the KV pool (L1), questions prefilled over them, decode.

A resident prefix is the exact KV of [preamble][skill 1]..[skill k] (one pool entry per ordered combination,
keyed by its chain key). A request references the prefix's full pages in place (shared, never written). If the
prefix ends inside a page, the first request over the entry takes that page's free tail (`Resident.tail_taken`:
it appends there, after the entry's rows, which it never writes, and gives the tail back when it finishes); any
other request at the same time copies the filled slots to a private page first (copy-on-write). So a lone
request's KV stays in consecutive pages, and the torch backend attends over a view of them instead of gathering
them (engine/attention.py). The request's own tokens live in private pages, allocated right after its last page
where that page is free, freed when it finishes. Entries referenced by a running request are never evicted
(PageTable contract).

A composed request (compose mode, engine/compose_paged.py) references several entries (`prefix_key` and `keys`)
and lists its prefix pages in any order (`shared`); some of them are private copies (`owned`: pages where two
entries meet, pages holding repaired rows). Exact-mode requests have no `keys` and no `owned` pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable

import torch

from skillkv.engine.attention import SeqView, make_backend
from skillkv.engine.cuda_graph import CudaGraphs, capturable
from skillkv.engine.llama import LlamaRunner
from skillkv.engine.page_spill import PageSpill
from skillkv.engine.pool import KV, KVPool
from skillkv.engine.prefix_cache import ROOT, chain_key
from skillkv.engine.weights import as_weights


@dataclass
class Request:
    """A sequence over the pool: `pages` = `shared` (the prefix's full pages, in order) + `private` (its
    partly filled last page, then the request's own tokens). `finish` frees `private` and `owned` and releases
    `prefix_key` and every key of `keys`."""

    prefix_key: str | None
    prefix_tokens: int
    shared: list[int]  # pages of the prefix, in position order (shared with entries, except `owned`): its full
    # pages, and its partly filled last page when the request took that page's tail (`tail`)
    private: list[int] = field(default_factory=list)
    length: int = 0  # tokens in KV
    cow: tuple[int, int, int] | None = None  # (src page, dst page, slots): a copy-on-write still to do per layer
    keys: list[str] = field(default_factory=list)  # further entries referenced (a composed prefix's placed skills)
    owned: list[int] = field(default_factory=list)  # pages of `shared` that are the request's own copies
    tail: bool = False  # appends in the free tail of the prefix entry's last page (module docstring)
    tokens: list[int] | None = None  # token ids in KV, kept for a cacheable request (its full pages are published)
    chain: list[int] = field(default_factory=list)  # prefix-cache keys of its first len(chain) pages
    held: list = field(default_factory=list)  # cached pages it holds (CachedPage: hits, and pages it published)

    @property
    def pages(self) -> list[int]:
        return self.shared + self.private


class PagedEngine:
    """One model (`weights`: engine/weights.LlamaWeights, or a transformers model whose parameters are used), one
    pool. `budget_bytes` caps the pool; `attention` is auto | torch | flashinfer[:KERNEL] |
    fa3[:SPLITS] (engine/attention.py); `ops` (auto | torch | flashinfer | triton) picks the element-wise kernels;
    `gemm` (auto | cublas | triton | onednn, or a checked GemmChoice) the weight GEMMs (engine/gemm.py,
    engine/invariance.py; `verdicts` caches the check); `cuda_graphs` replays short batches (any
    backend that can be captured: flashinfer, fa3); `row_block > 0` makes every request's logits independent of
    what it is batched with (see engine/llama.py)."""

    def __init__(self, weights, budget_bytes: int, attention: str = "auto", page_size: int = 16,
                 cuda_graphs: bool = True, ops: str = "auto", row_block: int = 0, gemm="auto", verdicts=None):
        weights = as_weights(weights)
        cfg = weights.config
        self.pool = KVPool.for_model(cfg, weights.dtype, weights.device, budget_bytes, page_size)
        head_dim = cfg.head_dim
        self.backend = make_backend(attention, self.pool, cfg.num_attention_heads, head_dim ** -0.5)
        self.runner = LlamaRunner(weights, self.pool, self.backend, ops, row_block, gemm, verdicts)
        self.device = weights.device
        self.graphs = None  # CUDA graphs of short batches (questions, decode steps), where the backend allows
        if cuda_graphs and capturable(self.backend):
            (scratch,) = self.table.alloc(1)  # held for ever: padding tokens write here
            self.graphs = CudaGraphs(self.runner, self.pool, cfg.num_attention_heads, head_dim ** -0.5, scratch)

    @property
    def table(self):
        return self.pool.table

    # ------------------------------------------------------------------ residency (L1)

    def resident(self, key: str) -> bool:
        return self.table.lookup(key) is not None

    def make_resident(self, key: str, tokens: int, load: Callable[[], KV], pin: bool = False) -> str:
        """Ensure the prefix `key` is in the pool; `load()` supplies its KV (per layer [n, H, D]) on a miss.
        Returns "l1" on a hit, "loaded" after loading."""
        if self.table.lookup(key) is not None:
            if pin:
                self.table.pin(key)
            return "l1"
        pages = self.table.alloc(self.table.pages_for(tokens))
        try:
            self.pool.load(pages, load())
        except BaseException:
            self.table.free_private(pages)
            raise
        self.table.add(key, pages, tokens, pinned=pin)
        return "loaded"

    # ------------------------------------------------------------------ requests

    def start(self, prefix_key: str | None, defer_copy: bool = False, tokens: list[int] | None = None) -> Request:
        """A request continuing the resident prefix `prefix_key` (None: empty prefix). With `defer_copy` the
        copy-on-write of a partly filled last page is left to the caller, layer by layer (`req.cow`; used while
        the prefix is still being paged in, see engine/tiers.py). With `tokens` (the prefix's token ids) the
        request is cacheable: its full pages, and the entry's, join the prefix cache as they fill (it then copies
        the entry's partly filled last page rather than appending in its tail)."""
        if prefix_key is None:
            return Request(None, 0, [], tokens=None if tokens is None else [])
        e = self.table.acquire(prefix_key)
        full = e.tokens // self.pool.page_size
        rem = e.tokens - full * self.pool.page_size
        if tokens is not None and len(tokens) != e.tokens:
            self.table.release(prefix_key)
            raise ValueError(f"{len(tokens)} token ids for a prefix of {e.tokens} tokens")
        if rem and not e.tail_taken and e.start == 0 and tokens is None:
            e.tail_taken = True
            return Request(prefix_key, e.tokens, list(e.pages), length=e.tokens, tail=True)
        req = Request(prefix_key, e.tokens, e.pages[:full], length=e.tokens,
                      tokens=None if tokens is None else list(tokens))
        if rem:
            try:
                (page,) = self.table.alloc(1)
            except BaseException:
                self.table.release(prefix_key)
                raise
            if defer_copy:
                req.cow = (e.pages[full], page, rem)
            else:
                self.pool.copy_page_prefix(e.pages[full], page, rem)
            req.private.append(page)
        return req

    def start_cached(self, ids: list[int], spill: PageSpill | None = None) -> Request:
        """A cacheable request over the longest run of full pages of `ids` the prefix cache holds (at most
        len(ids) - 1 tokens: the last one is computed for its logits), continued from `spill` (pages evicted to
        host memory, copied back into the pool); the caller prefills ids[req.length:]."""
        table, ps = self.table, self.pool.page_size
        hits = table.cache.match(ids, len(ids) - 1)
        entries = sorted({cp.entry for cp in hits if cp.entry is not None})
        for key in entries:
            table.acquire(key)
        for cp in hits:
            table.hold(cp)
        held = [cp for cp in hits if cp.entry is None]
        parent = hits[-1].key if hits else ROOT
        while spill is not None and spill.pages and (len(hits) + 1) * ps <= len(ids) - 1:
            i = len(hits)
            tokens = tuple(ids[i * ps:(i + 1) * ps])
            back = spill.take(chain_key(parent, tokens), parent, tokens)
            if back is None or not table.can_alloc(1):
                break
            (page,) = table.alloc(1)
            self.pool.k[:, page].copy_(back.k, non_blocking=True)
            self.pool.v[:, page].copy_(back.v, non_blocking=True)
            cp = table.publish(page, back.key, parent, tokens, i)
            if cp is None:  # the key is indexed already (a collision): not served
                table.free_private([page])
                break
            hits.append(cp)
            held.append(cp)
            parent = cp.key
        n = len(hits) * ps
        return Request(None, 0, [cp.page for cp in hits], length=n, tokens=list(ids[:n]), keys=entries,
                       chain=[cp.key for cp in hits], held=held)

    def spill_to(self, spill: PageSpill) -> None:
        """Copy every cached page the table evicts for room to host memory in `spill` first."""
        def keep(cp) -> None:
            k = self.pool.k[:, cp.page].to("cpu", copy=True)
            v = self.pool.v[:, cp.page].to("cpu", copy=True)
            spill.put(cp.key, cp.parent, cp.tokens, k, v)
        self.table.on_evict = keep

    def _publish(self, req: Request) -> None:
        """Index the request's newly filled full pages (module docstring of engine/prefix_cache.py)."""
        ps, table, pages = self.pool.page_size, self.table, req.pages
        while (len(req.chain) + 1) * ps <= req.length:
            i = len(req.chain)
            tokens = tuple(req.tokens[i * ps:(i + 1) * ps])
            parent = req.chain[-1] if req.chain else ROOT
            key = chain_key(parent, tokens)
            req.chain.append(key)
            page = pages[i]
            if page in table.cache.by_page:  # a hit, or an entry's page indexed by an earlier request
                continue
            if page in table.private:
                cp = table.publish(page, key, parent, tokens, i)
                if cp is not None:
                    req.held.append(cp)
            elif req.prefix_key is not None and page in table.entries[req.prefix_key].pages:
                table.publish_entry(req.prefix_key, page, key, parent, tokens, i)

    def _grow(self, req: Request, new_tokens: int) -> None:
        need = self.table.pages_for(req.length + new_tokens) - len(req.pages)
        if need > 0:
            pages = req.pages
            req.private.extend(self.table.alloc(need, near=pages[-1] + 1 if pages else None))

    def prefill(self, reqs: list[Request], ids: list[list[int]], layer_ready=None, every: bool = False) -> torch.Tensor:
        """Append `ids[i]` to request i (batched); return float32 logits [len(reqs), vocab] of each last token, or
        with `every` [total new tokens, vocab] of every new token. `layer_ready(i)`, if given, is called before
        layer i's KV is written or read (layer-pipelined paging)."""
        for r, t in zip(reqs, ids):
            self._grow(r, len(t))
        seqs = [SeqView(r.pages, r.length + len(t), len(t)) for r, t in zip(reqs, ids)]
        last = list(range(sum(map(len, ids)))) if every else [n - 1 for n in accumulate(len(t) for t in ids)]
        logits = None
        if self.graphs is not None and not every:  # host work of a replay: plain lists, page lists built once
            flat = [t for seq in ids for t in seq]
            positions, slots = [], []
            ps = self.pool.page_size
            for r, t, s in zip(reqs, ids, seqs):
                span = range(r.length, r.length + len(t))
                positions.extend(span)
                slots.extend(s.pages[p // ps] * ps + p % ps for p in span)
            logits = self.graphs.run(flat, positions, slots, seqs, last, layer_ready=layer_ready)
        if logits is None:
            dev = self.device
            flat = torch.tensor([t for seq in ids for t in seq], device=dev)
            positions = torch.cat([torch.arange(r.length, r.length + len(t)) for r, t in zip(reqs, ids)]).to(dev)
            slots = torch.cat([self.pool.slots(r.pages, r.length, len(t)) for r, t in zip(reqs, ids)])
            logits = self.runner.forward(flat, positions, slots, seqs, torch.tensor(last, device=dev),
                                         layer_ready=layer_ready)
        for r, t in zip(reqs, ids):
            r.length += len(t)
            if r.tokens is not None:
                r.tokens.extend(t)
                self._publish(r)
        return logits

    def finish(self, req: Request) -> None:
        """Free the request's private (and owned) pages, release its references and its cached pages (the deepest
        first: they are evicted first)."""
        table = self.table
        table.free_private([p for p in req.private + req.owned if p in table.private])
        for cp in reversed(req.held):
            table.unhold(cp)
        req.private, req.owned, req.held = [], [], []
        if req.prefix_key is not None:
            if req.tail:
                self.table.entries[req.prefix_key].tail_taken = False
                req.tail = False
            self.table.release(req.prefix_key)
            req.prefix_key = None
        for key in req.keys:
            self.table.release(key)
        req.keys = []
