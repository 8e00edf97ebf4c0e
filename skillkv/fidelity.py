"""Measured composition fidelity per model, and the bar that lets `auto` mode compose.

`skillkv eval` measures every compose repair setting against full prefill on the evaluation set and records the
result in the store, next to that model's snapshots:

    <store>/<model-tag>/compose-fidelity.json   {"fingerprint", "eval_set", "created", "full_fact_accuracy",
                                                 "settings": [{"repair": {...}, "top1", "fact_accuracy",
                                                               "recomputed", "passes"}, ...]}

The folder is per model fingerprint, and the fingerprint is checked again on read, so a measurement never
licenses composition for another model (or other weights of the same name). The numbers are taken over the
evaluation's multi-skill questions (composition is the identity for one skill).

The bar (issue 4): top-1 agreement with full >= 0.98 over the teacher-forced tokens, fact accuracy >= 98% of full
mode's (which must be above 0), and at most 15% of skill tokens recomputed. `best_setting` returns the passing setting that recomputes
least, or None: then `auto` uses exact mode.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from skillkv.compose import Repair
from skillkv.errors import SkillkvError

FILE = "compose-fidelity.json"
MIN_TOP1 = 0.98
MIN_FACT_RATIO = 0.98
MAX_RECOMPUTE = 0.15


def passes(top1: float, fact_accuracy: float, full_fact_accuracy: float, recomputed: float) -> bool:
    """The bar (module docstring). A measurement where full mode itself answers no fact (e.g. a base model that
    does not answer questions) cannot show that compose keeps the facts, so nothing passes it."""
    return (full_fact_accuracy > 0 and top1 >= MIN_TOP1 and fact_accuracy >= MIN_FACT_RATIO * full_fact_accuracy
            and recomputed <= MAX_RECOMPUTE)


def path_for(model_dir: Path) -> Path:
    return Path(model_dir) / FILE


def write(model_dir: Path, record: dict) -> Path:
    """Atomically write `record` (see the module docstring) into the model's store folder."""
    p = path_for(model_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**record, "created": time.time()}, indent=1))
    os.replace(tmp, p)
    return p


def read(model_dir: Path, fingerprint: str) -> dict | None:
    """The record for this exact model, or None (missing, unreadable, or made for another fingerprint)."""
    try:
        rec = json.loads(path_for(model_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint or not isinstance(rec.get("settings"), list):
        return None
    return rec


def best_setting(record: dict | None) -> Repair | None:
    """The passing repair setting that recomputes the fewest tokens (re-checked against the bar), or None."""
    if not record:
        return None
    full = float(record.get("full_fact_accuracy", 0.0))
    ok = []
    for s in record["settings"]:
        try:
            if passes(float(s["top1"]), float(s["fact_accuracy"]), full, float(s["recomputed"])):
                ok.append((float(s["recomputed"]), Repair.from_json(s["repair"])))
        except (KeyError, TypeError, ValueError, SkillkvError):
            continue
    return min(ok, key=lambda x: x[0])[1] if ok else None
