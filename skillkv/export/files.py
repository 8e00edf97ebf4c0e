"""Writing into a target's folder: atomic files and the export manifest.

Contract: every file appears complete or not at all (a temp file in the same folder, written, fsynced, renamed;
the temp name starts with "." and ends in ".tmp", so neither LMCache's `*.data` listing nor SGLang's `*.bin` scan
ever sees it); nothing is written outside the target folder; a file already there with the same bytes is left
alone (exports are idempotent, and a fleet reading the folder never sees a file replaced by itself).

The manifest (`skillkv-export-<id>.json`, one per export) says what was exported for which prompt: target, model
name, dtype, tensor-parallel size, chunk/page size, hash, layout, the skills, the system text a client must send,
the exported token ids, and each file with the SHA-256 of its bytes. `skillkv export --check` reads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from skillkv import atomic
from skillkv.errors import SkillkvError

MANIFEST_PREFIX = "skillkv-export-"
MANIFEST_VERSION = 1


def target_dir(path: Path) -> Path:
    """The export folder, created if missing; a SkillkvError if it is a file or cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SkillkvError(f"export folder {path} is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SkillkvError(f"cannot create export folder {path}: {e.strerror or e}") from None
    return path


def write_atomic(folder: Path, name: str, data: bytes) -> str:
    """Write `data` to folder/name atomically. Returns "written" or "kept" (same bytes already there).
    `name` must be a plain file name (no separators), so the file stays inside `folder`."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise SkillkvError(f"refusing file name {name!r}")
    if len(name.encode()) > 255:
        raise SkillkvError(f"file name of {len(name.encode())} bytes is too long for the file system: {name[:60]}...")
    path = folder / name
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return "kept"
    atomic.write_atomic(path, data, ".skillkv-", ".tmp")
    return "written"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_id(fields: dict) -> str:
    """A stable id for one export (target, settings and token ids), 16 hex digits."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(folder: Path, manifest: dict) -> Path:
    name = f"{MANIFEST_PREFIX}{manifest['id']}.json"
    write_atomic(folder, name, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return folder / name


def _check_fields(name: str, m: dict) -> None:
    """A manifest comes from a shared folder: its fields are checked before they name files or size buffers."""
    import re

    def bad(what: str):
        raise SkillkvError(f"{name}: bad {what}")

    ints = ("tp", "chunk_size", "chunk_bytes", "layers", "kv_heads", "head_dim", "prefix_tokens", "exported_tokens")
    if any(not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or m[k] < 0 for k in ints):
        bad("numbers")
    if not 1 <= m["tp"] <= 1024 or not 1 <= m["chunk_size"] <= 4096 or m["chunk_bytes"] > 1 << 34:
        bad("sizes")
    if not isinstance(m.get("model_name"), str) or not re.fullmatch(r"[A-Za-z0-9._+:/-]+", m["model_name"]):
        bad("model name")
    ids = m.get("token_ids")
    if not isinstance(ids, list) or any(not isinstance(t, int) or not 0 <= t < 1 << 32 for t in ids):
        bad("token ids")
    if m["target"] == "lmcache" and (m.get("hash") not in ("sha256_cbor", "builtin")
                                     or not isinstance(m.get("hash_seed"), (str, type(None)))):
        bad("hash")
    if m.get("dtype") not in ("float32", "bfloat16", "float16") or not isinstance(m.get("files"), list):
        bad("dtype or file list")
    for f in m["files"]:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "/" in f["name"] or \
                not isinstance(f.get("rank"), int) or not isinstance(f.get("chunk"), int):
            bad("file entry")


def read_manifests(folder: Path) -> list[dict]:
    """Every export manifest in `folder`, oldest name first; SkillkvError if there is none or one is unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SkillkvError(f"{folder} is not a folder")
    out = []
    for p in sorted(folder.glob(f"{MANIFEST_PREFIX}*.json")):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise SkillkvError(f"unreadable export manifest {p.name}: {e}") from None
        if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or m.get("target") not in (
                "lmcache", "sglang-hicache"):
            raise SkillkvError(f"{p.name} is not a skillkv export manifest of version {MANIFEST_VERSION}")
        _check_fields(p.name, m)
        m["_path"] = str(p)
        out.append(m)
    if not out:
        raise SkillkvError(f"no skillkv export manifest in {folder} (nothing exported there)")
    return out
