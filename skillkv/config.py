"""Defaults and environment variables, in one place.

SKILLKV_MODEL   model spec used when --model is not given (see skillkv.model.resolve_model)
SKILLKV_STORE   snapshot store folder (default: ./cache_store)
SKILLKV_SKILLS  skills folder (default: ./skills)
SKILLKV_HOME    where converted models, hash caches and skill embeddings live (default: ~/.cache/skillkv)
SKILLKV_SELECT  skill selection method: bm25 | embed | fused (default: fused with the embed extra, else bm25)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from skillkv.errors import SkillkvError

DEFAULT_MODEL = "default"
DEFAULT_MAX_TOKENS = 256


def home() -> Path:
    return Path(os.environ.get("SKILLKV_HOME") or Path.home() / ".cache" / "skillkv")


def default_store() -> Path:
    return Path(os.environ.get("SKILLKV_STORE") or "cache_store")


def default_skills() -> Path:
    return Path(os.environ.get("SKILLKV_SKILLS") or "skills")


def default_model() -> str:
    return os.environ.get("SKILLKV_MODEL") or DEFAULT_MODEL


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_bytes(text: str | int | None, allow_zero: bool = False) -> int | None:
    """The one byte-size parser of every option (`--gpu-kv-budget`, `--host-kv-budget`, `--max-bytes`, ...).

    A number with an optional unit, case-insensitive, `B` optional: decimal K, M, G, T (KB, MB, GB, TB: 1 GB =
    10^9 bytes) or binary Ki, Mi, Gi, Ti (KiB, MiB, GiB, TiB: 1 GiB = 2^30 bytes); a bare number is bytes.
    `2G` = `2GB` = 2,000,000,000; `2GiB` = 2,147,483,648; `1.5GB` = 1,500,000,000. None stays None. A negative,
    zero (unless `allow_zero`) or unreadable size is a SkillkvError (one line)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(text).lower())
    if not m:
        raise SkillkvError(f"not a size: {text!r} (use e.g. 8GB, 512MiB or a number of bytes)")
    n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n < 0 or (n == 0 and not allow_zero):
        raise SkillkvError(f"size must be {'zero or ' if allow_zero else ''}positive: {text!r}")
    return n
