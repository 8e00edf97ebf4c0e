"""Measured composition fidelity per model, and the bar that lets `auto` mode compose.

`skillkv eval` measures every compose repair setting against full prefill on the evaluation set and records the
result in the store, next to that model's snapshots:

    <store>/<model-tag>/compose-fidelity.json   {"fingerprint", "eval_set", "created", "full_fact_accuracy",
                                                 "settings": [{"repair": {...}, "top1", "fact_accuracy",
                                                               "recomputed", "passes"}, ...]}

The folder is per model fingerprint, and the fingerprint is checked again on read, so a measurement never
licenses composition for another model (or other weights of the same name). The numbers are taken over the
evaluation's multi-skill questions (composition is the identity for one skill), the worse of both skill orders.

Shipped measurements. `make eval` (`skillkv eval --ship`) also writes the record into the package,
skillkv/compose/fidelity_records/<weights id>.json, keyed by the model's weights (sha256 of its weight files), so `auto`
follows the project's own measurement of the default model without every user rerunning the evaluation. A store's
own record, for the exact fingerprint (engine and preamble included), takes precedence (`for_model`). The shipped
one applies to every engine and dtype of those weights: the engines compute the same function (exact mode is
tested identical to full prefill on each); their rounding differs at the level of bf16 noise, far below the
fidelity margins measured.

The bar (issue 4): top-1 agreement with full >= 0.98 over the teacher-forced tokens, fact accuracy >= 98% of full
mode's (which must be above 0), and at most 15% of skill tokens recomputed. `best_setting` returns the passing setting that recomputes
least, or None: then `auto` uses exact mode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from skillkv.compose.repair import Repair
from skillkv.atomic import write_atomic
from skillkv.errors import SkillkvError

FILE = "compose-fidelity.json"
SHIPPED = Path(__file__).resolve().parent / "fidelity_records"
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


def _write_json(p: Path, record: dict) -> Path:
    """Atomically write `record` as JSON to `p`."""
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, (json.dumps(record, indent=1) + "\n").encode())
    return p


def _read_record(p: Path, field: str, expect: str) -> dict | None:
    """The record at `p` if it is readable, has a settings list and `field` equal to `expect`; else None."""
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get(field) != expect or not isinstance(rec.get("settings"), list):
        return None
    return rec


def write(model_dir: Path, record: dict) -> Path:
    """Atomically write `record` (see the module docstring) into the model's store folder."""
    return _write_json(path_for(model_dir), {**record, "created": time.time()})


def read(model_dir: Path, fingerprint: str) -> dict | None:
    """The record for this exact model, or None (missing, unreadable, or made for another fingerprint)."""
    return _read_record(path_for(model_dir), "fingerprint", fingerprint)


def shipped_path(weights_id: str) -> Path:
    return SHIPPED / f"{weights_id}.json"


def write_shipped(record: dict) -> Path:
    """Write `record` (it must carry "weights_id") as the measurement shipped with skillkv for those weights."""
    weights = record.get("weights_id") or ""
    if not weights or not all(c in "0123456789abcdef" for c in weights):
        raise SkillkvError("only a model with real weights (a sha256 weights id) can ship a fidelity record")
    return _write_json(shipped_path(weights), {k: v for k, v in record.items() if k != "fingerprint"})


def read_shipped(weights_id: str) -> dict | None:
    """The record shipped for these weights, or None."""
    if not weights_id or "/" in weights_id:
        return None
    return _read_record(shipped_path(weights_id), "weights_id", weights_id)


def for_model(model_dir: Path, fingerprint: str, weights_id: str) -> dict | None:
    """The store's own record for this exact fingerprint, else the one shipped for these weights, else None."""
    return read(model_dir, fingerprint) or read_shipped(weights_id)


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
