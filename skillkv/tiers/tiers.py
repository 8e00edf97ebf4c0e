"""Tiers for one PagedEngine: L1 (the GPU pool), host (pinned LRU cache), L2 (the store on disk).

    tiers = Tiers(engine, store, host_budget=8 << 30)
    tiers.prefetch([(key, ids)])                  # as soon as the skills are chosen: L2 -> host in the background
    tiers.make_resident(key, [(key, ids)])        # host -> pool, layer by layer on a copy stream; returns at once
    req = tiers.start(key)
    logits = tiers.prefill([req], [question])     # layer i computes as soon as layer i's copy has landed
    tiers.finish(req)

Paging is pipelined layer by layer: reader threads land and verify layer i of a snapshot in host memory
(engine/l2_reader.py), a copier thread issues its host -> pool copies on a dedicated CUDA stream and records
an event per layer (`PageIn`), and the runner's `layer_ready(i)` hook blocks the CPU only until layer i's copy is
*issued*, then makes the compute stream wait on that layer's event, so earlier layers compute while later ones
still load. Stream ordering: the copy stream first waits for everything already queued on the compute stream
(evicted pages may still be read there), and the compute stream waits per layer. Pinned buffers are held by the
PageIn until its last copy completed (the copier synchronizes on it), whatever the host cache does meanwhile.

A snapshot found damaged while it streams in fails its PageIn: every waiter (a running prefill included) raises
SnapshotError, the entry is dropped from the pool as soon as no request holds it, and it is never put in the
host cache, so it is never served; the caller recomputes (and removes the file from the store).
The page table is only touched from the caller's thread; the copier only writes pool pages it was given.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from skillkv.tiers.host_cache import HostCache, HostKV
from skillkv.tiers.l2_reader import L2Reader
from skillkv.engine.paged import PagedEngine, Request
from skillkv.tiers.policy import TierPolicy
from skillkv.errors import SnapshotError

Piece = tuple[str, list[int]]  # (snapshot key, the token ids the caller expects it to hold)


class PageIn:
    """A prefix being paged into pool `pages`: `pieces` (HostKV) placed at token `offsets`.
    `wait(layer)` is the runner's readiness hook: it returns once layer `layer` may be read on the current
    stream, or raises SnapshotError if a piece is damaged."""

    def __init__(self, key: str, pieces: list[HostKV], offsets: list[int], pages: list[int], layers: int,
                 device: torch.device):
        self.key, self.pieces, self.offsets, self.pages, self.layers = key, pieces, offsets, pages, layers
        self.cuda = device.type == "cuda"
        self.device = device
        self.issued = [threading.Event() for _ in range(layers)]
        self.events: list = [None] * layers
        self.error: BaseException | None = None
        self.finished = threading.Event()  # every copy completed (or failed): pinned buffers released
        self.released = False  # the Tiers' own reference on the pool entry, dropped once finished
        self.start_event = None
        if self.cuda:  # copies go after everything already queued on the compute stream
            self.start_event = torch.cuda.Event()
            self.start_event.record(torch.cuda.current_stream(device))

    def run(self, pool, stream) -> None:
        """Issue every layer's copies (on the copier thread)."""
        try:
            with torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext():
                if self.cuda:
                    stream.wait_event(self.start_event)
                for layer in range(self.layers):
                    for piece, off in zip(self.pieces, self.offsets):
                        k, v = piece.wait(layer)
                        pool.load_layer(layer, self.pages, k, v, off, non_blocking=True)
                    if self.cuda:
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        self.events[layer] = ev
                    self.issued[layer].set()
                if self.cuda and self.layers:
                    self.events[-1].synchronize()  # host buffers stay referenced until the last copy landed
                for piece in self.pieces:
                    piece.complete.wait()  # an L2 read is cached in the host tier before the page-in counts as done
        except BaseException as e:  # noqa: BLE001 - reported to every waiter
            if self.cuda:  # copies already issued land before the pages can be freed and reused
                with contextlib.suppress(Exception):
                    stream.synchronize()
            self.error = e
            for ev in self.issued:
                ev.set()
        finally:
            self.pieces = []  # release the host buffers
            self.finished.set()

    def wait(self, layer: int) -> None:
        self.issued[layer].wait()
        if self.error is not None:
            raise self.error if isinstance(self.error, SnapshotError) else SnapshotError(
                f"{self.key[:12]}: paging failed ({type(self.error).__name__}: {self.error})")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.events[layer])

    def result(self) -> None:
        """Wait until every layer landed; raise SnapshotError if it failed."""
        for layer in range(self.layers):
            self.wait(layer)
        self.finished.wait()

    @property
    def failed(self) -> bool:
        return self.finished.is_set() and self.error is not None


