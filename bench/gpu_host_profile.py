"""Issue 14's host-work goal: where the host time of one L1 question step goes (100 tokens over a resident
20,480-token prefix, 8B shape, dummy bf16 weights, the engine's default kernels). Wall time of the step, GPU time
of its graph replay, and a cProfile of 50 steps (top functions by own time).

    python3 bench/gpu_host_profile.py
"""

from __future__ import annotations

import cProfile
import pstats

import torch

from skillkv.measure.profile_gpu import replay_ms
from skillkv.measure.timing import kv_bytes_per_token, load_model, timed_ms
from skillkv.runners.paged import PagedRunner

S, QN = 20480, 100
h, model = load_model("dummy:llama-3.1-8b", "cuda", torch.bfloat16)
cfg = model.config
runner = PagedRunner(model, int(2 * S * kv_bytes_per_token(cfg, torch.bfloat16)) + (1 << 30))
eng = runner.engine
hd = cfg.hidden_size // cfg.num_attention_heads
kv = [(torch.randn(S, cfg.num_key_value_heads, hd, device="cuda", dtype=torch.bfloat16),
       torch.randn(S, cfg.num_key_value_heads, hd, device="cuda", dtype=torch.bfloat16))
      for _ in range(cfg.num_hidden_layers)]
eng.make_resident("p", S, lambda: kv)
q = torch.randint(0, cfg.vocab_size, (QN,)).tolist()


def l1():
    req = eng.start("p")
    out = eng.prefill([req], [q])
    eng.finish(req)
    return out


with torch.inference_mode():
    for _ in range(3):
        l1()
    for rep in range(3):
        wall, _ = timed_ms(l1, 30)
        gpu = replay_ms(eng.graphs.graphs[eng.graphs.last].graph)
        print(f"rep {rep}: wall {wall:.3f} ms, graph replay {gpu:.3f} ms, host {wall - gpu:.3f} ms", flush=True)
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(50):
        l1()
    torch.cuda.synchronize()
    pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
