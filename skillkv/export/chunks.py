"""Chunk and page hashing exactly as the target engines compute it, and the tensor-parallel head split.

Reimplemented from reading the targets' code (never copied); tests/test_export_*.py prove every function here
against the installed `lmcache` 0.5.6 and `sglang` 0.5.23 code.

LMCache 0.5.6 (`lmcache/v1/token_database.py`, ChunkedTokenDatabase): tokens are cut into `chunk_size` (256)
chunks; chunk i's hash is `h_i = f((h_{i-1}, tuple(chunk_i_tokens), ()))` with `h_{-1} = NONE_HASH`, and a digest
returned as bytes is folded to an int by its first 8 bytes, big-endian (`_normalize_hash_to_int`). `f` is vLLM's
hash for `pre_caching_hash_algorithm`:
  sha256_cbor  vLLM's `sha256(cbor2.dumps(x, canonical=True))`; NONE_HASH = f(PYTHONHASHSEED) when LMCache runs
               inside vLLM (`kv_cache_utils.init_none_hash`), so every node of the fleet and the export must use
               the same PYTHONHASHSEED string (`seed`).
  builtin      Python's `hash`: for tuples of ints it is the same in every 64-bit CPython >= 3.8 process, but
               only with NONE_HASH = 0, i.e. LMCache without vLLM in the process (vLLM seeds it from the str hash
               of PYTHONHASHSEED, or from os.urandom). Offered for that case and for the end-to-end test.

SGLang 0.5.23 HiCache (`sglang/srt/mem_cache/cpp_utils/hash_binding.cpp`, via `mem_cache/utils.get_hash_str`):
page i's key is the hex SHA-256 of (previous page's 32-byte digest, absent for the first page) followed by the
page's token ids as little-endian uint32; only the pages of a request without `extra_key` / `cache_salt` are
covered (those seed the chain with a namespace digest).
"""

from __future__ import annotations

import hashlib
import struct

from skillkv.errors import SkillkvError

LMCACHE_HASHES = ("sha256_cbor", "builtin")


# ------------------------------------------------------------------------------------------ canonical CBOR


def _cbor_head(major: int, n: int) -> bytes:
    """RFC 8949 initial byte + argument, shortest form (what canonical encoders emit)."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt, limit in ((24, ">B", 1 << 8), (25, ">H", 1 << 16), (26, ">I", 1 << 32), (27, ">Q", 1 << 64)):
        if n < limit:
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise SkillkvError(f"integer {n} does not fit CBOR's 64-bit argument")


def cbor(obj) -> bytes:
    """Canonical CBOR of the few types vLLM's sha256_cbor sees here: non-negative and negative ints below 2**64,
    str, and tuples/lists of those (arrays)."""
    if isinstance(obj, bool) or obj is None:
        raise SkillkvError(f"cannot CBOR-encode {obj!r} for a chunk hash")
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        return _cbor_head(3, len(raw)) + raw
    if isinstance(obj, (tuple, list)):
        return _cbor_head(4, len(obj)) + b"".join(cbor(x) for x in obj)
    raise SkillkvError(f"cannot CBOR-encode a {type(obj).__name__} for a chunk hash")


def sha256_cbor(obj) -> bytes:
    """vLLM's sha256_cbor: SHA-256 of the canonical CBOR encoding."""
    return hashlib.sha256(cbor(obj)).digest()


def fold64(digest: bytes | int) -> int:
    """LMCache's `_normalize_hash_to_int`: a digest's first 8 bytes as a big-endian int; ints pass through."""
    return int.from_bytes(digest[:8], "big") if isinstance(digest, bytes) else digest


# ------------------------------------------------------------------------------------------ LMCache


def lmcache_none_hash(algorithm: str, seed: str | None) -> int:
    """The chain's start value (LMCache's NONE_HASH) for `algorithm` and the fleet's PYTHONHASHSEED `seed`."""
    if algorithm == "sha256_cbor":
        if seed is None:
            raise SkillkvError("sha256_cbor chains start from the fleet's PYTHONHASHSEED: give --hash-seed "
                               "(the same string every vLLM node exports)")
        return fold64(sha256_cbor(seed))
    if algorithm == "builtin":
        if seed is not None:
            raise SkillkvError("--hash builtin is LMCache without vLLM (chain start 0); a vLLM fleet seeds it "
                               "per process: use --hash sha256_cbor with --hash-seed")
        return 0
    raise SkillkvError(f"unknown hash {algorithm!r} (choose from {', '.join(LMCACHE_HASHES)})")


def lmcache_chunk_hashes(ids: list[int], chunk: int, algorithm: str, seed: str | None) -> list[int]:
    """The prefix hash of every FULL chunk of `ids` (a trailing partial chunk has none here: it is not exported)."""
    prefix = lmcache_none_hash(algorithm, seed)
    out = []
    for start in range(0, len(ids) - len(ids) % chunk, chunk):
        key = (prefix, tuple(int(t) for t in ids[start:start + chunk]), ())
        prefix = fold64(sha256_cbor(key)) if algorithm == "sha256_cbor" else hash(key)
        out.append(prefix)
    return out


# ------------------------------------------------------------------------------------------ SGLang


def sglang_page_hashes(ids: list[int], page: int) -> list[str]:
    """Hex SHA-256 keys of every FULL page of `ids`, chained (token ids as little-endian uint32)."""
    out, prior = [], b""
    for start in range(0, len(ids) - len(ids) % page, page):
        words = ids[start:start + page]
        if any(not 0 <= t < 1 << 32 for t in words):
            raise SkillkvError("a token id does not fit SGLang's uint32 page hash")
        prior = hashlib.sha256(prior + struct.pack(f"<{len(words)}I", *words)).digest()
        out.append(prior.hex())
    return out


# ------------------------------------------------------------------------------------------ tensor parallel


def tp_heads(kv_heads: int, tp: int) -> list[slice]:
    """The kv heads each tensor-parallel rank holds: contiguous equal blocks in rank order (vLLM's and SGLang's
    QKV split when tp divides the kv heads). Replicated heads (tp > kv heads) are refused."""
    if tp < 1:
        raise SkillkvError(f"--tp must be at least 1, not {tp}")
    if kv_heads % tp:
        raise SkillkvError(f"--tp {tp} does not divide the model's {kv_heads} kv heads (replicated kv heads are "
                           "not supported by skillkv export)")
    per = kv_heads // tp
    return [slice(r * per, (r + 1) * per) for r in range(tp)]
