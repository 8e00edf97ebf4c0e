"""The host tier: snapshots' KV in (pinned) host memory, an LRU cache with a hard byte budget.

`HostKV` is one snapshot's KV in one host buffer (pinned when CUDA is available, so host -> GPU copies run at
full speed and asynchronously), with per-layer readiness: an L2 read fills it layer by layer (engine/l2_reader.py)
and `wait(layer)` blocks until that layer has landed and its checksums verified. `HostCache` keeps recently used,
fully verified `HostKV`s keyed by snapshot key.

Contract (HostCache, a storage backend of four methods, like early LMCache's)
  - `get(key)` returns the cached entry or None, and marks it most recently used. Nothing else changes.
  - `contains(key)` answers without changing the LRU order.
  - `put(key, kv)` caches a fully verified entry, evicting least recently used entries until it fits; an entry
    larger than the whole budget is not cached (returns False). Putting a key again replaces the old entry.
  - `evict(key)` drops an entry (returns whether it was there).
  - The bytes held (`nbytes`) never exceed `budget_bytes`, after every operation (`check()` asserts it).
  An evicted entry's memory is freed once nothing else references it: a page-in still copying from it holds its
  own reference (engine/tiers.py), so eviction never pulls a buffer from under an in-flight copy.
  The budget counts the entries' bytes. Reads in flight (not yet verified, so not yet cached) and entries still
  referenced by a copy are outside it, and torch's caching host allocator may round a pinned block up (to a power
  of two in the versions we know), so the pinned memory the process holds can exceed the budget by that much.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from skillkv.errors import SkillkvError, SnapshotError
from skillkv.lazy import torch  # the tiers stage is built by every command, also those without tensors


RECYCLE_MIN = 1 << 20
MAX_SPARES = 2


def _unused(buf: torch.Tensor) -> bool:
    """Whether nothing but `buf` itself (and the check's own handle) holds its storage: no entry, no view."""
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2


def pinned_default() -> bool:
    """Pinned when CUDA is available (a CPU-only torch build is recognised without importing torch)."""
    from skillkv.model.files import default_device

    return default_device() == "cuda"


def host_buffer(nbytes: int, pin: bool | None = None) -> torch.Tensor:
    """A uint8 host buffer of `nbytes`, page-locked when `pin` (default: when CUDA is available). Pinned memory
    comes from torch's caching host allocator, so a freed buffer is reused, not re-registered, by the next one."""
    pin = pinned_default() if pin is None else pin
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class HostKV:
    """KV of one snapshot: per layer k, v [tokens, kv_heads, head_dim] as views of one host buffer, laid out
    k.0 v.0 k.1 v.1 ... Layers become ready in any order; `wait(layer)` blocks until layer `layer` is ready
    and raises SnapshotError if the snapshot turned out damaged (then no layer is ever served from it).

    With `into` (per layer (k, v) contiguous tensors of `shape` and `dtype`: a runner's own pages, Runner.reserve)
    the entry fills those tensors instead of a buffer of its own (`buffer` is None): such an entry is never cached,
    its memory belongs to the runner."""

    def __init__(self, key: str, token_ids: list[int], layers: int, shape: list[int], dtype: torch.dtype,
                 buffer: torch.Tensor | None = None, pin: bool | None = None, name: str = "",
                 into: list | None = None):
        self.key, self.token_ids, self.layers, self.name = key, list(token_ids), layers, name or key[:12]
        self.shape, self.dtype = list(shape), dtype
        count = 1
        for d in shape:
            count *= d
        self.tensor_bytes = count * torch.empty((), dtype=dtype).element_size()
        self.nbytes = 2 * layers * self.tensor_bytes
        self.buffer = None
        if into is not None:  # the filler checked them against the snapshot (l2_reader)
            self.keys, self.values = [k for k, _ in into], [v for _, v in into]
        else:
            self._own_buffer(shape, dtype, count, buffer, pin)
        self._ready = [threading.Event() for _ in range(layers)]
        self._error: BaseException | None = None
        # set once the filler is done with the entry (after its completion callback, e.g. caching it); a filler
        # that works in the background (the L2 reader) clears it first
        self.complete = threading.Event()
        self.complete.set()
        self.compression, self.file_bytes, self.read_seconds = "", 0, None  # set by the L2 reader

    def _own_buffer(self, shape: list[int], dtype: torch.dtype, count: int, buffer: torch.Tensor | None,
                    pin: bool | None) -> None:
        layers = self.layers
        self.buffer = host_buffer(self.nbytes, pin) if buffer is None else buffer
        if self.buffer.numel() < self.nbytes:
            raise SkillkvError(f"host buffer of {self.buffer.numel()} bytes cannot hold {self.nbytes}")
        typed = self.buffer[:self.nbytes].view(dtype) if self.nbytes else torch.empty(0, dtype=dtype)
        per = count
        self.keys = [typed[(2 * i) * per:(2 * i + 1) * per].view(shape) for i in range(layers)]
        self.values = [typed[(2 * i + 1) * per:(2 * i + 2) * per].view(shape) for i in range(layers)]

    @classmethod
    def from_kv(cls, key: str, token_ids: list[int], kv, pin: bool | None = None) -> HostKV:
        """A ready entry holding a copy of `kv` (per layer (k, v), any device)."""
        k0 = kv[0][0]
        h = cls(key, token_ids, len(kv), list(k0.shape), k0.dtype, pin=pin)
        for i, (k, v) in enumerate(kv):
            h.keys[i].copy_(k)
            h.values[i].copy_(v)
            h.set_ready(i)
        return h

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def pinned(self) -> bool:
        return self.buffer.is_pinned() if self.nbytes and self.buffer is not None else False

    # ------------------------------------------------------------------ readiness (set by the filler)

    def set_ready(self, layer: int) -> None:
        self._ready[layer].set()

    def fail(self, error: BaseException) -> None:
        """Mark the entry damaged; every waiter wakes and raises."""
        if self._error is None:
            self._error = error
        for e in self._ready:
            e.set()

    # ------------------------------------------------------------------ readiness (read by consumers)

    def wait(self, layer: int, timeout: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of `layer` once verified. Raises SnapshotError if the snapshot is damaged."""
        if not self._ready[layer].wait(timeout):
            raise TimeoutError(f"{self.name}: layer {layer} not read within {timeout} s")
        if self._error is not None:
            if isinstance(self._error, SnapshotError):
                raise SnapshotError(str(self._error))
            raise SnapshotError(f"{self.name}: cannot read ({type(self._error).__name__}: {self._error})")
        return self.keys[layer], self.values[layer]

    def wait_all(self, timeout: float | None = None) -> HostKV:
        for i in range(self.layers):
            self.wait(i, timeout)
        return self

    @property
    def ready(self) -> bool:
        """All layers landed and verified (and no failure)."""
        return self._error is None and all(e.is_set() for e in self._ready)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.wait_all()
        return list(zip(self.keys, self.values))


class HostCache:
    """LRU cache of verified `HostKV`s with a hard byte budget (`--host-kv-budget`). Thread-safe."""

    def __init__(self, budget_bytes: int, pin: bool | None = None):
        if budget_bytes < 0:
            raise SkillkvError(f"host KV budget must be >= 0 bytes (got {budget_bytes})")
        self.budget_bytes = budget_bytes
        self.pin = pinned_default() if pin is None else pin
        self._entries: OrderedDict[str, HostKV] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.evictions = 0
        self._spares: list[torch.Tensor] = []  # unpinned buffers handed out before, recycled once unused (`alloc`)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, key: str) -> HostKV | None:
        """The cached entry for `key` (most recently used from now on), or None."""
        with self._lock:
            kv = self._entries.get(key)
            if kv is not None:
                self._entries.move_to_end(key)
            return kv

    def contains(self, key: str) -> bool:
        """Whether `key` is cached; does not change the LRU order."""
        with self._lock:
            return key in self._entries

    def put(self, key: str, kv: HostKV) -> bool:
        """Cache a fully verified entry, evicting LRU entries to make room. False (nothing changed but a previous
        entry of the same key is dropped) if it is larger than the whole budget."""
        if not kv.ready:
            raise SkillkvError(f"host cache: entry {key[:12]} is not fully read and verified")
        if kv.buffer is None and kv.nbytes:
            raise SkillkvError(f"host cache: entry {key[:12]} lives in a runner's memory, not a buffer of its own")
        with self._lock:
            self._drop(key)
            if kv.nbytes > self.budget_bytes:
                return False
            while self.nbytes + kv.nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = kv
            self.nbytes += kv.nbytes
            return True

    def evict(self, key: str) -> bool:
        """Drop `key`; whether it was cached."""
        with self._lock:
            return self._drop(key)

    def _drop(self, key: str) -> bool:
        kv = self._entries.pop(key, None)
        if kv is None:
            return False
        self.nbytes -= kv.nbytes
        return True

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A host buffer for a new entry (pinned if this cache pins). Unpinned buffers of RECYCLE_MIN bytes or more
        are recycled once nothing uses them any more (no entry, no view of it left): a fresh one comes from the
        kernel as zeroed pages, and faulting them in cost more than reading the snapshot (86 MB on the default
        model: 58 ms fresh vs 24 ms recycled, one reader thread, docs/BENCHMARKS.md). Pinned memory is already
        recycled by torch's caching host allocator."""
        if self.pin or nbytes < RECYCLE_MIN:
            return host_buffer(nbytes, self.pin)
        with self._lock:
            for buf in self._spares:
                if buf.numel() >= nbytes and _unused(buf):
                    return buf[:nbytes]
            buf = host_buffer(nbytes, False)
            self._spares = [b for b in self._spares if not _unused(b)][-(MAX_SPARES - 1):] + [buf]
            return buf[:nbytes]

    def check(self) -> None:
        """Assert the invariants: bytes held = sum of entries, within budget, every entry fully verified."""
        with self._lock:
            assert self.nbytes == sum(kv.nbytes for kv in self._entries.values()), "byte count drifted"
            assert self.nbytes <= self.budget_bytes, "host cache over budget"
            assert all(kv.ready for kv in self._entries.values())
