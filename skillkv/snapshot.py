"""Snapshot: the KV cache of one prompt segment, as a self-describing safetensors file.

Tensors
  k.<layer>, v.<layer>   [tokens, kv_heads, head_dim] (NHD, the paged pool's layout) in the model's KV dtype (compression "none"), or
                         uint8 zstd frames of the byte-plane-shuffled tensor (compression "zstd"): all first
                         bytes of every element, then all second bytes, ... which compresses floats far better.
                         One frame per tensor, so layers decompress in parallel threads.
  token_ids              int32 [tokens]: the ids this KV was computed for
Metadata (all strings)
  format, skillkv_version, fingerprint, key, parent, skill, content_hash, start, tokens, dtype, shape,
  compression, created, checksums (crc32 of every stored tensor's bytes, JSON)

Reads map the file (mmap) and return the KV as read-only views of it, verified by checksum: no copy. The store
only ever replaces a snapshot by rename (a new inode), so a mapping in use is never truncated under a reader.
Writes go to a temporary file in the destination folder, are fsynced and renamed, so a failed or partial write
is never visible. `read_snapshot` checks the header, every checksum, and whatever the caller expects
(fingerprint, key, token ids); any mismatch raises SnapshotError and the caller recompiles.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import tempfile
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from skillkv import __version__
from skillkv.errors import SnapshotError

FORMAT_VERSION = 2  # 2: KV stored NHD [tokens, kv_heads, head_dim]
COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 3
_THREADS = max(1, min(8, os.cpu_count() or 1))

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
              "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8}
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)}


@dataclass
class Snapshot:
    """KV of `token_ids` at positions [start, start + len(token_ids)). keys/values: one tensor per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: list[int]
    fingerprint: str
    key: str
    skill: str
    content_hash: str
    start: int = 0
    parent: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy()) if t.numel() else 0


def _shuffle(t: torch.Tensor) -> bytes:
    b = t.contiguous().view(torch.uint8).reshape(-1, t.element_size())
    return b.t().contiguous().numpy().tobytes()


