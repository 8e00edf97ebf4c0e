"""The Runner contract: the one way compile, tiers, compose, SkillKV and serve drive a model.

A runner OWNS
  - the model's weights on its device;
  - its resident prefixes (its L1): the exact KV of a prompt prefix, one entry per chain key (skillkv.store), made
    resident by `admit` and kept until evicted (least recently used first, pinned entries last, never while a
    sequence references it); compose's placed entries belong here too;
  - sequences (`Seq`): a prefix plus the tokens appended to it, until `release`;
  - whatever makes steps fast (a preallocated pool, planned kernels, CUDA graphs).
A runner NEVER
  - reads or writes files (no store, no snapshot, no stats): KV arrives through `admit` as `KVSource`s (which may
    still be filling from another thread, layer by layer) and leaves through `read`;
  - chooses skills, modes or repair positions (SkillKV and the compose stage do).
Threads: every method is called from one thread (the caller's; serve's engine thread); sources may be filled by
others.

Exactness: a runner computes a prefix piece with the same kernels whether `skillkv compile` stores it, `ask`
recomputes it in full mode or serve does: exact mode (a sequence over admitted snapshots) equals full mode (the same
pieces prefilled from scratch, then the question) bit for bit. `name` goes into the snapshot fingerprint, so two
runners never share snapshots.

Two implementations: `hf` (runners/hf.py, transformers: any family, sliding-window models included; the reference)
and `paged` (runners/paged.py, the lean Llama-family runner over the KV pool; torch attention on the CPU, FlashInfer
on CUDA). `make_runner` (runners/__init__.py) picks one.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:  # the contract imports without torch (skillkv/lazy.py says why)
    import torch

KV = list  # list[tuple[torch.Tensor, torch.Tensor]]: per layer (keys, values), each [tokens, kv_heads, head_dim] (NHD)


class KVSource(Protocol):
    """A prefix piece arriving layer by layer (tiers/host_cache.HostKV is one; `ReadyKV` wraps KV in memory).
    `tokens`: its rows. `wait(layer)` blocks until that layer's (keys, values) are ready and verified and returns
    them (host or device tensors, never modified by the consumer); raises SnapshotError if the piece turned out
    damaged. `complete` is set once its producer is done with it (after which its buffers are stable)."""

    tokens: int
    complete: threading.Event

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ReadyKV:
    """A `KVSource` over KV already in memory (computed, or read synchronously)."""

    def __init__(self, kv: KV):
        self.kv = kv
        self.tokens = kv[0][0].shape[0] if kv else 0
        self.complete = threading.Event()
        self.complete.set()

    def wait(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer]


@dataclass
class Part:
    """One skill of a composed prefix (compose mode): `key` is the chain key of the snapshot it is placed from,
    holding `tokens` rows of which the first `context` are context (the preamble, or preamble + the compose
    neighbour) and the rest the skill's own; `load()` supplies that snapshot's KV when the runner holds neither
    the placed rows nor the snapshot's own entry."""

    key: str
    tokens: int
    context: int
    load: Callable[[], KV]


class Seq:
    """A sequence over a runner: `length` tokens in KV (prefix included). Opaque otherwise: only the runner that
    opened it reads its state; release it exactly once."""

    length: int = 0


