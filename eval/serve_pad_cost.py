"""Cost of batch-invariant padding for one request alone: decode step and question prefill, plain engine
(row_block=0) vs skillkv serve's engine (row_block=8), interleaved, medians. Usage: python eval/serve_pad_cost.py [STORE]"""
import statistics
import sys
import time

import torch

from skillkv.api import SkillKV
from skillkv.engine.paged import PagedEngine
torch.set_num_threads(2)
kv = SkillKV(model="default", store=sys.argv[1] if len(sys.argv) > 1 else "cache_store", skills="skills", device="cpu")
m = kv.runner.model
chosen = kv.pick(["git-commit-messages"]); key = kv.chain_keys(chosen)[-1]
lay = kv.builder.layout(chosen, "How do I write a commit subject?")
n = sum(len(s) for s in lay.segments[:-1]); pre = kv.prefix(chosen)[0]
engs = {rb: PagedEngine(m, budget_bytes=1<<28, attention="torch", page_size=16, row_block=rb) for rb in (0, 8)}
reqs = {}
for rb, e in engs.items():
    e.make_resident(key, n, lambda: pre); reqs[rb] = e.start(key); e.prefill([reqs[rb]], [lay.segments[-1]])
ts = {0: [], 8: []}; tq = {0: [], 8: []}
for i in range(12):
    for rb, e in engs.items():
        t = time.perf_counter(); e.prefill([reqs[rb]], [[100]]); ts[rb].append(time.perf_counter() - t)
for rb, e in engs.items():
    for i in range(4):
        r = e.start(key); t = time.perf_counter(); e.prefill([r], [lay.segments[-1]]); tq[rb].append(time.perf_counter() - t); e.finish(r)
for rb in ts:
    print(f"row_block={rb}: decode step median {statistics.median(ts[rb])*1e3:.1f} ms, question prefill ({len(lay.segments[-1])} tokens over {n}) median {statistics.median(tq[rb])*1e3:.1f} ms")
