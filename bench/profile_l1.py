"""Profile the L1 first token on the GPU (8B shape, dummy weights): attention kernel x element-wise ops x graphs."""
import gc, statistics, sys, time
import torch
from skillkv.engine.paged import PagedEngine
from skillkv.model import resolve_model

S = int(sys.argv[1]) if len(sys.argv) > 1 else 20480
h = resolve_model("dummy:llama-3.1-8b", device="cuda", dtype=torch.bfloat16)
model = h.load()
g = torch.Generator().manual_seed(0)
prefix = torch.randint(0, 32000, (S,), generator=g).tolist()
q = torch.randint(0, 32000, (100,), generator=g).tolist()
kv = None

def timeit(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)

ref = None
rows = []
for att in ("flashinfer:fa2", "flashinfer:fa3"):
    for ops in ("torch", "flashinfer"):
        t0 = time.perf_counter()
        eng = PagedEngine(model, budget_bytes=6 << 30, attention=att, page_size=16, ops=ops)
        if kv is None:
            r = eng.start(None); eng.prefill([r], [prefix])
            kv = [tuple(x.clone() for x in eng.pool.gather(i, r.pages, S)) for i in range(eng.pool.layers)]
            eng.finish(r)
        eng.make_resident("p", S, lambda: kv)
        def l1():
            req = eng.start("p"); out = eng.prefill([req], [q]); eng.finish(req); return out
        graphs = eng.graphs
        for mode in ("graph", "eager"):
            eng.graphs = graphs if mode == "graph" else None
            out = l1()[0]
            if ref is None: ref = out
            err = float((out - ref).norm() / ref.norm())
            med, lo = timeit(l1)
            gpu = None
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5): l1()
                torch.cuda.synchronize()
            ka = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in ka) / 5 / 1e3
            attn = sum(e.self_device_time_total for e in ka if "Prefill" in e.key or "prefill" in e.key) / 5 / 1e3
            rows.append((att, ops, mode, med, lo, gpu, attn, err, int(out.argmax()) == int(ref.argmax())))
            print(rows[-1], f"(setup {time.perf_counter()-t0:.0f}s)", flush=True)
        eng.graphs = graphs
        del eng, l1, graphs; gc.collect(); torch.cuda.empty_cache()
print(f"\nS={S}, 100-token question, H100, 8B dummy bf16")
print(f"{'attention':16} {'ops':10} {'mode':6} {'median':>7} {'min':>7} {'gpu ms':>7} {'attn ms':>7} {'rel err':>8} argmax")
for r in rows:
    print(f"{r[0]:16} {r[1]:10} {r[2]:6} {r[3]:7.2f} {r[4]:7.2f} {r[5]:7.2f} {r[6]:7.2f} {r[7]:8.1e} {r[8]}")
