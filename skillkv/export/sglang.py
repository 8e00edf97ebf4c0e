"""SGLang 0.5.23 HiCache `file` storage backend pages for an SGLang fleet.

Read in SGLang's code (proven against it in tests/export/test_export_sglang.py):
- page key (`mem_cache/utils.get_hash_str` -> `cpp_utils/hash_binding.cpp`): chained SHA-256 over the page's
  token ids (skillkv.export.chunks.sglang_page_hashes), with the server's `--page-size` tokens per page; only full
  pages are looked up;
- file (`mem_cache/hicache_storage.py`, HiCacheFile with the default key scheme and no pipeline or context
  parallelism): `<dir>/<page key>_<model name with "/" -> "-">_<tp rank>_<tp size>.bin`, raw bytes, no header;
  the directory is `--hicache-storage-backend-extra-config '{"file_storage_path": DIR}'` or
  SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR (default /tmp/hicache);
- content (`mem_cache/pool_host/mha.py`, MHATokenToKVPoolHost.get_data_page / set_from_flat_data_page): one page
  of the host pool flattened in the server's `--hicache-mem-layout`:
    layer_first  [2 (K, V), layers, page tokens, rank's kv heads, head_dim]
    page_first   [2 (K, V), page tokens, layers, rank's kv heads, head_dim]   (SGLang's default layout)
  in the KV cache dtype; keys after RoPE at absolute positions. Other layouts (page_first_direct, page_head,
  ...) are not exported.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from skillkv.errors import SkillkvError
from skillkv.export.chunks import sglang_page_hashes, tp_heads
from skillkv.export.files import digest, write_atomic

LAYOUTS = ("page_first", "layer_first")
_NAME = re.compile(r"[A-Za-z0-9._+:/-]+")


def check_model_name(name: str) -> str:
    """The served model name (SGLang's --served-model-name, default its --model-path)."""
    if not name or not _NAME.fullmatch(name):
        raise SkillkvError(f"unknown model-name format {name!r}: use the name the fleet serves, made of letters, "
                           "digits and . _ + : / -")
    return name


def file_name(page_hash: str, model: str, rank: int, tp: int) -> str:
    return f"{page_hash}_{'-'.join(model.split('/'))}_{rank}_{tp}.bin"


def page_bytes(kv, start: int, end: int, heads: slice, layout: str) -> bytes:
    """Positions [start, end) of one rank's heads in the host pool's page layout (module docstring)."""
    k = torch.stack([x[start:end, heads] for x, _ in kv])  # [layers, tokens, heads, head_dim]
    v = torch.stack([x[start:end, heads] for _, x in kv])
    if layout == "page_first":
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [tokens, layers, heads, head_dim]
    elif layout != "layer_first":
        raise SkillkvError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    return torch.stack([k, v]).contiguous().view(torch.uint8).numpy().tobytes()


def export(ids: list[int], kv, folder: Path, model_name: str, tp: int, page: int, layout: str) -> list[dict]:
    """Write every full page of `ids` (KV `kv`, positions 0..len(ids)) for every rank of `tp` into `folder`.
    Returns one record per file: rank, chunk (page index), start, end, name, sha256 and
    payload_sha256 (the file is the payload), status."""
    if layout not in LAYOUTS:
        raise SkillkvError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    heads = tp_heads(kv[0][0].shape[1], tp)
    hashes = sglang_page_hashes(ids, page)
    out = []
    for rank, sl in enumerate(heads):
        for i, h in enumerate(hashes):
            start, end = i * page, (i + 1) * page
            name = file_name(h, model_name, rank, tp)
            data = page_bytes(kv, start, end, sl, layout)
            out.append({"rank": rank, "chunk": i, "start": start, "end": end, "name": name,
                        "sha256": digest(data), "payload_sha256": digest(data),
                        "status": write_atomic(folder, name, data)})
    return out
