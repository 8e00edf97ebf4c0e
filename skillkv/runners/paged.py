"""The paged runner: the lean Llama-family runner over the KV pool (engine/), behind the Runner contract.

A sequence is an engine `Request`: it lists the resident prefix's full pages in place (shared, never written) and
appends to private pages (copy-on-write of a partly filled last page). Resident prefixes are pool entries keyed by
their chain key; compose's placed entries are pool entries too (engine/placed.py), keyed `place:...`.

`admit` allocates the entry's pages at once and pages its sources in layer by layer on a copier thread
(engine/page_in.py): a prefill over the entry waits per layer, so the question's first layers compute while later
ones still land. The entry is held by the page-in until its last copy landed (never evicted, its pages never reused
meanwhile); a damaged source fails the page-in, the waiting prefill raises SnapshotError and the entry is dropped
as soon as no sequence holds it.

Weights: engine/weights.LlamaWeights, read by safetensors (no transformers on the ask path). `model`, the
transformers model of the same weights, is loaded only when something asks for it (compose's deviation probe, the
evaluation's reference).

Attention: torch (SDPA over gathered pages) on the CPU, FlashInfer on CUDA (engine/attention.py), with CUDA graphs
of short batches. `batch_invariant` pads every step's rows (serve: an answer is the same alone or among 64); steps
of 8 rows or more are padded in either mode, so a skill's KV is the same bits whoever computes it (engine/llama.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from skillkv.engine.page_in import PageIn
from skillkv.engine.attention import TorchBackend
from skillkv.engine.block_attention import chunk_invariance_fails
from skillkv.engine.llama import gemm_for
from skillkv.engine.page_spill import PageSpill
from skillkv.engine.paged import PagedEngine, Request
from skillkv.engine.placed import PagedComposer, placed_source
from skillkv.engine.weights import as_weights
from skillkv.errors import SkillkvError, SnapshotError
from skillkv.runners.base import KV, KVSource, Part, Runner


def default_budget(device: torch.device) -> int:
    """Half of the memory left on the device once the weights are loaded (CPU: 2 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


class PagedRunner(Runner):
    """Sequences are engine `Request`s."""

    name = "paged"

    def __init__(self, model, budget_bytes: int | None = None, attention: str = "auto",
                 batch_invariant: bool | None = False, page_size: int = 16, cuda_graphs: bool = True,
                 gemm: str = "auto", verdicts=None, spill_bytes: int = 0):
        """`batch_invariant`: True requires it (SkillkvError with the reason where no GEMM of this machine holds
        it), None turns it on where it holds, False off. `verdicts`: the persistent cache of the GEMM check
        (engine/invariance.py); `spill_bytes`: host memory for prefix-cache pages evicted from the pool
        (engine/page_spill.py; 0: none)."""
        self.weights = as_weights(model)
        self.config, self.device = self.weights.config, self.weights.device
        choice = gemm_for(self.weights, gemm, verdicts)
        if batch_invariant and not choice.invariant:
            raise SkillkvError(f"batch invariance cannot hold here: {choice.note}; use --no-batch-invariant")
        self.batch_invariant = batch_invariant is not False and choice.invariant
        self.invariance = choice.note  # what was checked and chosen (serve's start line, /health)
        self.engine = PagedEngine(self.weights, budget_bytes or default_budget(self.device), attention=attention,
                                  page_size=page_size, cuda_graphs=cuda_graphs,
                                  row_block=8 if self.batch_invariant else 0, gemm=choice)
        # the prefix cache: serve's runner (batch invariance asked for or automatic) keeps one, exact where the
        # runner is chunk-invariant; ask and compile keep none (one question per process)
        self.prefix_cache = batch_invariant is not False
        if isinstance(self.engine.backend, TorchBackend):  # decode tokens' KV is reused: computed in blocks too
            self.engine.backend.invariant_decode = self.prefix_cache
        exact, why = self._chunk_invariant()
        self.cache_exact = self.prefix_cache and exact
        self.cache_note = ("off" if not self.prefix_cache else
                           f"exact ({why})" if exact else f"approximate, used by auto mode only ({why})")
        self.spill = PageSpill(spill_bytes) if self.prefix_cache and spill_bytes > 0 else None
        if self.spill is not None:
            self.engine.spill_to(self.spill)
        self.reads_in_place = self.device.type == "cpu"  # the pool is host memory: snapshots land in it directly
        self.page_size, self.num_pages = self.engine.pool.page_size, self.engine.pool.num_pages
        self.composer = PagedComposer(self.engine, self.weights.rotary, settle=self.settle)
        self._pending: dict[str, PageIn] = {}
        self._retired: set[str] = set()  # entries to evict once no sequence holds them
        self._errors: dict[str, BaseException] = {}  # key -> why its page-in failed (until the next open)
        self._reserved: dict[str, list[int]] = {}  # key -> pages reserved for a reader filling them in place
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="skillkv-copy")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _chunk_invariant(self) -> tuple[bool, str]:
        """Whether a row's KV is the same bits however its sequence is cut into steps, so the prefix cache serves
        exact KV: every step padded with a checked GEMM (batch invariance) and the block attention of the torch
        backend checked on this machine (engine/block_attention.py). Returns (on, why)."""
        backend = self.engine.backend
        if not self.batch_invariant:
            return False, "batch invariance is off"
        if not isinstance(backend, TorchBackend):
            return False, f"the {backend.name} attention is not chunk-invariant"
        cfg = self.config
        why = chunk_invariance_fails(cfg.num_attention_heads, cfg.num_key_value_heads, self.engine.pool.head_dim,
                                     self.device)
        return (False, why) if why else (True, "KV chunk-invariant, checked on this machine")

    @property
    def model(self):
        """The transformers model of the same weights, loaded on first use (module docstring)."""
        return self.weights.reference()

    @property
    def table(self):
        return self.engine.table

    # ------------------------------------------------------------------ residency

    def _reap(self) -> None:
        """Retire finished page-ins (dropping the hold that kept their pages from being reused while copies were in
        flight); drop failed entries from the pool once no sequence holds them."""
        for key, p in list(self._pending.items()):
            if not p.finished.is_set():
                continue
            if not p.released:
                self.table.release(key)
                p.released = True
            if p.error is not None:
                self._errors[key] = p.error  # raised by the next open(key), even after the entry is gone
                if self.table.entries[key].refs:
                    continue
                self.table.evict(key)
            del self._pending[key]
        for key in list(self._retired):
            e = self.table.entries.get(key)
            if e is None or (not e.refs and key not in self._pending):
                if e is not None:
                    self.table.evict(key)
                self._retired.discard(key)

    def _failed(self, key: str | None) -> None:
        """Raise SnapshotError if the page-in of `key` failed (forgetting the failure)."""
        self._reap()
        err = self._errors.pop(key, None) if key is not None else None
        if err is not None:
            raise err if isinstance(err, SnapshotError) else SnapshotError(f"{key[:12]}: paging failed ({err})")

    def resident(self, key: str) -> bool:
        self._reap()
        return self.table.lookup(key) is not None

    def reserve(self, key: str, tokens: int, pin: bool = False) -> KV | None:
        """On the CPU: the entry's pages, allocated and held now, as per-layer views (Runner.reserve). None on
        CUDA (the pool is device memory) and when the pages are not one run (rare: the views would not be
        contiguous)."""
        if self.device.type != "cpu" or tokens <= 0 or key in self._reserved:
            return None
        self._reap()
        pages = self.table.alloc(self.table.pages_for(tokens))
        if pages != list(range(pages[0], pages[0] + len(pages))):
            self.table.free_private(pages)
            return None
        self._errors.pop(key, None)
        self.table.add(key, pages, tokens, pinned=pin)
        self.table.acquire(key)  # held by the page-in until its sources are complete
        self._reserved[key] = pages
        pool, span = self.engine.pool, slice(pages[0], pages[0] + len(pages))
        shape = (-1, pool.kv_heads, pool.head_dim)
        return [(pool.k[i, span].view(shape)[:tokens], pool.v[i, span].view(shape)[:tokens])
                for i in range(pool.layers)]

    def abandon(self, key: str) -> None:
        if self._reserved.pop(key, None) is not None:
            self.table.release(key)
            self.table.evict(key)

    def admit(self, key: str, sources: list[KVSource], pin: bool = False) -> None:
        self._reap()
        offsets, n = [], 0
        for s in sources:
            offsets.append(n)
            n += s.tokens
        pages = self._reserved.pop(key, None)
        if pages is None:
            self._errors.pop(key, None)
            pages = self.table.alloc(self.table.pages_for(n))
            self.table.add(key, pages, n, pinned=pin)
            self.table.acquire(key)  # held by the page-in until its copies landed
        p = PageIn(key, list(sources), offsets, pages, self.engine.pool.layers, self.device)
        self._pending[key] = p
        self._copier.submit(p.run, self.engine.pool, self._stream)

    def settle(self, key: str) -> None:
        p = self._pending.get(key)
        if p is not None:
            p.finished.wait()
        self._failed(key)

    def pin(self, key: str, pinned: bool = True) -> None:
        self.table.pin(key, pinned)

    def retire(self, live) -> None:
        self._retired |= {k for k in self.table.entries if not live(placed_source(k) or k)}
        self._reap()

    # ------------------------------------------------------------------ sequences

    def open(self, key: str | None) -> Request:
        self._failed(key)
        return self.engine.start(key, defer_copy=key in self._pending)

    def cached_tokens(self, ids: list[int]) -> int:
        if not self.prefix_cache:
            return 0
        return len(self.table.cache.match(ids, len(ids) - 1)) * self.page_size

    def clear_cache(self) -> None:
        self.table.drop_cached()
        if self.spill is not None:
            self.spill.clear()

    def open_cached(self, ids: list[int], key: str | None = None, key_tokens: int = 0,
                    reuse: bool = True) -> tuple[Request, dict]:
        self._failed(key)
        cache, keep = self.table.cache, self.prefix_cache
        hit = self.cached_tokens(ids) if reuse else 0
        cache.queries += len(ids)
        if key is not None and key_tokens > hit:
            req = self.engine.start(key, defer_copy=key in self._pending,
                                    tokens=list(ids[:key_tokens]) if keep else None)
            return req, {"prefix_cache": 0, "skill_kv": key_tokens}
        if keep and reuse:
            req = self.engine.start_cached(ids, self.spill)
        else:
            req = self.engine.start(None, tokens=[] if keep else None)
        cache.hits += req.length
        return req, {"prefix_cache": req.length, "skill_kv": 0}

    def open_composed(self, parts: list[Part], preamble: int) -> Request:
        req, _ = self.composer.open(parts, preamble)
        return req

    def prefill(self, seqs: list[Request], ids: list[list[int]], every: bool = False) -> torch.Tensor:
        loads = {r.prefix_key: self._pending[r.prefix_key] for r in seqs
                 if r.prefix_key is not None and r.prefix_key in self._pending}
        cows = [r for r in seqs if r.cow is not None]
        if not loads and not cows:
            return self.engine.prefill(seqs, ids, every=every)
        pool = self.engine.pool

        def layer_ready(i: int) -> None:
            for p in loads.values():
                p.wait(i)
            for r in cows:
                pool.copy_page_prefix(*r.cow, layer=i)
        out = self.engine.prefill(seqs, ids, layer_ready=layer_ready, every=every)
        for r in cows:
            r.cow = None
        return out

    def recompute(self, seq: Request, ids: list[int], positions: list[int]) -> None:
        if positions:
            self.composer.prefill_runs(seq, ids, positions)

    def read(self, seq: Request, start: int, end: int) -> KV:
        pool = self.engine.pool
        return [tuple(t[start:end].clone() for t in pool.gather(i, seq.pages, end)) for i in range(pool.layers)]

    def release(self, seq: Request) -> None:
        self.engine.finish(seq)
        self._reap()

    # ------------------------------------------------------------------ capacity

    def can_alloc(self, pages: int) -> bool:
        self._reap()
        return self.table.can_alloc(pages)

    def held_pages(self, seq: Request) -> int:
        return len(seq.private) + len(seq.owned)

    def usage(self) -> dict:
        t = self.table
        for _ in range(5):  # read from another thread (/health) while the engine thread may change entries
            try:
                resident_pages = sum(len(e.pages) for e in list(t.entries.values()))
                break
            except RuntimeError:
                continue
        else:
            resident_pages = None
        return {"pages": t.num_pages, "page_size": t.page_size, "free": len(t.free), "private": len(t.private),
                "resident": len(t.entries), "resident_pages": resident_pages, "evictions": t.evictions,
                "bytes": self.engine.pool.nbytes, "attention": self.engine.backend.name,
                "gemm": self.engine.runner.gemm.label, "batch_invariant": self.batch_invariant,
                "invariance": self.invariance, "prefix_cache": self.cache_note, "cached_pages": len(t.cache),
                "cache_queries": t.cache.queries, "cache_hits": t.cache.hits,
                "spilled_pages": len(self.spill.pages) if self.spill else 0,
                "restored_pages": self.spill.restored if self.spill else 0}

    def close(self) -> None:
        for p in list(self._pending.values()):
            p.finished.wait()
        self._copier.shutdown(wait=True)
