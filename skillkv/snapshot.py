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
(fingerprint, key, token ids); any mismatch raises SnapshotError and the caller recompiles. A file is exactly
its declared length (bytes after the last tensor are corruption), and every metadata field has its type: a
hand-edited or damaged header gives SnapshotError, never another exception.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from skillkv import __version__
from skillkv.atomic import write_atomic
from skillkv.crc import crc32
from skillkv.errors import SnapshotError
from skillkv.kvcodec import scratch_buffer, shuffle_bytes, unzstd_into  # noqa: F401 - re-exported (tiers, measure, tests)
from skillkv.lazy import torch  # headers are read without torch (`skillkv ls`, an up-to-date compile)

FORMAT_VERSION = 2  # 2: KV stored NHD [tokens, kv_heads, head_dim]
META_STRINGS = ("format", "fingerprint", "key", "parent", "skill", "content_hash", "start", "tokens", "layers",
                "dtype", "shape", "compression", "checksums", "meta_crc")
COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 1  # on bf16 KV (random and real) level 1 compressed as well as 3 (0.68 vs 0.70) and decoded
                # 14-35% faster on this CPU (`python -m skillkv.measure.bench_tiers`); decoders read any level
_THREADS = max(1, min(8, os.cpu_count() or 1))
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "I32": "int32",
              "I64": "int64", "U8": "uint8"}  # safetensors dtype -> torch dtype name
_KV_DTYPES = {f"torch.{n}": n for n in ("float32", "float16", "bfloat16", "float8_e4m3fn")}  # header's "dtype"


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


