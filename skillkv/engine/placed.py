"""Compose mode on the paged engine: placed entries, composed requests and repaired rows (issue 4).

Every skill is compiled as [preamble][skill] (its single-skill entry, keyed by its chain key, rows at positions
0..n). The composed prefix of skills s1..sk is s1's whole entry, then every later skill's rows after the preamble
with keys re-rotated to their new positions (skillkv.compose.rerotate; values carry no position), exactly what
skillkv.compose.place builds as one contiguous tensor, but without copying what the pool already holds:

Placed entries. Skill s placed at start position `offset` is the pool entry `place:{chain key}@{offset}`: its
skill rows, keys rotated by (offset - preamble), every row in the slot its position maps to (slot = position %
page_size: the entry's first page is filled from slot offset % page_size, PageTable's `start`). It is made once per
(skill, offset) on the pool's device, from the resident single-skill entry (rows gathered from the pool) or else
from the snapshot KV that `Part.load` supplies (a runners/base.Part: key, tokens, context, load); afterwards it is
an entry like any other (refcounted by the requests that use it, LRU-evicted when unreferenced). The first skill
needs no placement: its single-skill entry is used as it is (no copy at all).

Composed requests. The request's page list is in position order. A page that lies entirely inside one entry is
that entry's page, shared and never written. A page where two entries meet (a boundary that falls inside a page)
is a private page whose slots are copied from each neighbour (one slot-range copy per neighbour, all layers at
once); so is the prefix's partly filled last page (the question is appended there). So [A,B,C] and [A,B,D] list the
same pages for A and for B's interior.

Repair (`prefill_runs`). Every page holding a recomputed row becomes a private copy first (copy-on-write of the
whole page); the others stay shared. The positions come from the compose stage (skillkv.compose): front selection
gives a run of leading tokens per later skill, deviation selection any positions (runs of one or more). Each run is
prefilled by the engine itself, all runs in one batch, as a sequence over the request's pages that ends where the
run ends (so it attends to everything before it, causally to itself). A layer writes every run's KV before any run
attends, so a later run sees the recomputed rows of earlier runs: the same semantics as the hf runner's masked pass
(runners/hf_masks.recompute_rows), on the engine's kernels (FlashInfer on the GPU, CUDA graphs for short batches).

Contract: the KV a composed request reads equals engine.rope.place's (bit for bit: the same rotation on the same
rows), plus the recomputed rows; on finish the engine frees its private pages and releases every entry it
references (PageTable invariants hold).
"""

from __future__ import annotations

from typing import Callable

import torch

from skillkv.engine.paged import PagedEngine, Request
from skillkv.engine.pool import KV
from skillkv.engine.rope import rerotate, rope_delta
from skillkv.errors import SkillkvError


def placed_key(chain_key: str, offset: int) -> str:
    """The pool key of the skill with single-skill entry `chain_key` placed at start position `offset`."""
    return f"place:{chain_key}@{offset}"


def placed_source(key: str) -> str | None:
    """The chain key a placed entry's rows come from (inverse of `placed_key`); None for another key."""
    return key[len("place:"):].rsplit("@", 1)[0] if key.startswith("place:") else None


