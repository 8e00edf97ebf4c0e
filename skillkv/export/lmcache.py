"""LMCache 0.5.6 `fs://` connector files for a vLLM + LMCache fleet.

Read in LMCache's code (proven against it in tests/export/test_export_lmcache.py):
- key (`lmcache/utils.py`, CacheEngineKey.to_string): `{model}@{world_size}@{worker_id}@{chunk_hash:x}@{dtype}`,
  dtype "float" | "bfloat16" | "half"; world_size is vLLM's world size (the tensor-parallel size here, pipeline
  parallelism 1) and worker_id the rank;
- file (`v1/storage_backend/connector/fs_connector.py`): `<base>/<key with "/" replaced by "-SEP-">.data`, found by
  its name on lookup (`exists` is a path check, `list` globs `*.data`), so exported files survive restarts;
- content: with `save_chunk_meta` (the default) a 28-byte header of 7 native int32 (`v1/protocol.py`,
  RemoteMetadata for one layer group: byte length, memory format KV_2LTD = 1, dtype code (float16 2, bfloat16 3,
  float32 4), shape [2, layers, tokens, kv_heads * head_dim]) then the tensor in that shape (`v1/metadata.py`
  get_shapes, `v1/memory_management.py` MemoryFormat.KV_2LTD): K then V, each layer's tokens, each token's
  heads of the rank; keys after RoPE at absolute positions;
- only full chunks are stored by default (`save_unfull_chunk` False): a trailing partial chunk is left out.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import torch

from skillkv.errors import SkillkvError
from skillkv.export.chunks import lmcache_chunk_hashes, tp_heads
from skillkv.export.files import digest, write_atomic

CHUNK = 256
DTYPE_NAMES = {torch.float32: "float", torch.bfloat16: "bfloat16", torch.float16: "half"}
DTYPE_CODES = {torch.float32: 4, torch.bfloat16: 3, torch.float16: 2}
KV_2LTD = 1
HEADER = struct.Struct("<7i")  # the x86-64/aarch64 (little-endian) layout of LMCache's native "iiiiiii"
_NAME = re.compile(r"[A-Za-z0-9._+:/-]+")


def check_model_name(name: str) -> str:
    """The served model name as LMCache keys it (vLLM's --model / served name); one-line error otherwise."""
    if not name or not _NAME.fullmatch(name) or name.strip("/.") == "":
        raise SkillkvError(f"unknown model-name format {name!r}: use the name the fleet serves, made of letters, "
                           "digits and . _ + : / - (LMCache splits keys at '@')")
    return name


def key_string(model: str, world: int, rank: int, chunk_hash: int, dtype: torch.dtype) -> str:
    return f"{model}@{world}@{rank}@{chunk_hash:x}@{DTYPE_NAMES[dtype]}"


def file_name(key: str) -> str:
    return key.replace("/", "-SEP-") + ".data"


def chunk_bytes(kv, start: int, end: int, heads: slice) -> bytes:
    """Header + [2, layers, end - start, heads * head_dim] of positions [start, end) for one rank's heads."""
    n = end - start
    t = torch.stack([torch.stack([x[start:end, heads].reshape(n, -1) for x in (k for k, _ in kv)]),
                     torch.stack([x[start:end, heads].reshape(n, -1) for x in (v for _, v in kv)])]).contiguous()
    payload = t.view(torch.uint8).numpy().tobytes()
    return HEADER.pack(len(payload), KV_2LTD, DTYPE_CODES[t.dtype], *t.shape) + payload


def export(ids: list[int], kv, folder: Path, model_name: str, tp: int, algorithm: str, seed: str | None,
           chunk: int = CHUNK) -> list[dict]:
    """Write every full chunk of `ids` (whose KV is `kv`, positions 0..len(ids)) for every rank of `tp` into
    `folder`. Returns one record per file: rank, chunk, start, end, name, sha256 (of the file), payload_sha256 (of the
    tensor after the header), status (written | kept)."""
    dtype = kv[0][0].dtype
    if dtype not in DTYPE_NAMES:
        raise SkillkvError(f"LMCache has no KV dtype for {dtype}")
    heads = tp_heads(kv[0][0].shape[1], tp)
    hashes = lmcache_chunk_hashes(ids, chunk, algorithm, seed)
    out = []
    for rank, sl in enumerate(heads):
        for i, h in enumerate(hashes):
            start, end = i * chunk, (i + 1) * chunk
            name = file_name(key_string(model_name, tp, rank, h, dtype))
            data = chunk_bytes(kv, start, end, sl)
            out.append({"rank": rank, "chunk": i, "start": start, "end": end, "name": name,
                        "sha256": digest(data), "payload_sha256": digest(data[HEADER.size:]),
                        "status": write_atomic(folder, name, data)})
    return out
