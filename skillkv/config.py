"""Defaults and environment variables, in one place.

SKILLKV_MODEL   model spec used when --model is not given (see skillkv.model.resolve_model)
SKILLKV_STORE   snapshot store folder (default: ./cache_store)
SKILLKV_SKILLS  skills folder (default: ./skills)
SKILLKV_HOME    where converted models, hash caches and skill embeddings live (default: ~/.cache/skillkv)
SKILLKV_SELECT  skill selection method: bm25 | embed | fused (default: fused with the embed extra, else bm25)
"""

from __future__ import annotations

import os
from pathlib import Path

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
