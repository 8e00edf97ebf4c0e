"""Hand compiled skills to other engines' distributed KV caches: a vLLM + LMCache fleet (`fs://` connector files)
and an SGLang fleet (HiCache `file` storage backend pages). docs/SCALE_OUT.md says how a fleet picks them up.

    export(kv, ["git-commit-messages"], "lmcache", Path("/shared/lmcache"), model_name="org/model", tp=2)
    check(Path("/shared/lmcache"))      # hits per manifest and rank, read back through the target's own code

Contract of `export`: the files hold the exact KV (the model's dtype, keys after RoPE at absolute positions) of
the token ids the TARGET computes for any prompt whose system message is PREAMBLE + those skills (see
skillkv.export.source for the tokenization decision), split per tensor-parallel rank by kv heads, only full
chunks/pages (the rest is reported as left out), named and hashed as the target does, each file written
atomically inside the target folder and described by a manifest there. Bad input is a SkillkvError (one line).
"""

from __future__ import annotations

from pathlib import Path

import torch

from skillkv import __version__
from skillkv.errors import SkillkvError
from skillkv.export import lmcache, sglang
from skillkv.export.check import check_manifest
from skillkv.export.chunks import LMCACHE_HASHES, tp_heads
from skillkv.export.files import MANIFEST_VERSION, manifest_id, read_manifests, target_dir, write_manifest
from skillkv.export.source import ModelFacts, model_facts, prefix_kv, prompt_prefix

TARGETS = ("lmcache", "sglang-hicache")
# families whose KV both targets keep as one K and one V per layer and token (no sliding-window layer groups, no
# MLA latent cache) and that skillkv computes exactly
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def check_model(facts: ModelFacts, target: str, dtype: str | None) -> torch.dtype:
    """The KV dtype to export; SkillkvError for a family the target cannot load or a dtype mismatch."""
    from skillkv.model import layer_windows

    cfg = facts.config
    family = getattr(cfg, "model_type", "?")
    sliding = any(layer_windows(cfg))
    if family not in FAMILIES or sliding:
        what = f"the {family} family" + (" with sliding-window layers" if sliding else "")
        raise SkillkvError(f"{target} export supports the {', '.join(FAMILIES)} families with full attention in "
                           f"every layer (one K and V per layer and token); this model has {what}")
    if dtype is not None:
        want = getattr(torch, {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                               "fp16": "float16"}.get(dtype, dtype), None)
        if not isinstance(want, torch.dtype):
            raise SkillkvError(f"unknown dtype {dtype!r} (float32, bfloat16 or float16)")
        if want != facts.dtype:
            raise SkillkvError(f"dtype mismatch: skillkv computes this model's KV in {str(facts.dtype)[6:]} on "
                               f"{facts.device}, the fleet expects {str(want)[6:]}; a converted copy would not be "
                               "the fleet's KV (export on a device whose dtype matches, e.g. --device cuda for "
                               "bfloat16)")
    return facts.dtype


def validate(target: str, model_name: str, tp: int, hash: str, hash_seed: str | None, page_size: int,
             layout: str) -> tuple[int, str | None]:
    """Check the options that need no model (the CLI calls this before loading one). Returns (tokens per chunk
    or page, the hash seed in effect)."""
    if target not in TARGETS:
        raise SkillkvError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if tp < 1 or tp > 1024:
        raise SkillkvError(f"--tp must be between 1 and 1024, not {tp}")
    if target == "lmcache":
        lmcache.check_model_name(model_name)
        if hash not in LMCACHE_HASHES:
            raise SkillkvError(f"unknown hash {hash!r} (choose from {', '.join(LMCACHE_HASHES)})")
        return lmcache.CHUNK, (None if hash == "builtin" else hash_seed)
    sglang.check_model_name(model_name)
    if layout not in sglang.LAYOUTS:
        raise SkillkvError(f"unknown layout {layout!r} (choose from {', '.join(sglang.LAYOUTS)})")
    if not 1 <= page_size <= 4096:
        raise SkillkvError(f"--page-size must be between 1 and 4096, not {page_size}")
    return page_size, None


def export(kv, names: list[str], target: str, folder: Path, model_name: str, tp: int = 1,
           hash: str = "sha256_cbor", hash_seed: str | None = "0", page_size: int = 64,
           layout: str = "page_first", dtype: str | None = None) -> dict:
    """Export the prefix of prompts starting with skills `names` (module docstring). Returns a summary dict."""
    if not names:
        raise SkillkvError("name at least one skill to export")
    chunk, hash_seed = validate(target, model_name, tp, hash, hash_seed, page_size, layout)
    facts = model_facts(kv)
    kv_dtype = check_model(facts, target, dtype)
    cfg = facts.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    tp_heads(heads, tp)  # refuse a bad split before any prefill
    prefix = prompt_prefix(kv, names)  # unknown skills are refused before anything is written
    folder = target_dir(folder)
    n = len(prefix.ids) - len(prefix.ids) % chunk
    source, files = "none", []
    if n:
        kvs, source = prefix_kv(kv, prefix, n)
        if target == "lmcache":
            files = lmcache.export(prefix.ids[:n], kvs, folder, model_name, tp, hash, hash_seed, chunk)
        else:
            files = sglang.export(prefix.ids[:n], kvs, folder, model_name, tp, page_size, layout)
        layers, head_dim = len(kvs), kvs[0][0].shape[2]
    else:
        layers, head_dim = int(cfg.num_hidden_layers), 0
    fields = {"target": target, "model_name": model_name, "tp": tp, "dtype": str(kv_dtype)[6:], "hash": hash,
              "hash_seed": hash_seed, "chunk_size": chunk, "layout": layout if target != "lmcache" else None,
              "token_ids": prefix.ids, "fingerprint": facts.fingerprint}
    manifest = dict(fields, id=manifest_id(fields), version=MANIFEST_VERSION, skillkv_version=__version__,
                    skills=[s.name for s in prefix.skills], content_hashes=[s.content_hash for s in prefix.skills],
                    system_text=prefix.system_text, prefix_tokens=len(prefix.ids), exported_tokens=n,
                    layers=layers, kv_heads=heads, head_dim=head_dim, kv_source=source,
                    chunk_bytes=2 * layers * chunk * (heads // tp) * head_dim * kv_dtype.itemsize,
                    files=[{k: f[k] for k in ("rank", "chunk", "start", "end", "name", "sha256", "payload_sha256")}
                           for f in files])
    path = write_manifest(folder, manifest)
    unit = "chunk" if target == "lmcache" else "page"
    return {"target": target, "folder": str(folder), "manifest": str(path), "model_name": model_name, "tp": tp,
            "dtype": str(kv_dtype)[6:], "skills": manifest["skills"], "prefix_tokens": len(prefix.ids),
            "exported_tokens": n, "left_out_tokens": len(prefix.ids) - n, f"{unit}_size": chunk,
            f"{unit}s": n // chunk, "files": len(files), "written": sum(f["status"] == "written" for f in files),
            "kept": sum(f["status"] == "kept" for f in files), "kv_source": source,
            "skillkv_ids_agree": prefix.agree, "cut_by_probes": prefix.whole - len(prefix.ids),
            "hash": hash if target == "lmcache" else "sha256 (sglang)", "hash_seed": hash_seed,
            "layout": layout if target != "lmcache" else None}


def check(folder: Path) -> list[dict]:
    """The hit report of every export manifest in `folder` (skillkv.export.check)."""
    folder = Path(folder)
    return [check_manifest(folder, m) for m in read_manifests(folder)]