class Runner(ABC):
    """See the module docstring. `device` is the torch device of the weights and the KV; `model` the transformers
    model the weights came from (compose's deviation probe and the evaluation's reference read it)."""

    name = "?"
    device: torch.device
    model: object

    # ------------------------------------------------------------------ residency (the runner's L1)

    @abstractmethod
    def resident(self, key: str) -> bool:
        """Whether the prefix `key` is resident (possibly still arriving). Marks it most recently used."""

    @abstractmethod
    def admit(self, key: str, sources: list[KVSource], pin: bool = False) -> None:
        """Make the prefix `key` resident: the concatenation of `sources`, in order, at positions 0..n.
        Pre: not resident. May return before every layer landed; `prefill` over it waits per layer, and a damaged
        source makes that prefill (or `settle`) raise SnapshotError, after which the entry is dropped as soon as no
        sequence holds it. Post: resident(key). Raises PoolFull (nothing changed) when it cannot fit."""

    def reserve(self, key: str, tokens: int, pin: bool = False) -> KV | None:
        """Where a runner keeps KV in host memory (the paged runner on the CPU): make room for the prefix `key` of
        `tokens` rows now and return per layer writable (keys, values) views [tokens, kv_heads, head_dim] of its
        storage, so a reader fills them in place (one copy from the page cache instead of two). The caller then
        calls `admit(key, sources)` with sources whose tensors are those views (its copies are skipped), or
        `abandon(key)` if it gives up. None where the runner cannot (`reads_in_place` false; or this time, the room
        it found not being one run): the caller uses `admit` alone.
        Raises PoolFull (nothing changed) when it cannot fit."""
        return None

    def abandon(self, key: str) -> None:
        """Give back the room `reserve(key, ...)` made, nothing having been admitted. Pre: no writer into the
        views is still running."""

    @abstractmethod
    def settle(self, key: str) -> None:
        """Block until the resident prefix `key` has fully arrived; SnapshotError if a source was damaged."""

    @abstractmethod
    def pin(self, key: str, pinned: bool = True) -> None:
        """Evict the resident `key` only after every unpinned entry. Pre: resident(key)."""

    @abstractmethod
    def retire(self, live: Callable[[str], bool]) -> None:
        """Evict every resident entry whose chain key is not `live` (and every compose entry placed from one): at
        once, or for an entry a sequence holds, as soon as it is released (a sequence that started on an old
        version of a skill finishes on it)."""

    # ------------------------------------------------------------------ sequences

    @abstractmethod
    def open(self, key: str | None) -> Seq:
        """A new sequence continuing the resident prefix `key` (None: empty). The prefix is held (never evicted)
        until `release`; the sequence never writes the prefix's rows (it appends after them: in its own copy or
        pages, or in free slots of the prefix's storage that no other sequence uses meanwhile)."""

    def open_cached(self, ids: list[int], key: str | None = None, key_tokens: int = 0,
                    reuse: bool = True) -> tuple[Seq, dict]:
        """A sequence continuing the longest prefix of the prompt `ids` whose KV the runner holds: full pages of
        earlier prompts and answers (its prefix cache, where `prefix_cache` is set and `reuse`), or the resident
        entry `key` whose tokens are ids[:key_tokens] (a skill chain), whichever covers more. The caller prefills
        ids[seq.length:]; the sequence's own full pages join the cache as they fill (prompt and answer tokens), so
        the next turn of a conversation finds them. Cache pages are bit-identical to a full prefill only where
        `cache_exact` (the runner is chunk-invariant). Returns (seq, {"prefix_cache": tokens reused from the
        cache, "skill_kv": tokens reused from the entry}). This default (no prefix cache): `open(key)`."""
        seq = self.open(key)
        return seq, {"prefix_cache": 0, "skill_kv": seq.length}

    def cached_tokens(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` `open_cached` would take from the prefix cache now. Changes nothing."""
        return 0

    def clear_cache(self) -> None:
        """Drop every prefix-cache page no sequence holds (benchmarks: the next prompt is computed or read from the
        store)."""

    @abstractmethod
    def open_composed(self, parts: list[Part], preamble: int) -> Seq:
        """A sequence over the composed prefix of `parts` (all compiled after the same `preamble` tokens): the
        first part's whole snapshot, then every later part's own rows with keys re-rotated to their new positions
        (engine/rope.py), bit for bit what `engine.rope.place` builds. Pre: len(parts) >= 1. Nothing about the
        combination outlives the sequence except entries the runner may keep for reuse."""

    @abstractmethod
    def prefill(self, seqs: list[Seq], ids: list[list[int]], every: bool = False) -> torch.Tensor:
        """Append ids[i] to seqs[i], all in one batched step (a decode step is a 1-token prefill); return float32
        logits [len(seqs), vocab] of each sequence's last new token, or with `every` [sum of lengths, vocab] of
        every new token (teacher forcing). A sequence's result does not depend on what it is batched with on a
        runner whose `batch_invariant` is set."""

    @abstractmethod
    def recompute(self, seq: Seq, ids: list[int], positions: list[int]) -> None:
        """Compose repair: replace the rows at sorted, distinct `positions` of the sequence's prefix (whose tokens
        are `ids`) by their KV recomputed given everything before them: earlier recomputed rows and the composed
        rows of the others (CacheBlend's selective recompute, one pass)."""

    @abstractmethod
    def read(self, seq: Seq, start: int, end: int) -> KV:
        """A copy of rows [start, end) of the sequence's KV, on the runner's device."""

    @abstractmethod
    def release(self, seq: Seq) -> None:
        """Free the sequence's own KV and drop its holds. Exactly once per sequence."""

    # ------------------------------------------------------------------ capacity (serve's admission)

    page_size: int = 16
    reads_in_place: bool = False  # `reserve` can hand out views of host-memory storage
    num_pages: int = 1 << 62  # pages sequences may hold in all (a runner without a fixed pool: no limit)
    batch_invariant: bool = False
    prefix_cache: bool = False  # `open_cached` can reuse earlier prompts' KV
    cache_exact: bool = False  # ... bit for bit what a full prefill computes (the runner is chunk-invariant)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @abstractmethod
    def can_alloc(self, pages: int) -> bool:
        """Whether `pages` more pages could be given to sequences now (evicting unheld entries if needed)."""

    @abstractmethod
    def held_pages(self, seq: Seq) -> int:
        """Pages the sequence holds of its own (counted against `can_alloc`)."""

    @abstractmethod
    def usage(self) -> dict:
        """Counters for /health and stats: pages, free, resident entries, evictions, bytes."""

    def close(self) -> None:
        """Stop background work (copies in flight finish first)."""