class Tiers:
    """L1 / host / L2 paging for one engine and one store. Use from one thread (the engine's); the background
    threads (readers, prefetch, copier) never touch the page table."""

    def __init__(self, engine: PagedEngine, store, host_budget: int, reader_threads: int = 4,
                 chunk_bytes: int | None = None, pin: bool | None = None, policy: TierPolicy | None = None):
        self.engine, self.store, self.policy = engine, store, policy
        self.host = HostCache(host_budget, pin=pin)
        kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        self.reader = L2Reader(reader_threads, pin=self.host.pin, **kw)
        self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="skillkv-prefetch")
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="skillkv-copy")
        self._stream = torch.cuda.Stream(engine.device) if engine.device.type == "cuda" else None
        self._reading: dict[str, Future] = {}  # snapshot key -> Future[HostKV] of an L2 read in flight
        self._lock = threading.Lock()
        self.pending: dict[str, PageIn] = {}  # prefix key -> its page-in until finished
        self.sources: dict[str, str] = {}  # prefix key -> "l1" | "host" | "l2": where the last make_resident got it

    def close(self) -> None:
        for p in list(self.pending.values()):
            p.finished.wait()
        self._prefetch.shutdown(wait=True)
        self._copier.shutdown(wait=True)
        self.reader.close()

    # ------------------------------------------------------------------ host tier (L2 -> host)

    def _path(self, key: str) -> Path:
        e = self.store.entries().get(key)
        if e is None:
            raise SnapshotError(f"snapshot {key[:12]} is not in the store")
        return self.store.snap_dir / e.file

    def _read(self, key: str, ids: list[int]) -> HostKV:
        def done(kv: HostKV) -> None:
            if not kv.failed:
                self.host.put(key, kv)
            with self._lock:
                self._reading.pop(key, None)
        kv = self.reader.read(self._path(key), fingerprint=self.store.fingerprint, key=key, token_ids=ids,
                              alloc=self.host.alloc, on_done=done)
        self.store.touch(key)
        return kv

    def fetch(self, key: str, ids: list[int]) -> tuple[HostKV, str]:
        """The snapshot `key` in host memory: from the host cache ("host"), or an L2 read in flight or started
        now ("l2"; its layers become ready as they land). Raises SnapshotError for a missing, foreign, stale
        or (header-)corrupted snapshot."""
        kv = self.host.get(key)
        if kv is not None and kv.token_ids == list(ids):
            return kv, "host"
        with self._lock:
            fut = self._reading.get(key)
            if fut is None:
                fut = Future()
                fut.set_running_or_notify_cancel()
                self._reading[key] = fut
                start = True
            else:
                start = False
        if start:
            try:
                fut.set_result(self._read(key, ids))
            except BaseException as e:
                with self._lock:
                    self._reading.pop(key, None)
                fut.set_exception(e)
        kv = fut.result()
        if kv.token_ids != list(ids):
            raise SnapshotError(f"{kv.name}: token ids differ from the current tokenization (stale)")
        return kv, "l2"

    def prefetch(self, pieces: list[Piece]) -> None:
        """Start L2 -> host reads of snapshots a question needs, in the background (errors surface on use)."""
        for key, ids in pieces:
            if self.host.contains(key):
                continue
            with self._lock:
                if key in self._reading:
                    continue
                fut = Future()
                fut.set_running_or_notify_cancel()
                self._reading[key] = fut

            def go(key=key, ids=ids, fut=fut):
                try:
                    fut.set_result(self._read(key, ids))
                except BaseException as e:  # noqa: BLE001 - raised to whoever fetches it
                    with self._lock:
                        self._reading.pop(key, None)
                    fut.set_exception(e)
            self._prefetch.submit(go)

    def choose(self, key: str, pieces: list[Piece]) -> str:
        """Where the prefix `key` should come from: "l1" if resident; else "host" or "l2" (the slowest tier its
        pieces are in) when the policy estimates loading faster than recomputing (always, without a policy);
        else "recompute". Changes nothing."""
        if self.engine.table.entries.get(key) is not None:
            return "l1"
        entries = self.store.entries()
        if any(k not in entries and not self.host.contains(k) for k, _ in pieces):
            return "recompute"
        tiers = ["host" if self.host.contains(k) else "l2" for k, _ in pieces]
        where = "l2" if "l2" in tiers else "host"
        if self.policy is None:
            return where
        est = 0.0
        for (k, ids), tier in zip(pieces, tiers):
            e = entries.get(k)
            est += self.policy.load_seconds(tier, len(ids), e.bytes if e else None, e.compression if e else "none")
        tokens = sum(len(ids) for _, ids in pieces)
        return where if est * self.policy.margin < self.policy.m.recompute_seconds(tokens) else "recompute"

    # ------------------------------------------------------------------ L1 (host -> pool)

    def _reap(self) -> None:
        """Retire finished page-ins (dropping the reference that kept their pages from being evicted and reused
        while copies were in flight); drop failed entries from the pool once no request holds them."""
        table = self.engine.table
        for key, p in list(self.pending.items()):
            if not p.finished.is_set():
                continue
            if not p.released:
                table.release(key)
                p.released = True
            if p.error is not None:
                if table.entries[key].refs:
                    continue
                table.evict(key)
            del self.pending[key]

    def make_resident(self, key: str, pieces: list[Piece], pin: bool = False) -> str:
        """Ensure the prefix `key` (the concatenation of `pieces`) is in the pool. Returns "l1" if it already
        was, else "host" or "l2" (the slowest tier a piece came from); the copies then proceed in the background
        (`tiers.prefill` waits per layer). Raises SnapshotError if a piece is missing, foreign or stale (the pool
        is left unchanged); a piece found damaged later fails the prefill that waits for it."""
        self._reap()
        eng = self.engine
        p = self.pending.get(key)
        if p is not None and p.failed:
            raise p.error if isinstance(p.error, SnapshotError) else SnapshotError(str(p.error))
        if eng.table.lookup(key) is not None:
            if pin:
                eng.table.pin(key)
            self.sources[key] = "l1"
            return "l1"
        got = [self.fetch(k, ids) for k, ids in pieces]
        kvs = [kv for kv, _ in got]
        where = "l2" if any(t == "l2" for _, t in got) else "host"
        offsets, n = [], 0
        for kv in kvs:
            offsets.append(n)
            n += kv.tokens
        pages = eng.table.alloc(eng.table.pages_for(n))
        eng.table.add(key, pages, n, pinned=pin)
        eng.table.acquire(key)  # never evicted (its pages reused) while copies into them are in flight
        p = PageIn(key, kvs, offsets, pages, eng.pool.layers, eng.device)
        self.pending[key] = p
        self._copier.submit(p.run, eng.pool, self._stream)
        self.sources[key] = where
        return where

    def start(self, key: str | None) -> Request:
        """A request over the resident prefix `key` (the copy-on-write of its last page waits per layer too)."""
        p = self.pending.get(key) if key is not None else None
        if p is not None and p.failed:
            self._reap()
            raise p.error if isinstance(p.error, SnapshotError) else SnapshotError(str(p.error))
        return self.engine.start(key, defer_copy=p is not None)

    def prefill(self, reqs: list[Request], ids: list[list[int]]) -> torch.Tensor:
        """engine.prefill, waiting per layer for prefixes still being paged in."""
        loads = {r.prefix_key: self.pending[r.prefix_key] for r in reqs
                 if r.prefix_key is not None and r.prefix_key in self.pending}
        cows = [r for r in reqs if r.cow is not None]
        if not loads and not cows:
            return self.engine.prefill(reqs, ids)
        pool = self.engine.pool

        def layer_ready(i: int) -> None:
            for p in loads.values():
                p.wait(i)
            for r in cows:
                pool.copy_page_prefix(*r.cow, layer=i)
        out = self.engine.prefill(reqs, ids, layer_ready=layer_ready)
        for r in cows:
            r.cow = None
        return out

    def finish(self, req: Request) -> None:
        self.engine.finish(req)
        self._reap()

    def wait(self, key: str) -> None:
        """Block until the prefix `key` is fully paged in (raises SnapshotError if it failed)."""
        p = self.pending.get(key)
        if p is not None:
            try:
                p.result()
            finally:
                self._reap()
