"""skillkv.export for SGLang HiCache, proven by SGLang 0.5.23's own code (installed by `make install`, --no-deps):
its C++ page hash (compiled on first use by torch's extension loader), its HiCacheFile backend (file naming per
tensor-parallel rank, reads), and its host pool's page placement (`MHATokenToKVPoolHost.set_from_flat_data_page`,
taken from the installed source file and run as is: its module imports the GPU stack)."""

from __future__ import annotations

import importlib.util
import random
from types import SimpleNamespace

import pytest
import torch

from export_support import assert_same_kv, full_prefill, manifest, served_prompt_ids, write_8b_config

if importlib.util.find_spec("sglang") is None:  # its __init__ needs the GPU stack: never imported whole here
    pytest.skip("sglang 0.5.23 is installed by `make install` (--no-deps)", allow_module_level=True)
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def sgl():
    from skillkv.export.readers import sglang_modules

    try:
        native, storage = sglang_modules()
        native.get_native_hash([1, 2], None, 1)  # builds hash_binding.cpp once (g++, ninja, OpenSSL headers)
    except Exception as e:  # noqa: BLE001 - a machine without a C++ toolchain cannot build SGLang's hash
        pytest.skip(f"SGLang's native page hash does not build here: {type(e).__name__}: {e}")
    return native, storage


@pytest.fixture(scope="module")
def kv8b(tmp_path_factory):
    from conftest import write_skill
    from skillkv.api import SkillKV

    root = tmp_path_factory.mktemp("sg8b")
    skills = root / "skills"
    write_skill(skills, "beta-codes", "Use for beta error codes.", "Code B-17 means the disk is full.\n" * 6)
    return SkillKV(model=write_8b_config(root), store=root / "store", skills=skills, device="cpu")


def sglang_method(name: str):
    """MHATokenToKVPoolHost.<name> from the installed sglang's pool_host/mha.py, compiled alone (SGLang's code)."""
    from skillkv.export.readers import sglang_function

    return sglang_function("srt/mem_cache/pool_host/mha.py", name, cls="MHATokenToKVPoolHost",
                           namespace={"torch": torch})


def test_page_hashes_are_sglangs(sgl):
    from skillkv.export.chunks import sglang_page_hashes

    native, _ = sgl
    rng = random.Random(7)
    for page in (1, 16, 64):
        ids = [rng.randrange(0, 200_000) for _ in range(3 * page + 5)]
        full = len(ids) - len(ids) % page
        assert sglang_page_hashes(ids, page) == native.get_native_hash(ids[:full], None, page)


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_tp2_pages_read_by_hicachefile_and_placed_by_sglang(sgl, kv8b, tmp_path, layout):
    from skillkv.export import export

    native, storage = sgl
    page = 64
    r = export(kv8b, ["beta-codes"], "sglang-hicache", tmp_path, MODEL, tp=2, page_size=page, layout=layout)
    m = manifest(tmp_path)
    assert r["pages"] == r["prefix_tokens"] // page and r["left_out_tokens"] == r["prefix_tokens"] % page
    ids = served_prompt_ids(kv8b, m["system_text"], "What does B-17 mean?")
    ref = full_prefill(kv8b, ids)
    n = r["exported_tokens"]
    keys = native.get_native_hash(ids[:n], None, page)
    place = sglang_method("set_from_flat_data_page")
    layers = len(ref)
    for rank in range(2):
        cfg = storage.HiCacheStorageConfig(tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                           attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                           is_page_first_layout=layout == "page_first", model_name=MODEL)
        backend = storage.HiCacheFile(cfg, file_path=str(tmp_path))
        assert backend.batch_exists(keys) == len(keys)
        # SGLang's host pool of this layout (dims as MHATokenToKVPoolHost.init_kv_buffer allocates them)
        dims = (2, layers, n, 4, 128) if layout == "layer_first" else (2, n, layers, 4, 128)
        host = SimpleNamespace(layout=layout, kv_buffer=torch.zeros(dims), layer_num=layers, page_size=page,
                               head_num=4, head_dim=128)
        for i, key in enumerate(keys):
            flat = backend.get(key, torch.empty(2 * layers * page * 4 * 128))
            assert flat is not None
            place(host, i * page, flat)
        heads = slice(rank * 4, rank * 4 + 4)
        for layer, (k, v) in enumerate(ref):
            got_k = host.kv_buffer[0, layer] if layout == "layer_first" else host.kv_buffer[0, :, layer]
            got_v = host.kv_buffer[1, layer] if layout == "layer_first" else host.kv_buffer[1, :, layer]
            assert_same_kv(got_k, k[:n, heads], f"{rank}, {layer}")
            assert_same_kv(got_v, v[:n, heads], f"{rank}, {layer}")


def test_check_uses_sglang(sgl, kv8b, tmp_path):
    from skillkv.export import check, export

    export(kv8b, ["beta-codes"], "sglang-hicache", tmp_path, MODEL, tp=2, page_size=32, layout="page_first")
    (rep,) = check(tmp_path)
    assert rep["ok"] and all(r["reader"].startswith("sglang 0.5.23") for r in rep["ranks"])
    assert [r["hits"] for r in rep["ranks"]] == [rep["exported_tokens"] // 32] * 2
    (tmp_path / manifest(tmp_path)["files"][-1]["name"]).unlink()
    (rep,) = check(tmp_path)
    assert not rep["ok"]