class PagedComposer:
    """Composed requests over one engine. `rotary` is the model's rotary module (for re-rotation); `settle(key)`
    blocks until an entry still being paged in (engine/tiers.py) is complete, before its pages are read.
    Counters: `placements` (placed entries made, each one copy of a skill's rows), `boundary_copies` (slot ranges
    copied into boundary pages), `cow_pages` (pages copied because a repaired row is written to them)."""

    def __init__(self, engine: PagedEngine, rotary, settle: Callable[[str], None] | None = None):
        self.engine, self.rotary = engine, rotary
        self.settle = settle or (lambda key: None)
        self.placements = self.boundary_copies = self.cow_pages = 0

    # ------------------------------------------------------------------ placed entries

    def place(self, part, preamble: int, offset: int) -> str:
        """Ensure the placed entry of `part` at `offset` is resident. Returns "l1" if it was, "placed" when made
        now from the resident single-skill entry, "loaded" when made now from `part.load()`."""
        key = placed_key(part.key, offset)
        table, pool = self.engine.table, self.engine.pool
        if table.lookup(key) is not None:
            return "l1"
        n = part.tokens - preamble
        if n <= 0:
            raise SkillkvError(f"skill {part.key[:12]} has no tokens after the {preamble}-token preamble")
        lead = offset % pool.page_size
        cos, sin = rope_delta(self.rotary, offset - preamble, pool.device)
        src = table.lookup(part.key)
        if src is not None:
            if src.tokens != part.tokens:
                raise SkillkvError(f"entry {part.key[:12]} holds {src.tokens} tokens, expected {part.tokens}")
            self.settle(part.key)
            table.acquire(part.key)  # the alloc below must not evict the source
            try:
                pages = table.alloc(table.pages_for(lead + n))
                try:
                    for layer in range(pool.layers):
                        k, v = pool.read_rows(layer, src.pages, src.start + preamble, n)
                        pool.load_layer(layer, pages, rerotate(k, cos, sin), v, lead)
                except BaseException:
                    table.free_private(pages)
                    raise
            finally:
                table.release(part.key)
            where = "placed"
        else:
            kv = part.load()
            if kv[0][0].shape[0] != part.tokens:
                raise SkillkvError(f"snapshot {part.key[:12]} has {kv[0][0].shape[0]} rows, expected {part.tokens}")
            pages = table.alloc(table.pages_for(lead + n))
            try:
                for layer, (k, v) in enumerate(kv):
                    k = rerotate(k[preamble:].to(pool.device), cos, sin)
                    pool.load_layer(layer, pages, k, v[preamble:], lead)
            except BaseException:
                table.free_private(pages)
                raise
            where = "loaded"
        table.add(key, pages, n, start=lead)
        self.placements += 1
        return where

    # ------------------------------------------------------------------ requests

    def open(self, parts: list, preamble: int) -> tuple[Request, list[str]]:
        """A request over the composed prefix of `parts` in this order (all compiled after the same `preamble`
        tokens), and per part where its KV came from: "l1" (the entry it needs was resident), "placed" (placed now
        from the resident single-skill entry) or "loaded" (from `load()`). Every entry used is referenced until
        `engine.finish(req)`; on an exception nothing stays referenced."""
        if not parts:
            raise SkillkvError("nothing to compose")
        eng, table = self.engine, self.engine.table
        held: list[str] = []
        try:
            first = parts[0]
            where = [eng.make_resident(first.key, first.tokens, first.load)]
            self.settle(first.key)
            table.acquire(first.key)
            held.append(first.key)
            layout, offset = [(first.key, 0)], first.tokens
            for part in parts[1:]:
                where.append(self.place(part, part.context, offset))
                key = placed_key(part.key, offset)
                table.acquire(key)
                held.append(key)
                layout.append((key, offset))
                offset += part.tokens - (part.context)
            req = self._request(layout, offset)
        except BaseException:
            for key in held:
                table.release(key)
            raise
        return req, where

    def _request(self, layout: list[tuple[str, int]], total: int) -> Request:
        """The request over resident, referenced entries `layout` [(key, first position)] covering [0, total)
        without gaps; it takes over their references."""
        table, pool, ps = self.engine.table, self.engine.pool, self.engine.pool.page_size
        segs = [(table.entries[k], p0) for k, p0 in layout]
        for e, p0 in segs:
            assert e.start == p0 % ps, "an entry's rows must sit in the slots their positions map to"
        n_pages = table.pages_for(total)
        pages: list[int | None] = [None] * n_pages
        partial: dict[int, list] = {}  # page index -> the entries that fill part of it
        for e, p0 in segs:  # O(entries) list slices: no per-page Python loop over long skills
            end, base = p0 + e.tokens, p0 // ps
            first, last = -(-p0 // ps), end // ps  # pages [first, last) lie wholly inside this entry
            if last > first:
                pages[first:last] = e.pages[first - base:last - base]
            for j in {base, (end - 1) // ps}:
                if not first <= j < last:
                    partial.setdefault(j, []).append((e, p0))
        mine: list[int] = []
        try:
            for j, cover in sorted(partial.items()):
                (page,) = table.alloc(1)
                mine.append(page)
                pages[j] = page
                lo = j * ps
                for e, p0 in cover:
                    a, b = max(lo, p0), min(lo + ps, p0 + e.tokens)
                    pool.copy_slots(e.pages[j - p0 // ps], page, a - lo, b - lo)
                    self.boundary_copies += 1
        except BaseException:
            table.free_private(mine)
            raise
        assert None not in pages, "the entries must cover [0, total) without gaps"
        full = total // ps  # a partly filled last page is where the question goes: private, after `shared`
        shared, private = pages[:full], pages[full:]
        owned = [p for p in mine if p not in private]
        return Request(layout[0][0], total, shared, private, length=total, keys=[k for k, _ in layout[1:]],
                       owned=owned)

    # ------------------------------------------------------------------ repair

    def gather(self, req: Request) -> KV:
        """The request's prefix as contiguous KV (new tensors on the pool's device), per layer [n, H, D]."""
        pool = self.engine.pool
        return [pool.gather(layer, req.pages, req.prefix_tokens) for layer in range(pool.layers)]

    def write_rows(self, req: Request, positions: list[int], rows: KV) -> None:
        """Store `rows` (per layer [len(positions), H, D], for sorted distinct `positions` of the prefix) in the
        request. Every shared page holding one of `positions` is first replaced by a private copy."""
        pool, ps = self.engine.pool, self.engine.pool.page_size
        self._own_pages(req, positions)
        pages = req.pages
        slots = torch.tensor([pages[p // ps] * ps + p % ps for p in positions], dtype=torch.long,
                             device=pool.device)
        for layer, (k, v) in enumerate(rows):
            pool.write(layer, slots, k.to(pool.device, pool.dtype), v.to(pool.device, pool.dtype))

    def _own_pages(self, req: Request, positions: list[int]) -> None:
        """Replace every shared page of `req` holding one of `positions` by a private copy (copy-on-write)."""
        if positions != sorted(set(positions)) or (positions and not 0 <= positions[0] <= positions[-1]
                                                   < req.prefix_tokens):
            raise SkillkvError("repaired positions must be sorted, distinct and inside the prefix")
        pool, table, ps = self.engine.pool, self.engine.table, self.engine.pool.page_size
        mine = set(req.owned)
        for j in sorted({p // ps for p in positions}):
            if j < len(req.shared) and req.shared[j] not in mine:
                (page,) = table.alloc(1)
                pool.copy_slots(req.shared[j], page, 0, ps)
                req.shared[j] = page
                req.owned.append(page)
                self.cow_pages += 1

    def prefill_runs(self, req: Request, ids: list[int], positions: list[int]) -> None:
        """Recompute the rows at `positions` (sorted, distinct, inside the prefix) of the request whose prefix
        tokens are `ids`, with the engine: one batch of sequences, one per contiguous run of positions, each over
        the request's pages up to the run's end (see the module docstring). Touched pages are made private first."""
        if not positions:
            return
        ps = self.engine.pool.page_size
        self._own_pages(req, positions)
        runs: list[list[int]] = []
        for p in positions:
            if runs and runs[-1][1] == p:
                runs[-1][1] = p + 1
            else:
                runs.append([p, p + 1])
        pages = req.pages
        views = [Request(None, 0, pages[:-(-b // ps)], length=a) for a, b in runs]
        self.engine.prefill(views, [ids[a:b] for a, b in runs])