def st_save(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save  # imports torch: on the first write only
    return save(tensors, metadata=metadata)


def _crc(t: torch.Tensor) -> int:
    return crc32(t.contiguous().view(torch.uint8).numpy()) if t.numel() else 0


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
            return name, zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(shuffle_bytes(t))

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
    return crc32(body.encode())


def write_snapshot(path: Path, snap: Snapshot, compression: str = "none") -> int:
    """Atomically write `snap` to `path` (skillkv.atomic: a temp file `.tmp-<pid>-<random>.safetensors` in the same
    folder, fsynced, renamed, the folder fsynced); return the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, encode(snap, compression), ".tmp-", ".safetensors", sync_dir=True)


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


@dataclass
class Span:
    """Where one stored tensor lies in a snapshot file: absolute byte offsets [lo, hi), its dtype and shape."""

    dtype: torch.dtype
    shape: list[int]
    lo: int
    hi: int

    @property
    def nbytes(self) -> int:
        return self.hi - self.lo


@dataclass
class Layout:
    """A parsed and checked snapshot header: the metadata, where every stored tensor lies, and its crc32.
    Built by `parse_layout`; shared by the mapped reader (`decode`) and the L2 reader (engine/l2_reader.py), so
    both apply the same rules. Tensor *contents* are checked separately, tensor by tensor (`check_tensor`)."""

    meta: dict
    spans: dict[str, Span]
    checks: dict[str, int]
    layers: int
    dtype: torch.dtype
    shape: list[int]  # of every k/v tensor once decoded: [tokens, kv_heads, head_dim]
    compression: str
    tokens: int
    start: int

    @property
    def kv_names(self) -> list[str]:
        """k.0, v.0, k.1, v.1, ...: the KV tensors in layer order."""
        return [f"{kv}.{i}" for i in range(self.layers) for kv in "kv"]

    @property
    def kv_nbytes(self) -> int:
        """Bytes of one decoded k or v tensor."""
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=self.dtype).element_size()


def header_length(head: bytes, name: str, file_size: int) -> int:
    """The JSON header length from a file's first 8 bytes. Raises SnapshotError if it cannot be right."""
    if len(head) < 8:
        raise SnapshotError(f"{name}: truncated or corrupted (no header)")
    (n,) = struct.unpack("<Q", bytes(head[:8]))
    if n > 100 << 20 or 8 + n > file_size:
        raise SnapshotError(f"{name}: truncated or corrupted (header length {n})")
    return n


def parse_layout(header: bytes, file_size: int, name: str = "snapshot") -> Layout:
    """Parse and check a snapshot's JSON header (the bytes after the 8-byte length). Checks the format version,
    the header checksum, the metadata, that every tensor lies inside the file with exactly the bytes its dtype
    and shape need, that the stored tensors are exactly token_ids and k/v of every layer, each with a checksum,
    and that their dtypes and shapes agree with the metadata. Raises SnapshotError."""
    base = 8 + len(header)
    try:
        raw = json.loads(bytes(header))
        meta = raw["__metadata__"]
        spans = {}
        for tname, info in raw.items():
            if tname == "__metadata__":
                continue
            dtype, shape = getattr(torch, _ST_DTYPES[info["dtype"]]), [int(d) for d in info["shape"]]
            lo, hi = (int(x) for x in info["data_offsets"])
            count = 1
            for d in shape:
                count *= d
            size = torch.empty((), dtype=dtype).element_size()
            if not 0 <= lo <= hi or base + hi > file_size or hi - lo != count * size:
                raise ValueError(f"tensor {tname} lies outside the file")
            spans[tname] = Span(dtype, shape, base + lo, base + hi)
    except Exception as e:  # noqa: BLE001 - any parse failure means a truncated or corrupted file
        why = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise SnapshotError(f"{name}: truncated or corrupted ({why})") from None
    if not isinstance(meta, dict) or meta.get("format") is None:
        raise SnapshotError(f"{name}: not a skillkv snapshot")
    end = max((sp.hi for sp in spans.values()), default=base)
    if end != file_size:
        raise SnapshotError(f"{name}: {file_size - end:,} bytes after its last tensor (appended or corrupted)")
    bad_types = [k for k in META_STRINGS if not isinstance(meta.get(k), str)]
    if bad_types:
        raise SnapshotError(f"{name}: bad metadata ({', '.join(bad_types)} not strings)")
    try:
        if int(meta["format"]) != FORMAT_VERSION:
            raise SnapshotError(f"{name}: snapshot format {meta['format']} (this skillkv reads {FORMAT_VERSION})")
        if meta.get("meta_crc") != str(_meta_crc(meta)):
            raise SnapshotError(f"{name}: header checksum mismatch (corrupted on disk)")
        lay = Layout(meta=meta, spans=spans, checks={k: int(v) for k, v in json.loads(meta["checksums"]).items()},
                     layers=int(meta["layers"]), dtype=getattr(torch, _KV_DTYPES[meta["dtype"]]), shape=json.loads(meta["shape"]),
                     compression=meta["compression"], tokens=int(meta["tokens"]), start=int(meta["start"]))
        if not (isinstance(lay.shape, list) and all(type(d) is int for d in lay.shape)):
            raise ValueError("shape is not a list of integers")
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as e:
        raise SnapshotError(f"{name}: bad metadata ({str(e)[:80]})") from None
    if set(lay.checks) != set(spans):
        raise SnapshotError(f"{name}: checksum mismatch (corrupted on disk)")
    if set(spans) != set(lay.kv_names) | {"token_ids"}:
        raise SnapshotError(f"{name}: stored tensors do not match the header's {lay.layers} layers")
    if lay.compression not in COMPRESSIONS:
        raise SnapshotError(f"{name}: unknown compression {lay.compression!r}")
    ids = spans["token_ids"]
    bad = ids.dtype != torch.int32 or ids.shape != [lay.tokens]
    for n in lay.kv_names:
        sp = spans[n]
        if lay.compression == "none":
            bad |= sp.dtype != lay.dtype or sp.shape != list(lay.shape)
        else:
            bad |= sp.dtype != torch.uint8 or len(sp.shape) != 1
    if bad or len(lay.shape) != 3 or lay.shape[0] != lay.tokens:
        raise SnapshotError(f"{name}: tensor shapes do not match the header")
    return lay


def check_tensor(lay: Layout, tname: str, crc: int, name: str = "snapshot") -> None:
    """Raise SnapshotError unless `crc` (crc32 of the stored bytes of `tname`) is the recorded one."""
    if lay.checks.get(tname) != crc:
        raise SnapshotError(f"{name}: checksum mismatch (corrupted on disk)")


def check_identity(meta: dict, token_ids: list[int], name: str, fingerprint: str | None = None,
                   key: str | None = None, expect_ids: list[int] | None = None) -> None:
    """Raise SnapshotError if the snapshot (its metadata and stored token ids) is foreign (another model's
    fingerprint), holds another key, or its token ids differ from what the caller would compute now (stale)."""
    fp, k = meta["fingerprint"], meta["key"]
    if fingerprint is not None and fp != fingerprint:
        raise SnapshotError(f"{name}: made by another model (fingerprint {fp[:12]})")
    if key is not None and k != key:
        raise SnapshotError(f"{name}: holds snapshot {k[:12]}, expected {key[:12]}")
    if expect_ids is not None and list(token_ids) != list(expect_ids):
        raise SnapshotError(f"{name}: token ids differ from the current tokenization (stale)")


def _view(data, sp: Span) -> torch.Tensor:
    count = sp.nbytes // torch.empty((), dtype=sp.dtype).element_size()
    if not count:
        return torch.empty(sp.shape, dtype=sp.dtype)
    return torch.frombuffer(data, dtype=sp.dtype, count=count, offset=sp.lo).view(sp.shape)


def decode(data, name: str = "snapshot") -> Snapshot:
    """Parse and verify snapshot bytes (header, checksums, shapes). Raises SnapshotError. Uncompressed KV comes
    back as read-only views of `data` (no copy)."""
    n = header_length(data[:8], name, len(data))
    lay = parse_layout(bytes(data[8:8 + n]), len(data), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer on a read-only buffer: we never write
        tensors = {t: _view(data, sp) for t, sp in lay.spans.items()}
    with ThreadPoolExecutor(_THREADS) as pool:  # zlib releases the GIL on large buffers
        crcs = dict(zip(lay.checks, pool.map(lambda k: _crc(tensors[k]), lay.checks)))
    for t, crc in crcs.items():
        check_tensor(lay, t, crc, name)
    names = lay.kv_names
    if lay.compression == "zstd":
        def dec(n):
            out = torch.empty(lay.shape, dtype=lay.dtype)
            unzstd_into(tensors[n].numpy(), out, name)
            return n, out

        with ThreadPoolExecutor(_THREADS) as pool:
            kv = dict(pool.map(dec, names))
    else:
        kv = {n: tensors[n] for n in names}
    meta = lay.meta
    return Snapshot(keys=[kv[f"k.{i}"] for i in range(lay.layers)], values=[kv[f"v.{i}"] for i in range(lay.layers)],
                    token_ids=tensors["token_ids"].tolist(), fingerprint=meta["fingerprint"], key=meta["key"],
                    skill=meta["skill"], content_hash=meta["content_hash"], start=lay.start,
                    parent=meta.get("parent", ""), meta=meta)


def read_snapshot(path: Path, fingerprint: str | None = None, key: str | None = None,
                  token_ids: list[int] | None = None) -> Snapshot:
    """Read and verify a snapshot; also check it against what the caller would compute now."""
    try:
        with open(path, "rb") as f:  # mapped, not copied: the KV tensors are views of the page cache
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path.name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    snap = decode(data, path.name)
    check_identity(snap.meta, snap.token_ids, path.name, fingerprint, key, token_ids)
    return snap
