"""The target engines' own reader code, where it is importable: the keys they compute for a prompt's token ids and
the bytes their storage backends return for those keys. `skillkv export --check` and the tests use these; when the
target's package is missing, `None` is returned with the reason, and the caller falls back to skillkv's own
reimplementation (and says so).

LMCache: `lmcache.v1.token_database.ChunkedTokenDatabase` (keys) and
`lmcache.v1.storage_backend.connector.fs_connector.FSConnector` over a CPU `LocalCPUBackend` (reads). Without
vLLM in the process LMCache falls back to Python's `hash` with chain start 0; for sha256_cbor the database is then
given vLLM's function as skillkv computes it (skillkv.export.chunks.sha256_cbor) and the fleet seed's chain start,
exactly what LMCache's constructor does with vLLM present; the report names which.

SGLang: `sglang/srt/mem_cache/cpp_utils/native_hash.py` (its C++ page hash, compiled on first use by torch's
extension loader: needs g++, ninja and OpenSSL headers) and `sglang/srt/mem_cache/hicache_storage.py` (HiCacheFile).
They are imported from the installed package without running `sglang/__init__.py`, which pulls the GPU serving
stack: the parent packages are registered as plain namespaces over the installed folders, so only those modules
(and what they import) run. HiCacheFile's evictor imports one size parser from `srt/utils/common.py`, a module that
imports triton and the web stack; where that import fails, the parser alone is compiled from that file
(`sglang_function`), so the code that runs is still SGLang's.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

from skillkv.export.chunks import lmcache_none_hash, sha256_cbor

_SGLANG_PACKAGES = ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.mem_cache",
                    "sglang.srt.mem_cache.cpp_utils", "sglang.srt.mem_cache.storage",
                    "sglang.srt.mem_cache.storage.file")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


class LMCacheReader:
    """LMCache's token database and fs connector for one manifest's model, rank and chunk settings."""

    def __init__(self, folder: Path, m: dict, rank: int):
        os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # read when its loggers are made (first import)
        from lmcache.v1 import token_database
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.connector.fs_connector import FSConnector
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        dtype = getattr(torch, m["dtype"])
        algo, seed = m["hash"], m.get("hash_seed")
        old_seed = os.environ.get("PYTHONHASHSEED")
        if seed is not None:  # vLLM's init_none_hash reads it, when vLLM is there
            os.environ["PYTHONHASHSEED"] = seed
        try:
            room = 2 * m["chunk_bytes"] / 2**30 + 0.01  # GiB of LMCache's CPU buffer: two chunks of this rank
            cfg = LMCacheEngineConfig.from_defaults(chunk_size=m["chunk_size"], remote_url=f"fs://{folder}",
                                                    max_local_cpu_size=room, local_cpu=False,
                                                    pre_caching_hash_algorithm=algo)
            meta = LMCacheMetadata(model_name=m["model_name"], world_size=m["tp"], local_world_size=m["tp"],
                                   worker_id=rank, local_worker_id=rank, kv_dtype=dtype,
                                   kv_shape=(m["layers"], 2, m["chunk_size"], m["kv_heads"] // m["tp"],
                                             m["head_dim"]), chunk_size=m["chunk_size"])
            self.db = token_database.ChunkedTokenDatabase(cfg, meta)
        finally:
            if old_seed is None:
                os.environ.pop("PYTHONHASHSEED", None)
            else:
                os.environ["PYTHONHASHSEED"] = old_seed
        self.hash_source = "vLLM's, inside LMCache"
        if algo == "sha256_cbor" and self.db.hash_func is hash:  # vLLM not importable: LMCache fell back
            self.db.hash_func = sha256_cbor
            token_database.NONE_HASH = lmcache_none_hash(algo, seed)
            self.hash_source = "skillkv's sha256_cbor inside LMCache's chain (vLLM not importable)"
        elif algo == "builtin":
            self.hash_source = "LMCache's (Python hash, chain start 0)"
        self.loop = asyncio.new_event_loop()
        self.conn = FSConnector(self.loop, LocalCPUBackend(cfg, meta, dst_device="cpu"), cfg,
                                base_paths_str=str(folder))
        self.name = f"lmcache {_version('lmcache')}"

    def keys(self, ids: list[int]) -> list:
        """(start, end, CacheEngineKey) of every full chunk, as LMCache computes them."""
        return list(self.db.process_tokens(ids))

    def file_name(self, key) -> str:
        return self.conn._get_file_path(key).name

    def read(self, key) -> torch.Tensor | None:
        """The chunk's tensor [2, layers, tokens, heads * head_dim] through FSConnector.get, or None (a miss)."""
        if not self.conn.exists_sync(key):
            return None
        obj = self.loop.run_until_complete(self.conn.get(key))
        if obj is None:
            return None
        t = obj.tensor.clone()
        obj.ref_count_down()  # back to LMCache's allocator, as its storage manager does after a get
        return t

    def close(self) -> None:
        self.loop.close()


