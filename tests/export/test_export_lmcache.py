"""skillkv.export for LMCache, proven by LMCache 0.5.6's own token database and fs connector (installed by
`make install`, no vLLM): on the Llama-3.1-8B attention shape split over 2 tensor-parallel ranks, every exported
chunk is found under the key LMCache computes for the prompt's token ids and read back byte-identical to a full
prefill's KV at those positions (the rank's heads)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
import torch

from export_support import assert_same_kv, full_prefill, manifest, served_prompt_ids, write_8b_config

lm = pytest.importorskip("lmcache", reason="lmcache 0.5.6 is installed by `make install` (--no-deps)")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
from lmcache.v1 import token_database  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector.fs_connector import FSConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def kv8b(tmp_path_factory):
    from conftest import write_skill
    from skillkv.api import SkillKV

    root = tmp_path_factory.mktemp("lm8b")
    skills = root / "skills"
    write_skill(skills, "alpha-tool", "Use for the alpha tool and its flags.",
                "The alpha tool takes --frobnicate and --level N; level 7 is the default.\n" * 4)
    return SkillKV(model=write_8b_config(root), store=root / "store", skills=skills, device="cpu")


def lmcache_side(folder, tp, rank, layers, chunk=256, algo="builtin"):
    """LMCache's own objects for one vLLM worker: the token database and the fs:// connector."""
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=chunk, remote_url=f"fs://{folder}", local_cpu=False,
                                            max_local_cpu_size=0.05, pre_caching_hash_algorithm=algo)
    meta = LMCacheMetadata(model_name=MODEL, world_size=tp, local_world_size=tp, worker_id=rank,
                           local_worker_id=rank, kv_dtype=torch.float32, kv_shape=(layers, 2, chunk, 8 // tp, 128),
                           chunk_size=chunk)
    db = token_database.ChunkedTokenDatabase(cfg, meta)
    loop = asyncio.new_event_loop()
    return db, FSConnector(loop, LocalCPUBackend(cfg, meta, dst_device="cpu"), cfg, base_paths_str=str(folder)), loop


def read_all(db, conn, loop, ids):
    out = []
    for start, end, key in db.process_tokens(ids):
        assert conn.exists_sync(key), f"LMCache finds no file for chunk [{start}, {end})"
        obj = loop.run_until_complete(conn.get(key))
        assert obj is not None
        out.append((start, end, key, obj.tensor.clone()))
        obj.ref_count_down()
    return out


def test_tp2_chunks_read_back_by_lmcache_equal_full_prefill(kv8b, tmp_path):
    from skillkv.export import export

    r = export(kv8b, ["alpha-tool"], "lmcache", tmp_path, MODEL, tp=2, hash="builtin")
    m = manifest(tmp_path)
    assert r["exported_tokens"] == 512 and r["left_out_tokens"] == r["prefix_tokens"] - 512 > 0
    assert r["kv_source"] == "snapshots"  # byte tokenizer: skillkv's segment ids are the server's
    ids = served_prompt_ids(kv8b, m["system_text"], "Which level is the default?")
    assert ids[:r["prefix_tokens"]] == m["token_ids"]
    ref = full_prefill(kv8b, ids)
    for rank in range(2):
        db, conn, loop = lmcache_side(tmp_path, 2, rank, len(ref))
        got = read_all(db, conn, loop, ids[:r["prefix_tokens"]])
        assert [(s, e) for s, e, _, _ in got] == [(0, 256), (256, 512)]  # the partial chunk is not there
        heads = slice(rank * 4, rank * 4 + 4)
        for start, end, key, t in got:
            assert t.shape == (2, len(ref), 256, 4 * 128) and t.dtype == torch.float32
            want = torch.stack([torch.stack([k[start:end, heads].reshape(256, -1) for k, _ in ref]),
                                torch.stack([v[start:end, heads].reshape(256, -1) for _, v in ref])])
            assert_same_kv(t, want, f"rank {rank} chunk {start}: not the full prefill's KV")
            assert conn._get_file_path(key).name in {f["name"] for f in m["files"] if f["rank"] == rank}
        loop.close()


def test_sha256_cbor_keys_are_lmcache_chain_with_vllm_hash(kv8b, tmp_path):
    """LMCache's chain and key code with vLLM's sha256_cbor (vllm/utils/hashing.py: SHA-256 of cbor2's canonical
    encoding; vLLM itself is not installable here) and vLLM's seeded start (kv_cache_utils.init_none_hash:
    hash_fn(PYTHONHASHSEED)), folded as LMCache folds it: the same file names as the export wrote."""
    cbor2 = pytest.importorskip("cbor2", reason="cbor2 (vLLM's serializer) is installed by `make install`")

    def vllm_sha256_cbor(x):
        return hashlib.sha256(cbor2.dumps(x, canonical=True)).digest()

    from skillkv.export import export
    from skillkv.export.chunks import cbor

    for x in [(0, (1, 2, 300, 70000, 2**33), ()), "0", (2**64 - 1, tuple(range(30)), ())]:
        assert cbor(x) == cbor2.dumps(x, canonical=True)
    export(kv8b, ["alpha-tool"], "lmcache", tmp_path, MODEL, tp=2, hash="sha256_cbor", hash_seed="1234")
    m = manifest(tmp_path)
    for rank in range(2):
        db, conn, loop = lmcache_side(tmp_path, 2, rank, 2, algo="sha256_cbor")
        db.hash_func = vllm_sha256_cbor  # what LMCache's constructor loads from vLLM
        token_database.NONE_HASH = token_database._normalize_hash_to_int(vllm_sha256_cbor("1234"))
        got = read_all(db, conn, loop, m["token_ids"])
        names = [f["name"] for f in sorted(m["files"], key=lambda f: f["chunk"]) if f["rank"] == rank]
        assert [conn._get_file_path(k).name for _, _, k, _ in got] == names
        loop.close()


def test_check_reports_hits_and_damage(kv8b, tmp_path):
    from skillkv.export import check, export

    export(kv8b, ["alpha-tool"], "lmcache", tmp_path, MODEL, tp=2, hash="builtin")
    (rep,) = check(tmp_path)
    assert rep["ok"] and [r["hits"] for r in rep["ranks"]] == [2, 2]
    assert all(r["reader"].startswith("lmcache 0.5.6") for r in rep["ranks"])
    m = manifest(tmp_path)
    victim = next(f for f in m["files"] if f["rank"] == 1 and f["chunk"] == 0)
    p = tmp_path / victim["name"]
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    (rep,) = check(tmp_path)
    assert not rep["ok"] and [r["hits"] for r in rep["ranks"]] == [2, 0]
    assert "other bytes" in rep["ranks"][1]["problems"][0]
    again = export(kv8b, ["alpha-tool"], "lmcache", tmp_path, MODEL, tp=2, hash="builtin")
    assert again["written"] == 1 and again["kept"] == 3  # the damaged file is replaced, the rest left alone
    assert check(tmp_path)[0]["ok"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_chunks_read_back_by_lmcache(tmp_path, dtype):
    """A CUDA export's dtypes (the CPU computes fp32): key dtype name, header code and payload as LMCache reads
    them, here for synthetic KV of the 8B attention shape."""
    from skillkv.export import lmcache as lmx

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128000, (600,), generator=g).tolist()
    kv = [(torch.randn(512, 8, 128, generator=g).to(dtype), torch.randn(512, 8, 128, generator=g).to(dtype))
          for _ in range(2)]
    files = lmx.export(ids[:512], kv, tmp_path, MODEL, 2, "builtin", None)
    assert len(files) == 4 and all(("@bfloat16." if dtype == torch.bfloat16 else "@half.") in f["name"]
                                   for f in files)
    for rank in range(2):
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=256, remote_url=f"fs://{tmp_path}", local_cpu=False,
                                                max_local_cpu_size=0.05, pre_caching_hash_algorithm="builtin")
        meta = LMCacheMetadata(model_name=MODEL, world_size=2, local_world_size=2, worker_id=rank,
                               local_worker_id=rank, kv_dtype=dtype, kv_shape=(2, 2, 256, 4, 128), chunk_size=256)
        loop = asyncio.new_event_loop()
        conn = FSConnector(loop, LocalCPUBackend(cfg, meta, dst_device="cpu"), cfg, base_paths_str=str(tmp_path))
        for start, end, key, t in read_all(token_database.ChunkedTokenDatabase(cfg, meta), conn, loop, ids):
            heads = slice(rank * 4, rank * 4 + 4)
            want = torch.stack([torch.stack([k[start:end, heads].reshape(256, -1) for k, _ in kv]),
                                torch.stack([v[start:end, heads].reshape(256, -1) for _, v in kv])])
            assert t.dtype == dtype and torch.equal(t, want)
        loop.close()
