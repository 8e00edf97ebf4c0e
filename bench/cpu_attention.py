"""CPU attention of a question step over a cached prefix, formulations side by side (docs/BENCHMARKS.md, issue 15).

    .venv/bin/python bench/cpu_attention.py [KV_LEN] [Q_LEN]

The default model's shape: 9 query heads, 3 kv heads, head_dim 64, fp32; keys and values as the torch backend sees
them (views of a [tokens, kv_heads, head_dim] pool). Prints median microseconds per layer and the max difference
from the engine's formulation (A):
  A  SDPA with an additive mask and enable_gqa (engine/attention.py)
  B  grouped-query heads folded into the query rows, the mask repeated
  C  folded; the prefix without a mask and the new keys with one, merged by log-sum-exp
  D  folded; baddbmm + softmax + bmm
  E  A over keys and values made contiguous per head
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", 2)))
torch.manual_seed(0)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 1883
n = int(sys.argv[2]) if len(sys.argv) > 2 else 22
H, G, D = 9, 3, 64
g, P, scale = H // G, L - n, D ** -0.5
pool_k, pool_v = torch.randn(L + 64, G, D), torch.randn(L + 64, G, D)
k, v = pool_k[:L], pool_v[:L]
q = torch.randn(n, H, D)
keep = torch.arange(L)[None, :] <= torch.arange(P, L)[:, None]
mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
maskf = mask.repeat(g, 1)
kt, vt = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def fold(x):
    return x.view(n, G, g, D).permute(1, 2, 0, 3).reshape(1, G, g * n, D)


def unfold(o):
    return o.reshape(G, g, n, D).permute(2, 0, 1, 3).reshape(n, H, D)


def a():
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kt, vt, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def b():
    return unfold(F.scaled_dot_product_attention(fold(q), kt, vt, attn_mask=maskf, scale=scale))


def c():
    qf = fold(q)
    o1, l1 = flash(qf, kt[:, :, :P], vt[:, :, :P], scale=scale)
    o2, l2 = flash(qf, kt[:, :, P:], vt[:, :, P:], attn_mask=maskf[:, P:], scale=scale)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return unfold((o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None])


kc, vc = k.transpose(0, 1), v.transpose(0, 1)


def d():
    s = torch.baddbmm(maskf, fold(q)[0], kc.transpose(1, 2), alpha=scale)
    return unfold(torch.bmm(torch.softmax(s, -1), vc))


ktc, vtc = kt.contiguous(), vt.contiguous()


def e():
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), ktc, vtc, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


ref = a()
for name, f in [("A engine", a), ("B folded", b), ("C split + LSE merge", c), ("D bmm", d), ("E contiguous", e)]:
    err = float((f() - ref).abs().max())
    for _ in range(5):
        f()
    ts = []
    for _ in range(50):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    print(f"{name:22s} {statistics.median(ts) * 1e6:8.0f} us   max diff {err:.1e}")
