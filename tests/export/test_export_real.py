"""skillkv export on the real default model (SmolLM2-135M-Instruct, fp32, CPU): the exported chunks, read back by
LMCache 0.5.6's own token database and fs connector for the prompt a server tokenizes, are a full prefill's KV
of that prompt at the same absolute positions, bit for bit; SGLang's reader hits every exported page."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from export_support import full_prefill, manifest, served_prompt_ids

pytestmark = pytest.mark.slow
lm = pytest.importorskip("lmcache", reason="lmcache 0.5.6 is installed by `make install` (--no-deps)")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_lmcache_reads_full_prefill_kv_bit_for_bit(real_kv, tmp_path):
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.connector.fs_connector import FSConnector
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.token_database import ChunkedTokenDatabase

    from skillkv.export import export

    r = export(real_kv, ["git-commit-messages"], "lmcache", tmp_path, MODEL, hash="builtin")
    # the server tokenizes the whole prompt: skillkv's segment-wise ids part at the preamble's end, so the KV is a
    # prefill of the server's ids, not skillkv's snapshots
    assert r["kv_source"] == "prefill" and r["skillkv_ids_agree"] < r["exported_tokens"] == 512
    m = manifest(tmp_path)
    ids = served_prompt_ids(real_kv, m["system_text"], "How long may a commit subject line be?")
    assert ids[:r["prefix_tokens"]] == m["token_ids"] and len(ids) > r["prefix_tokens"]
    ref = full_prefill(real_kv, ids)
    layers, heads, dim = len(ref), ref[0][0].shape[1], ref[0][0].shape[2]
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=256, remote_url=f"fs://{tmp_path}", local_cpu=False,
                                            max_local_cpu_size=0.05, pre_caching_hash_algorithm="builtin")
    meta = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=torch.float32, kv_shape=(layers, 2, 256, heads, dim), chunk_size=256)
    loop = asyncio.new_event_loop()
    conn = FSConnector(loop, LocalCPUBackend(cfg, meta, dst_device="cpu"), cfg, base_paths_str=str(tmp_path))
    # vLLM asks LMCache with the whole prompt's ids; LMCache keys its full chunks
    chunks = list(ChunkedTokenDatabase(cfg, meta).process_tokens(ids))
    assert len(chunks) >= 2
    hits = 0
    for start, end, key in chunks:
        if not conn.exists_sync(key):
            break
        obj = loop.run_until_complete(conn.get(key))
        want = torch.stack([torch.stack([k[start:end].reshape(256, -1) for k, _ in ref]),
                            torch.stack([v[start:end].reshape(256, -1) for _, v in ref])])
        assert torch.equal(obj.tensor, want), f"chunk [{start}, {end}) differs from the full prefill"
        obj.ref_count_down()
        hits += 1
    loop.close()
    assert hits * 256 == r["exported_tokens"]


def test_sglang_check_hits_every_page(real_kv, tmp_path):
    from skillkv.export import check, export

    r = export(real_kv, ["git-commit-messages"], "sglang-hicache", tmp_path, MODEL, tp=3, page_size=64)
    (rep,) = check(tmp_path)
    assert rep["ok"] and [x["hits"] for x in rep["ranks"]] == [r["pages"]] * 3
    assert r["left_out_tokens"] == r["prefix_tokens"] % 64
