"""Byte-plane shuffling and zstd decoding of KV tensors (the "zstd" compression of snapshot.py).

A tensor is stored as one zstd frame of its byte planes: all first bytes of every element, then all second bytes,
... which compresses floats far better than the raw bytes. `unzstd_into` decodes a frame straight into a
destination tensor (any dtype, e.g. a slice of a pinned host buffer), one decompressor and scratch buffer per
thread. snapshot.py re-exports these names.
"""

from __future__ import annotations

import threading

import numpy as np
from skillkv.lazy import torch  # snapshot.py re-exports these; `skillkv ls` imports it without torch

from skillkv.errors import SnapshotError


def shuffle_bytes(t: torch.Tensor) -> bytes:
    """Byte planes: all first bytes of every element, then all second bytes, ... (one strided copy per plane)."""
    size = t.element_size()
    b = t.contiguous().view(torch.uint8).numpy().reshape(-1, size)
    out = np.empty((size, b.shape[0]), dtype=np.uint8)
    for j in range(size):
        out[j] = b[:, j]
    return out.tobytes()


_local = threading.local()


def scratch_buffer(attr: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable byte buffer of at least `nbytes` (decompression output, compressed input)."""
    buf = getattr(_local, attr, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        setattr(_local, attr, buf)
    return buf[:nbytes]


def unzstd_into(frame, out: torch.Tensor, name: str = "snapshot") -> None:
    """Decompress one zstd frame of a byte-plane-shuffled tensor into `out` (any dtype, contiguous, e.g. a slice
    of a pinned buffer). The planes are interleaved back with one strided numpy copy per byte plane (~7x faster
    than a transposing copy). Thread-safe (one decompressor per thread); zstd and numpy release the GIL.
    Raises SnapshotError if the frame does not decompress to exactly out's bytes."""
    import zstandard

    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    size = out.element_size()
    nbytes = out.numel() * size
    tmp = scratch_buffer("raw", nbytes + 1)  # one spare byte: a frame that is too long is caught
    got, mv = 0, memoryview(tmp)
    try:
        with dctx.stream_reader(frame, read_across_frames=False) as r:
            while got < len(tmp):
                k = r.readinto(mv[got:])
                if not k:
                    break
                got += k
    except zstandard.ZstdError as e:
        raise SnapshotError(f"{name}: damaged zstd frame ({e})") from None
    if got != nbytes:
        raise SnapshotError(f"{name}: a zstd frame decompressed to {got} bytes, expected {nbytes}")
    if not nbytes:
        return
    planes = tmp[:nbytes].reshape(size, -1)
    dst = out.view(torch.uint8).numpy().reshape(-1, size)
    for j in range(size):
        dst[:, j] = planes[j]
