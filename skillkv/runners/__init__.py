"""The engines behind SkillKV, behind one contract (runners/base.py).

  hf     transformers over DynamicCaches (runners/hf.py): any family, sliding-window models included; the reference
  paged  the lean Llama-family runner over the KV pool (runners/paged.py): torch attention on the CPU, FlashInfer
         and CUDA graphs on CUDA

`auto` picks paged wherever it can run the model (the Llama family without sliding-window layers; on CUDA also a
head dim FlashInfer's kernels are built for), hf otherwise. Every command on a machine resolves the same way, so
`compile`, `ask`, `watch` and `serve` share one store (the runner's name is part of the snapshot fingerprint).
"""

from __future__ import annotations

from skillkv.engine.llama import SUPPORTED as PAGED_FAMILIES
from skillkv.errors import SkillkvError
from skillkv.model import ModelHandle, layer_windows
from skillkv.runners.base import KV, KVSource, Part, ReadyKV, Runner, Seq

ENGINES = ("auto", "hf", "paged")
FLASHINFER_HEAD_DIMS = (64, 128, 256)

__all__ = ["ENGINES", "KV", "KVSource", "Part", "ReadyKV", "Runner", "Seq", "make_runner", "resolve_engine"]


def resolve_engine(name: str, handle: ModelHandle) -> str:
    """The runner name for `name` (auto | hf | paged) and this model; an explicit `paged` for a model it cannot
    run is a SkillkvError."""
    if name not in ENGINES:
        raise SkillkvError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    cfg = handle.hf_config
    model_type = getattr(cfg, "model_type", None)
    sliding = any(layer_windows(cfg))
    if name == "paged" and model_type not in PAGED_FAMILIES:
        raise SkillkvError(f"the paged engine supports {', '.join(sorted(PAGED_FAMILIES))}, not {model_type}")
    if name == "paged" and sliding:
        raise SkillkvError(f"the paged engine does not support sliding-window attention ({model_type}); "
                           "use --engine hf")
    if name != "auto":
        return name
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cuda_ok = not handle.device.startswith("cuda") or head_dim in FLASHINFER_HEAD_DIMS
    return "paged" if model_type in PAGED_FAMILIES and not sliding and cuda_ok else "hf"


def make_runner(name: str, model, kv_budget: int | None = None, batch_invariant: bool = False,
                attention: str = "auto") -> Runner:
    """The runner `name` (already resolved: hf | paged) over a loaded transformers `model`."""
    if name == "paged":
        from skillkv.runners.paged import PagedRunner

        return PagedRunner(model, kv_budget, attention=attention, batch_invariant=batch_invariant)
    from skillkv.runners.hf import HFRunner

    return HFRunner(model, kv_budget)
