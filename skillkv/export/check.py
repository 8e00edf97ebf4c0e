"""`skillkv export --check DIR`: read every exported chunk back for its prompt and report the hits.

For every manifest in DIR and every tensor-parallel rank: the keys are computed from the manifest's token ids by
the target's own code where it is importable (skillkv.export.readers), else by skillkv's reimplementation (said in
`reader`); each key's file must be the one the export wrote (same name) and read back through the target's
storage backend with the exported bytes (SHA-256 of the payload as written). Hits count like the engines match
prefixes: chunk by chunk from the start, stopping at the first miss.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from skillkv.export import readers
from skillkv.export.chunks import lmcache_chunk_hashes, sglang_page_hashes
from skillkv.export.lmcache import HEADER, file_name as lm_file_name, key_string
from skillkv.export.sglang import file_name as sg_file_name


class _OwnReader:
    """skillkv's reimplementation: keys from skillkv.export.chunks, bytes straight from the files."""

    def __init__(self, folder: Path, m: dict, rank: int, why: str):
        self.folder, self.m, self.rank = folder, m, rank
        self.name = f"skillkv ({why})"
        self.hash_source = "skillkv's"

    def keys(self, ids):
        m = self.m
        if m["target"] == "lmcache":
            hs = lmcache_chunk_hashes(ids, m["chunk_size"], m["hash"], m.get("hash_seed"))
            names = [lm_file_name(key_string(m["model_name"], m["tp"], self.rank, h, getattr(torch, m["dtype"])))
                     for h in hs]
        else:
            names = [sg_file_name(h, m["model_name"], self.rank, m["tp"])
                     for h in sglang_page_hashes(ids, m["chunk_size"])]
        c = m["chunk_size"]
        return [(i * c, (i + 1) * c, n) for i, n in enumerate(names)]

    def file_name(self, key):
        return key

    def read(self, key, nbytes=None):
        p = self.folder / key
        if not p.is_file():
            return None
        data = p.read_bytes()
        return data[HEADER.size:] if self.m["target"] == "lmcache" else data


def _reader(folder: Path, m: dict, rank: int):
    try:
        if m["target"] == "lmcache":
            return readers.LMCacheReader(folder, m, rank)
        return readers.SGLangReader(folder, m, rank)
    except Exception as e:  # noqa: BLE001 - any import or build failure: fall back, and say why
        pkg = "lmcache" if m["target"] == "lmcache" else "sglang"
        return _OwnReader(folder, m, rank, f"{pkg} not usable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                          if str(e) else f"{pkg} not usable: {type(e).__name__}")


def _payload(reader, key, nbytes: int) -> bytes | None:
    if isinstance(reader, readers.LMCacheReader):
        t = reader.read(key)
        return None if t is None else t.contiguous().view(torch.uint8).numpy().tobytes()
    return reader.read(key, nbytes)


def check_manifest(folder: Path, m: dict) -> dict:
    """The hit report of one manifest (module docstring)."""
    ids = m["token_ids"]
    ranks = []
    for rank in range(m["tp"]):
        files = {f["chunk"]: f for f in m["files"] if f["rank"] == rank}
        reader = _reader(folder, m, rank)
        hits, problems = 0, []
        try:
            for i, (start, end, key) in enumerate(reader.keys(ids)):
                f = files.get(i)
                if f is None:
                    break
                if reader.file_name(key) != f["name"]:
                    problems.append(f"chunk {i}: the reader's file is {reader.file_name(key)}, exported {f['name']}")
                    break
                got = _payload(reader, key, m["chunk_bytes"])
                if got is None:
                    problems.append(f"chunk {i}: {f['name']} is missing")
                    break
                if hashlib.sha256(got).hexdigest() != f["payload_sha256"]:
                    problems.append(f"chunk {i}: {f['name']} holds other bytes than were exported")
                    break
                hits += 1
        finally:
            getattr(reader, "close", lambda: None)()
        ranks.append({"rank": rank, "reader": reader.name, "keys": reader.hash_source, "hits": hits,
                      "chunks": len(files), "tokens": hits * m["chunk_size"], "problems": problems})
    return {"manifest": Path(m["_path"]).name, "target": m["target"], "model_name": m["model_name"],
            "skills": m["skills"], "prompt_tokens": m["prefix_tokens"], "exported_tokens": m["exported_tokens"],
            "ok": all(r["hits"] == r["chunks"] and not r["problems"] for r in ranks), "ranks": ranks}
