"""Timing helpers shared by the GPU benchmarks: device-synchronized medians, cold disk reads, model loading."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from skillkv.tiers.policy import drop_page_cache as drop_cache


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, reps: int, warmup: int = 2, device="cuda", setup=None) -> tuple[float, list[float]]:
    """Median wall milliseconds of `fn` (device synchronized around each run) and every run, warm-up first;
    `setup()`, if given, runs before each run, outside the timing."""
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[warmup:]), times


def cuda_ms(fn, reps: int, warmup: int = 2) -> tuple[float, list[float]]:
    return timed_ms(fn, reps, warmup, "cuda")


def disk_read_gbs(path: Path) -> float:
    """Cold read rate of `path` (page cache dropped first), one thread, 64 MiB reads, GB/s."""
    drop_cache(path)
    buf = bytearray(1 << 26)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    return n / (time.perf_counter() - t0) / 1e9


def load_model(spec: str, device: str, dtype: torch.dtype):
    """(handle, loaded model) of `spec`, the load time printed to stderr."""
    from skillkv.model import resolve_model

    h = resolve_model(spec, device=device, dtype=dtype)
    t0 = time.perf_counter()
    model = h.load()
    sync(torch.device(device))
    print(f"model {h.name} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return h, model


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:  # the handle's own is ModelHandle.kv_bytes_per_token
    """Bytes of K and V over all layers for one token of a model with config `cfg`, in `dtype`."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def version_of(dist: str) -> str:
    """The installed version of the distribution `dist`, or "-"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def versions(cuda: bool) -> dict:
    """GPU, torch, CUDA, transformers and FlashInfer versions for a benchmark's result (FlashInfer only imported on
    CUDA: the CPU path never loads it)."""
    import transformers

    fi = "-"
    if cuda:
        try:
            import flashinfer

            fi = flashinfer.__version__
        except ImportError:
            pass
    return {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "flashinfer": fi}
