"""The tiers stage: L2 (the store on disk) -> host memory -> L1 (the runner's resident prefixes).

    tiers = Tiers(store, host_budget=8 << 30, runner=lambda: kv.runner)
    tiers.prefetch([(key, ids)])                  # as soon as the skills are chosen: L2 -> host in the background
    where = tiers.make_resident(key, [(key, ids), ...])   # "l1" | "host" | "l2"; the runner pages it in by layer
    seq = runner.open(key)                        # its prefill waits per layer for the copies still in flight

Reader threads land and verify a snapshot in host memory layer by layer (tiers/l2_reader.py); `make_resident`
hands those host buffers to the runner as KV sources (runners/base.KVSource) at once, so the runner's copies of
layer i start as soon as layer i is verified, and the question's first layers compute while later ones still load
(engine/page_in.py on the paged runner). A verified read is kept in the host cache (tiers/host_cache.py, LRU with a
byte budget; SkillKV's default is 4 GiB of pinned memory on CUDA and none on the CPU, where the OS page cache
already holds recently read snapshots and the pool is host memory itself) for the next miss in L1. Whether to load at all is the policy's call (tiers/policy.py: measured once
per model and store on CUDA; on the CPU loading always wins: a CPU prefills hundreds of tokens per second and reads
snapshots at GB/s).

A snapshot that is missing, foreign or stale raises SnapshotError before anything is admitted; one found damaged
while it streams in fails the runner's prefill (SnapshotError) and is never put in the host cache, so it is never
served: the caller removes it from the store and recomputes. Use from one thread (the engine's); the background
threads (readers, prefetch) never touch the runner.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from skillkv.errors import SnapshotError
from skillkv.runners.base import Runner
from skillkv.tiers.host_cache import HostCache, HostKV
from skillkv.tiers.l2_reader import L2Reader
from skillkv.tiers.policy import TierPolicy, cached_fraction

Piece = tuple[str, list[int]]  # (snapshot key, the token ids the caller expects it to hold)


class Tiers:
    """L2 -> host -> L1 for one store and one runner. `runner()` returns the runner (the model loads only when
    something must become resident: prefetching runs before it). `policy()` returns the TierPolicy or None (always
    load); it is asked once, when a prefix is first not resident."""

    def __init__(self, store, host_budget: int, runner: Callable[[], Runner],
                 policy: Callable[[], TierPolicy | None] = lambda: None, reader_threads: int = 4,
                 chunk_bytes: int | None = None, pin: bool | None = None):
        self.store, self._runner, self._policy = store, runner, policy
        self._policy_asked, self._policy_value = False, None
        self.host = HostCache(host_budget, pin=pin)
        kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        self.reader = L2Reader(reader_threads, pin=self.host.pin, **kw)
        self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="skillkv-prefetch")
        self._reading: dict[str, Future] = {}  # snapshot key -> Future[HostKV] of an L2 read in flight
        self._prefetched: set[str] = set()  # keys a prefetch read from L2 whose first use has not come yet
        self._lock = threading.Lock()
        self.sources: dict[str, str] = {}  # prefix key -> "l1" | "host" | "l2": where the last make_resident got it

    def refresh_policy(self) -> None:
        """Ask the policy again at the next decision (after it was measured anew)."""
        self._policy_asked = False

    def close(self) -> None:
        self._prefetch.shutdown(wait=True)
        self.reader.close()

    # ------------------------------------------------------------------ host tier (L2 -> host)

    def _read(self, key: str, ids: list[int]) -> HostKV:
        def done(kv: HostKV) -> None:
            if not kv.failed:
                self.host.put(key, kv)
            with self._lock:
                self._reading.pop(key, None)
        path = self.store.file_path(key)
        kv = self.reader.read(path, fingerprint=self.store.fingerprint, key=key, token_ids=ids, alloc=self.host.alloc,
                              on_done=done)
        self.store.touch(key, path)
        return kv

    def fetch(self, key: str, ids: list[int]) -> tuple[HostKV, str]:
        """The snapshot `key` in host memory: from the host cache ("host"), or an L2 read in flight or started
        now ("l2"; its layers become ready as they land; a read this question's prefetch already finished counts
        as "l2" too). Raises SnapshotError for a missing, foreign, stale or (header-)corrupted snapshot."""
        kv = self.host.get(key)
        if kv is not None and kv.token_ids == list(ids):
            with self._lock:
                prefetched = key in self._prefetched
                self._prefetched.discard(key)
            return kv, "l2" if prefetched else "host"
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

    def keep(self, pieces: list[Piece], kvs: list) -> None:
        """Put computed pieces (their KV, any device) in the host tier, in the background: a prefix computed once
        comes back from host memory, not from a recompute, after the runner evicted it (write-back). Pieces
        already there, or larger than the whole budget, are skipped."""
        for (key, ids), kv in zip(pieces, kvs):
            with self._lock:
                self._prefetched.discard(key)  # a prefetch of it served nothing: the next host hit is a host hit
            nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
            if self.host.contains(key) or nbytes > self.host.budget_bytes:
                continue
            self._prefetch.submit(lambda key=key, ids=ids, kv=kv: self.host.put(
                key, HostKV.from_kv(key, ids, kv, pin=self.host.pin)))

    def prefetch(self, pieces: list[Piece], runner: Runner | None = None) -> None:
        """Start L2 -> host reads of snapshots a question needs, in the background (errors surface on use); not
        when the policy, once asked, found recomputing them faster, nor for a loaded `runner` that reads them in
        place (`reads_in_place`: they are read when made resident). Without a host tier (budget 0, the CPU's
        default) a finished read would be dropped, so the files are only announced to the OS (readahead into the
        page cache, no copy: a cold `skillkv ask` warms them while the model loads)."""
        if self._policy_asked and self._source(pieces, self._policy_value) == "recompute":
            return
        if runner is not None and self.reads_in_place(runner):
            return
        if self.host.budget_bytes == 0:
            for key, _ in pieces:
                self._advise(key)
            return
        for key, ids in pieces:
            if self.host.contains(key):
                continue
            with self._lock:
                if key in self._reading:
                    continue
                fut = Future()
                fut.set_running_or_notify_cancel()
                self._reading[key] = fut
                self._prefetched.add(key)

            def go(key=key, ids=ids, fut=fut):
                try:
                    fut.set_result(self._read(key, ids))
                except BaseException as e:  # noqa: BLE001 - raised to whoever fetches it
                    with self._lock:
                        self._reading.pop(key, None)
                    fut.set_exception(e)
            self._prefetch.submit(go)

    def _advise(self, key: str) -> None:
        """Ask the OS to read the snapshot file of `key` into its page cache in the background."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.store.file_path(key), os.O_RDONLY)
        except (SnapshotError, OSError):  # surfaces when the snapshot is used
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def choose(self, key: str, pieces: list[Piece]) -> str:
        """Where the prefix `key` should come from: "l1" if resident; else "host" or "l2" (the slowest tier its
        pieces are in) when the policy estimates loading faster than recomputing (always, without a policy);
        else "recompute". Changes nothing."""
        if self._runner().resident(key):
            return "l1"
        if not self._policy_asked:
            self._policy_value, self._policy_asked = self._policy(), True
        return self._source(pieces, self._policy_value)

    def _source(self, pieces: list[Piece], policy: TierPolicy | None) -> str:
        """"host" or "l2" (the slowest tier the pieces are in) when `policy` estimates loading them faster than
        recomputing (always, without a policy), else "recompute" (also when a piece is in no tier)."""
        entries = self.store.entries()
        if any(k not in entries and not self.host.contains(k) for k, _ in pieces):
            return "recompute"
        tiers = ["host" if self.host.contains(k) else "l2" for k, _ in pieces]
        where = "l2" if "l2" in tiers else "host"
        if policy is None:
            return where
        est = 0.0
        for (k, ids), tier in zip(pieces, tiers):
            e = entries.get(k)
            cached = tier == "l2" and cached_fraction(self.store.file_path(k)) > 0.9
            est += policy.load_seconds(tier, len(ids), e.bytes if e else None, e.compression if e else "none", cached)
        tokens = sum(len(ids) for _, ids in pieces)
        return where if est * policy.margin < policy.m.recompute_seconds(tokens) else "recompute"

    # ------------------------------------------------------------------ L1 (host -> runner)

    def make_resident(self, key: str, pieces: list[Piece], pin: bool = False) -> str:
        """Ensure the prefix `key` (the concatenation of `pieces`) is resident in the runner. Returns "l1" if it
        already was, else "host" or "l2" (the slowest tier a piece came from); the runner then pages it in in the
        background (its prefill waits per layer). Raises SnapshotError if a piece is missing, foreign or stale
        (nothing is admitted); a piece found damaged later fails the prefill that waits for it."""
        runner = self._runner()
        if runner.resident(key):
            if pin:
                runner.pin(key)
            self.sources[key] = "l1"
            return "l1"
        got = self._read_in_place(key, pieces, runner, pin) or [self.fetch(k, ids) for k, ids in pieces]
        runner.admit(key, [kv for kv, _ in got], pin=pin)
        where = "l2" if any(t == "l2" for _, t in got) else "host"
        self.sources[key] = where
        return where

    def reads_in_place(self, runner: Runner) -> bool:
        """Whether L2 reads for `runner` go straight into its pages (`_read_in_place`): a runner that keeps its KV
        in host memory (the paged runner on the CPU) and no host tier (its default there)."""
        return self.host.budget_bytes == 0 and runner.reads_in_place

    def _read_in_place(self, key: str, pieces: list[Piece], runner: Runner, pin: bool) -> list | None:
        """Where `reads_in_place`, every piece read from L2 straight into the prefix's own pages (Runner.reserve):
        one copy from the page cache instead of two (into a host buffer, then into the pool). On the default
        model's 1,839-token skill (86 MB), 2 cores: the cached first token 75 vs 91 ms (docs/BENCHMARKS.md). None,
        nothing started, when a piece is already being read (a prefetch: copied as before) or the runner cannot;
        raises SnapshotError (nothing admitted) for a missing, foreign or stale piece."""
        if not self.reads_in_place(runner):
            return None
        with self._lock:
            if any(k in self._reading for k, _ in pieces):
                return None
        into = runner.reserve(key, sum(len(ids) for _, ids in pieces), pin)
        if into is None:
            return None
        got, off = [], 0
        try:
            for k, ids in pieces:
                n = len(ids)
                path = self.store.file_path(k)
                kv = self.reader.read(path, fingerprint=self.store.fingerprint, key=k, token_ids=ids,
                                      into=[(a[off:off + n], b[off:off + n]) for a, b in into])
                self.store.touch(k, path)
                got.append((kv, "l2"))
                off += n
        except BaseException:
            for kv, _ in got:  # reads already started write into the reserved pages: let them finish first
                kv.complete.wait()
            runner.abandon(key)
            raise
        return got