def sglang_function(relpath: str, name: str, cls: str | None = None, namespace: dict | None = None):
    """Function `name` (a method of class `cls` if given) from the installed sglang's file `relpath`, compiled on
    its own from SGLang's source (for code whose module imports the GPU stack), in `namespace` (its globals)."""
    import ast

    root = Path(sys.modules["sglang"].__path__[0]) if "sglang" in sys.modules else \
        Path(importlib.util.find_spec("sglang").submodule_search_locations[0])
    src = root / relpath
    body = ast.parse(src.read_text()).body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = dict(namespace or {})
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(src), "exec"), ns)  # noqa: S102 - SGLang's own code
    return ns[name]


@functools.lru_cache(maxsize=1)
def sglang_modules():
    """(native_hash, hicache_storage) modules of the installed sglang (module docstring), or raise ImportError."""
    if "sglang" not in sys.modules:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("sglang is not installed")
        root = Path(spec.submodule_search_locations[0])
        for name in _SGLANG_PACKAGES:
            mod = types.ModuleType(name)
            mod.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules.setdefault(name, mod)
    try:
        importlib.import_module("sglang.srt.utils.common")
    except ImportError:  # it imports triton, PIL, starlette...: the file evictor needs only its size parser
        import argparse
        import re
        from decimal import Decimal

        common = types.ModuleType("sglang.srt.utils.common")
        common.human_readable_int = sglang_function(
            "srt/utils/common.py", "human_readable_int",
            namespace={"re": re, "argparse": argparse, "Decimal": Decimal})
        sys.modules["sglang.srt.utils.common"] = common
    native = importlib.import_module("sglang.srt.mem_cache.cpp_utils.native_hash")
    storage = importlib.import_module("sglang.srt.mem_cache.hicache_storage")
    return native, storage


class SGLangReader:
    """SGLang's page hash and HiCacheFile backend for one manifest's model and rank."""

    def __init__(self, folder: Path, m: dict, rank: int):
        import logging

        logging.getLogger("sglang").setLevel(logging.ERROR)
        self.native, storage = sglang_modules()
        cfg = storage.HiCacheStorageConfig(
            tp_rank=rank, tp_size=m["tp"], pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=m["layout"] == "page_first",
            model_name=m["model_name"])
        self.backend = storage.HiCacheFile(cfg, file_path=str(folder))
        self.page = m["chunk_size"]
        self.name = f"sglang {_version('sglang')}"
        self.hash_source = "SGLang's native page hash"

    def keys(self, ids: list[int]) -> list[tuple[int, int, str]]:
        full = ids[: len(ids) - len(ids) % self.page]
        hashes = self.native.get_native_hash(full, None, self.page) if full else []
        return [(i * self.page, (i + 1) * self.page, h) for i, h in enumerate(hashes)]

    def file_name(self, key: str) -> str:
        return f"{self.backend._get_suffixed_key(key)}.bin"

    def read(self, key: str, nbytes: int) -> bytes | None:
        if not self.backend.exists(key):
            return None
        buf = torch.empty(nbytes, dtype=torch.uint8)
        got = self.backend.get(key, buf)
        return None if got is None else got.numpy().tobytes()

    def close(self) -> None:
        pass