def _unshuffle(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    b = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(size, -1)
    return b.t().contiguous().view(dtype).reshape(shape)


def encode(snap: Snapshot, compression: str = "none") -> bytes:
    """Serialize a snapshot to bytes (safetensors). KV tensors are moved to the CPU."""
    if compression not in COMPRESSIONS:
        raise SnapshotError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    kv = {}
    for i, (k, v) in enumerate(zip(snap.keys, snap.values)):
        kv[f"k.{i}"], kv[f"v.{i}"] = k.detach().to("cpu").contiguous(), v.detach().to("cpu").contiguous()
    first = kv["k.0"]
    tensors: dict[str, torch.Tensor] = {"token_ids": torch.tensor(snap.token_ids, dtype=torch.int32)}
    if compression == "zstd":
        import zstandard

        def comp(item):
            name, t = item
            return name, zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_shuffle(t))

        with ThreadPoolExecutor(_THREADS) as pool:
            for name, blob in pool.map(comp, kv.items()):
                tensors[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    else:
        tensors.update(kv)
    meta = {
        "format": str(FORMAT_VERSION), "skillkv_version": __version__, "fingerprint": snap.fingerprint,
        "key": snap.key, "parent": snap.parent, "skill": snap.skill, "content_hash": snap.content_hash,
        "start": str(snap.start), "tokens": str(snap.n_tokens), "layers": str(len(snap.keys)),
        "dtype": str(first.dtype), "shape": json.dumps(list(first.shape)), "compression": compression,
        "created": str(time.time()),
        "checksums": json.dumps({n: _crc(t) for n, t in sorted(tensors.items())}),
    }
    meta["meta_crc"] = str(_meta_crc(meta))
    return st_save(tensors, metadata=meta)


def _meta_crc(meta: dict) -> int:
    """crc32 of every metadata field but itself: a header edit is caught like a data edit."""
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_crc"}, sort_keys=True)
    return zlib.crc32(body.encode())


def write_snapshot(path: Path, snap: Snapshot, compression: str = "none") -> int:
    """Atomically write `snap` to `path`; return the bytes written."""
    data = encode(snap, compression)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return len(data)



def read_header(path: Path) -> dict:
    """The metadata of a snapshot file without reading its tensors. Raises SnapshotError if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SnapshotError(f"{path.name}: truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise SnapshotError(f"{path.name}: corrupted header length")
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path.name}: unreadable header ({e.__class__.__name__})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") is None:
        raise SnapshotError(f"{path.name}: not a skillkv snapshot")
    return meta


def _views(data, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of safetensors bytes, the tensors as zero-copy views of `data` (bytes or mmap).
    Every tensor must lie inside the data section and have exactly the bytes its dtype and shape need."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8:8 + n]))
    base, end = 8 + n, len(data)
    tensors = {}
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        dtype, shape = _ST_DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
        lo, hi = (int(x) for x in info["data_offsets"])
        count = 1
        for d in shape:
            count *= d
        size = torch.empty((), dtype=dtype).element_size()
        if not 0 <= lo <= hi or base + hi > end or hi - lo != count * size:
            raise ValueError(f"tensor {tname} lies outside the file")
        if count:
            tensors[tname] = torch.frombuffer(data, dtype=dtype, count=count, offset=base + lo).view(shape)
        else:
            tensors[tname] = torch.empty(shape, dtype=dtype)
    return header["__metadata__"], tensors


def decode(data, name: str = "snapshot") -> Snapshot:
    """Parse and verify snapshot bytes (header, checksums, shapes). Raises SnapshotError. Uncompressed KV comes
    back as read-only views of `data` (no copy)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer on a read-only buffer: we never write
            meta, tensors = _views(data, name)
    except Exception as e:  # noqa: BLE001 - any parse failure means a truncated or corrupted file
        why = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise SnapshotError(f"{name}: truncated or corrupted ({why})") from None
    try:
        if int(meta["format"]) != FORMAT_VERSION:
            raise SnapshotError(f"{name}: snapshot format {meta['format']} (this skillkv reads {FORMAT_VERSION})")
        if meta.get("meta_crc") != str(_meta_crc(meta)):
            raise SnapshotError(f"{name}: header checksum mismatch (corrupted on disk)")
        checks = json.loads(meta["checksums"])
        layers, dtype = int(meta["layers"]), _DTYPES[meta["dtype"]]
        shape, compression = json.loads(meta["shape"]), meta["compression"]
        tokens, start = int(meta["tokens"]), int(meta["start"])
    except (KeyError, ValueError, TypeError) as e:
        raise SnapshotError(f"{name}: bad metadata ({e})") from None
    with ThreadPoolExecutor(_THREADS) as pool:  # zlib releases the GIL on large buffers
        crcs = dict(zip(checks, pool.map(lambda k: _crc(tensors[k]) if k in tensors else -1, checks)))
    if set(checks) != set(tensors) or any(crcs[k] != c for k, c in checks.items()):
        raise SnapshotError(f"{name}: checksum mismatch (corrupted on disk)")
    names = [f"{kv}.{i}" for i in range(layers) for kv in "kv"]
    if set(tensors) != set(names) | {"token_ids"}:
        raise SnapshotError(f"{name}: stored tensors do not match the header's {layers} layers")
    if compression == "zstd":
        import zstandard

        def dec(n):
            raw = zstandard.ZstdDecompressor().decompress(tensors[n].numpy().tobytes())
            return n, _unshuffle(raw, dtype, shape)

        with ThreadPoolExecutor(_THREADS) as pool:
            kv = dict(pool.map(dec, names))
    else:
        kv = {n: tensors[n] for n in names}
    ids = tensors["token_ids"].tolist()
    if len(ids) != tokens or any(list(kv[n].shape) != shape or kv[n].dtype != dtype for n in names):
        raise SnapshotError(f"{name}: tensor shapes do not match the header")
    return Snapshot(keys=[kv[f"k.{i}"] for i in range(layers)], values=[kv[f"v.{i}"] for i in range(layers)],
                    token_ids=ids, fingerprint=meta["fingerprint"], key=meta["key"], skill=meta["skill"],
                    content_hash=meta["content_hash"], start=start, parent=meta.get("parent", ""), meta=meta)


def read_snapshot(path: Path, fingerprint: str | None = None, key: str | None = None,
                  token_ids: list[int] | None = None) -> Snapshot:
    """Read and verify a snapshot; also check it against what the caller would compute now."""
    try:
        with open(path, "rb") as f:  # mapped, not copied: the KV tensors are views of the page cache
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path.name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    snap = decode(data, path.name)
    if fingerprint is not None and snap.fingerprint != fingerprint:
        raise SnapshotError(f"{path.name}: made by another model (fingerprint {snap.fingerprint[:12]})")
    if key is not None and snap.key != key:
        raise SnapshotError(f"{path.name}: holds snapshot {snap.key[:12]}, expected {key[:12]}")
    if token_ids is not None and snap.token_ids != list(token_ids):
        raise SnapshotError(f"{path.name}: token ids differ from the current tokenization (stale)")
    return snap
