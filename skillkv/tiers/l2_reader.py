"""The L2 reader: a snapshot file read straight into a (pinned) host buffer, verified tensor by tensor.

    reader = L2Reader(threads=4)
    kv = reader.read(path, fingerprint=fp, key=key, token_ids=ids)   # returns at once; header already checked
    k, v = kv.wait(0)                                                # layer 0 landed and verified

`read` checks synchronously what is cheap and decisive: the header (format, header checksum, tensor table: the
same `snapshot.parse_layout` rules as the mapped reader), the fingerprint, the key and the stored token ids
(their checksum and equality with `token_ids`). A foreign or stale snapshot therefore fails before any KV byte
is read. The KV tensors are then read in layer order (k.0, v.0, k.1, ...: not file order, which safetensors
sorts by name) by a pool of reader threads, each tensor with large positional reads (`os.preadv`, no GIL)
straight into its slot of the host buffer, its crc32 computed chunk by chunk as the bytes land (zlib releases the
GIL), so reading, checking and the caller's host -> GPU copies of earlier layers overlap. A layer is marked ready
only when both its tensors verified; a mismatch fails the whole entry (every waiter raises SnapshotError).

zstd snapshots: each tensor is one frame; a reader thread reads the frame into a per-thread scratch buffer,
checks its crc32, decompresses it and interleaves the byte planes into the host buffer (snapshot.unzstd_into),
so frames decompress in parallel threads, one per tensor.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from skillkv.lazy import torch
from skillkv.tiers.host_cache import HostKV, host_buffer
from skillkv.crc import crc32
from skillkv.errors import SnapshotError
from skillkv.snapshot import (Layout, scratch_buffer, check_identity, check_tensor, header_length, parse_layout,
                              unzstd_into)

CHUNK_BYTES = 16 << 20


def _pread_into(fd: int, dst: memoryview, offset: int, chunk: int, name: str) -> int:
    """Fill `dst` from the file at `offset` in reads of at most `chunk` bytes; return the crc32 of the bytes."""
    crc, got, n = 0, 0, len(dst)
    while got < n:
        k = os.preadv(fd, [dst[got:min(n, got + chunk)]], offset + got)
        if k <= 0:
            raise SnapshotError(f"{name}: truncated (file shorter than its header says)")
        crc = crc32(dst[got:got + k], crc)
        got += k
    return crc


class _Job:
    """One file being read: the open descriptor, its layout, the entry being filled, outstanding tensors."""

    def __init__(self, fd: int, lay: Layout, kv: HostKV, name: str, on_done: Callable[[HostKV], None] | None):
        self.fd, self.lay, self.kv, self.name, self.on_done = fd, lay, kv, name, on_done
        self.left = 2 * lay.layers
        self.per_layer = [2] * lay.layers
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()


class L2Reader:
    """Reads snapshots into host buffers with `threads` reader threads (shared by every read in flight)."""

    def __init__(self, threads: int = 4, chunk_bytes: int = CHUNK_BYTES, pin: bool | None = None):
        self.threads, self.chunk_bytes, self.pin = threads, chunk_bytes, pin
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="skillkv-l2")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def read(self, path: Path, fingerprint: str | None = None, key: str | None = None,
             token_ids: list[int] | None = None, alloc: Callable[[int], torch.Tensor] | None = None,
             on_done: Callable[[HostKV], None] | None = None, into: list | None = None) -> HostKV:
        """Start reading `path`; return its HostKV at once (layers become ready as they land). Raises
        SnapshotError now for an unreadable, corrupted-header, foreign, wrong-key or stale snapshot; a damaged
        tensor found later fails the entry (its waiters raise). `alloc(nbytes)` supplies the host buffer
        (default: pinned when CUDA is available); `into` (per layer (k, v) tensors of the snapshot's shape and
        dtype, e.g. a runner's pages: Runner.reserve) takes the bytes instead, read straight into them (one copy
        from the page cache, no host buffer). `on_done(kv)` runs in a reader thread once every layer is verified
        (or the entry failed: check `kv.failed`)."""
        path = Path(path)
        name = path.name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SnapshotError(f"{name}: cannot read ({e.strerror or e})") from None
        try:
            size = os.fstat(fd).st_size
            n = header_length(os.pread(fd, 8, 0), name, size)
            lay = parse_layout(os.pread(fd, n, 8), size, name)
            sp = lay.spans["token_ids"]
            ids = torch.empty(lay.tokens, dtype=torch.int32)
            crc = _pread_into(fd, memoryview(ids.numpy()).cast("B"), sp.lo, self.chunk_bytes, name) if lay.tokens else 0
            check_tensor(lay, "token_ids", crc, name)
            check_identity(lay.meta, ids.tolist(), name, fingerprint, key, token_ids)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if into is not None:
                if len(into) != lay.layers or any(list(t.shape) != list(lay.shape) or t.dtype != lay.dtype
                                                  or not t.is_contiguous() for pair in into for t in pair):
                    raise SnapshotError(f"{name}: its KV shape does not match the destination")
                kv = HostKV(lay.meta["key"], ids.tolist(), lay.layers, lay.shape, lay.dtype, name=name, into=into)
            else:
                nbytes = 2 * lay.layers * lay.kv_nbytes
                buf = alloc(nbytes) if alloc is not None else host_buffer(nbytes, self.pin)
                kv = HostKV(lay.meta["key"], ids.tolist(), lay.layers, lay.shape, lay.dtype, buffer=buf, name=name)
            kv.compression, kv.file_bytes = lay.compression, size
        except BaseException:
            os.close(fd)
            raise
        kv.complete.clear()
        job = _Job(fd, lay, kv, name, on_done)
        if lay.layers == 0:
            self._finish(job)
        for i in range(lay.layers):
            self._pool.submit(self._tensor, job, i, "k")
            self._pool.submit(self._tensor, job, i, "v")
        return kv

    def _tensor(self, job: _Job, layer: int, kv_: str) -> None:
        kv, lay, tname = job.kv, job.lay, f"{kv_}.{layer}"
        try:
            if not kv.failed:
                out = (kv.keys if kv_ == "k" else kv.values)[layer]
                sp = lay.spans[tname]
                if lay.compression == "none":
                    dst = memoryview(out.view(torch.uint8).numpy()).cast("B") if sp.nbytes else memoryview(b"")
                    check_tensor(lay, tname, _pread_into(job.fd, dst, sp.lo, self.chunk_bytes, job.name), job.name)
                else:
                    frame = scratch_buffer("frame", sp.nbytes)
                    crc = _pread_into(job.fd, memoryview(frame), sp.lo, self.chunk_bytes, job.name)
                    check_tensor(lay, tname, crc, job.name)
                    unzstd_into(frame, out, job.name)
        except BaseException as e:  # noqa: BLE001 - any failure fails the entry; waiters raise SnapshotError
            kv.fail(e)
        with job.lock:
            job.per_layer[layer] -= 1
            job.left -= 1
            layer_done, all_done = job.per_layer[layer] == 0, job.left == 0
        if all_done:
            os.close(job.fd)
            kv.read_seconds = time.perf_counter() - job.t0
        if layer_done and not kv.failed:
            kv.set_ready(layer)
        if all_done:
            try:
                if job.on_done is not None:
                    job.on_done(kv)
            finally:
                kv.complete.set()

    def _finish(self, job: _Job) -> None:
        """A snapshot without layers: nothing to read."""
        os.close(job.fd)
        job.kv.read_seconds = 0.0
        try:
            if job.on_done is not None:
                job.on_done(job.kv)
        finally:
            job.kv.complete.set()
