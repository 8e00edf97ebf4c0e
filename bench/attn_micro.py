"""Attention-only microbenchmark: one 100-token question over a 20k-token paged prefix (8B shape: 32 q heads,
8 kv heads, head_dim 128, bf16, page 16). FA2 (auto / fixed split), FA3, FA3 split by hand + merge_states, cuDNN."""
import statistics, time, torch, flashinfer
dev = "cuda"; ps = 16; S = 20480; Q = 100; H, KH, D = 32, 8, 128
n_tok = S + Q; n_pages = -(-n_tok // ps)
k = torch.randn(n_pages + 8, ps, KH, D, dtype=torch.bfloat16, device=dev)
v = torch.randn_like(k)
q = torch.randn(Q, H, D, dtype=torch.bfloat16, device=dev)
ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
i32 = dict(dtype=torch.int32)
def ms(fn, n=50):
    for _ in range(5): fn()
    torch.cuda.synchronize(); e0 = torch.cuda.Event(True); e1 = torch.cuda.Event(True)
    e0.record()
    for _ in range(n): fn()
    e1.record(); torch.cuda.synchronize(); return e0.elapsed_time(e1) / n
def single(backend, **kw):
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    w.plan(torch.tensor([0, Q], **i32), torch.tensor([0, n_pages], **i32), torch.arange(n_pages, **i32),
           torch.tensor([n_tok - (n_pages - 1) * ps], **i32), H, KH, D, ps, causal=True, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, **kw)
    return lambda: w.run(q, (k, v))
res = {}
ref = single("fa2")()
for name, fn in [("fa2 auto", lambda: single("fa2")), ("fa3", lambda: single("fa3"))] + \
        [(f"fa2 split {s}p", (lambda s=s: single("fa2", fixed_split_size=s))) for s in (8, 16, 32, 64, 128)] + \
        [("cudnn", lambda: single("cudnn", max_token_per_sequence=Q, max_sequence_kv=n_tok))]:
    try:
        f = fn(); out = f(); err = float((out.float() - ref.float()).norm() / ref.float().norm())
        res[name] = (ms(f), err)
    except Exception as e:
        res[name] = (float("nan"), repr(e)[:120])
    print(name, res[name], flush=True)
# FA3 split by hand: chunks 0..c-2 non-causal (q replicated), last chunk causal (lower-right), merge by LSE
for c in (2, 4, 8):
    try:
        per = -(-n_pages // c)
        bounds = [(i * per, min(n_pages, (i + 1) * per)) for i in range(c)]
        nc = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws[: 128 << 20], "NHD", backend="fa3")
        ca = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws[128 << 20:], "NHD", backend="fa3")
        mid = bounds[:-1]
        nc.plan(torch.tensor([i * Q for i in range(len(mid) + 1)], **i32), torch.tensor([0] + [b - a for a, b in mid], **i32).cumsum(0).to(torch.int32),
                torch.cat([torch.arange(a, b, **i32) for a, b in mid]), torch.full((len(mid),), ps, **i32), H, KH, D, ps,
                causal=False, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        a, b = bounds[-1]
        ca.plan(torch.tensor([0, Q], **i32), torch.tensor([0, b - a], **i32), torch.arange(a, b, **i32),
                torch.tensor([n_tok - (n_pages - 1) * ps], **i32), H, KH, D, ps, causal=True,
                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        def run():
            o1, s1 = nc.run(q.repeat(len(mid), 1, 1), (k, v), return_lse=True)
            o2, s2 = ca.run(q, (k, v), return_lse=True)
            vs = torch.cat([o1.view(len(mid), Q, H, D), o2[None]]).transpose(0, 1)
            ss = torch.cat([s1.view(len(mid), Q, H), s2[None]]).transpose(0, 1)
            return flashinfer.merge_states(vs.contiguous(), ss.contiguous())[0]
        out = run(); err = float((out.float() - ref.float()).norm() / ref.float().norm())
        res[f"fa3 split x{c}"] = (ms(run), err)
    except Exception as e:
        res[f"fa3 split x{c}"] = (float("nan"), repr(e)[:160])
    print(f"fa3 split x{c}", res[f"fa3 split x{c}"], flush=True)
flops = 4 * Q * H * S * D
print(f"\nattention, {Q} q tokens over {S} kv, {H}/{KH} heads, d {D}: ms per layer (x32 per forward), TFLOP/s, rel err vs fa2")
for kk, (t, e) in res.items():
    print(f"{kk:16} {t:8.3f} ms  {flops / t / 1e9 if t == t else 0:7.0f} TFLOP/s  {e}")
