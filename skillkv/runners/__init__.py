"""The engines behind SkillKV, behind one contract (runners/base.py).

  hf     transformers over DynamicCaches (runners/hf.py): any family, sliding-window models included; the reference
  paged  the lean Llama-family runner over the KV pool (runners/paged.py): torch attention on the CPU, FlashInfer
         and CUDA graphs on CUDA

`auto` picks paged wherever it can run the model (engine/support.py: the Llama family without sliding-window
layers, with a RoPE type it computes; on CUDA also a head dim FlashInfer's kernels are built for), hf otherwise. Every command on a machine resolves the same way, so
`compile`, `ask`, `watch` and `serve` share one store (the runner's name is part of the snapshot fingerprint).
"""

from __future__ import annotations

from skillkv.engine.support import unsupported
from skillkv.errors import SkillkvError
from skillkv.model import ModelHandle
from skillkv.runners.base import KV, KVSource, Part, ReadyKV, Runner, Seq

ENGINES = ("auto", "hf", "paged")
# what goes into the snapshot fingerprint for each runner: its name, and for the paged runner the version of its
# arithmetic (bumped whenever a change gives the same KV other bits, so older snapshots are recompiled, not served
# as if exact). paged 2: attention in fixed key blocks (engine/block_attention.py)
KERNELS = {"hf": "hf", "paged": "paged-2"}
FLASHINFER_HEAD_DIMS = (64, 128, 256)

__all__ = ["ENGINES", "KERNELS", "KV", "KVSource", "Part", "ReadyKV", "Runner", "Seq", "make_runner", "resolve_engine"]


def resolve_engine(name: str, handle: ModelHandle) -> str:
    """The runner name for `name` (auto | hf | paged) and this model; an explicit `paged` for a model it cannot
    run is a SkillkvError."""
    if name not in ENGINES:
        raise SkillkvError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    cfg = handle.hf_config
    why = unsupported(cfg)
    if name == "paged" and why:
        raise SkillkvError(why)
    if name != "auto":
        return name
    cuda_ok = not handle.device.startswith("cuda") or cfg.head_dim in FLASHINFER_HEAD_DIMS
    return "paged" if why is None and cuda_ok else "hf"


def make_runner(name: str, model, kv_budget: int | None = None, batch_invariant: bool | None = False,
                attention: str = "auto", verdicts=None, spill_bytes: int = 0) -> Runner:
    """The runner `name` (already resolved: hf | paged) over `model`: a ModelHandle (the paged runner reads its
    weights with safetensors, the hf runner loads the transformers model) or a loaded transformers model.
    `batch_invariant`: True required, None where it holds, False off (runners/paged.py); `verdicts`: the cache of
    the paged runner's GEMM check (skillkv/verdicts.py); `spill_bytes`: host memory for prefix-cache pages
    evicted from the pool."""
    if name == "paged":
        from skillkv.engine.weights import LlamaWeights
        from skillkv.runners.paged import PagedRunner

        weights = LlamaWeights.from_handle(model) if isinstance(model, ModelHandle) else model
        return PagedRunner(weights, kv_budget, attention=attention, batch_invariant=batch_invariant,
                           verdicts=verdicts, spill_bytes=spill_bytes)
    from skillkv.runners.hf import HFRunner

    return HFRunner(model.load() if isinstance(model, ModelHandle) else model, kv_budget)
