"""Kernel-level GPU measurements behind the engine's per-phase choices (issue 14), Llama-3.1-8B shapes, bf16.

    python -m skillkv.measure.bench_kernels --out DIR        # writes DIR/kernels.json, prints a table

  ceilings   HBM copy (bytes read + written), HBM read (a sum over 8 GB), bf16 8192^3 matrix product
  gemm       every weight GEMM of a question step (qkv, o, gate_up, down; lm_head) at M rows: cuBLAS (F.linear) and
             the Triton split-K kernel (engine/gemm.py) with its default and a few other configurations;
             effective weight-read TB/s; max relative error vs float32; whether two runs give the same bits
  attention  one layer of 100 queries over S cached keys (paged, scattered pages, page 16): FA3 as the engine
             runs it (graph batch of 2 with the pad sequence, width bucket) and as the issue measured it (one
             sequence, tight table), num_splits 0 / 1 / 4 / 8 / 16; long causal prefill of S fresh tokens, FA3
             contiguous vs paged; relative error vs SDPA
  ops        one layer's element-wise work at 104 rows: Triton kernels vs the torch modules
Every timing is the median of CUDA-graph replays (events) of several calls over rotating buffers larger than L2,
per call. Nothing here is used by the engine at run time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from skillkv.measure.profile_gpu import replay_ms

H, HQ, HK, D, INTER, VOCAB = 4096, 32, 8, 128, 14336, 128256
SHAPES = {"qkv": ((HQ + 2 * HK) * D, H), "o": (H, H), "gate_up": (2 * INTER, H), "down": (H, INTER),
          "lm_head": (VOCAB, H)}


def graph_us(fn, calls: int, reps: int = 15) -> float:
    """Median microseconds per call of `fn(i)` for i in range(calls), captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return replay_ms(g, reps) * 1e3 / calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def ceilings() -> dict:
    n = 2 << 30
    src, dst = torch.randn(n, dtype=torch.bfloat16, device="cuda"), torch.empty(n, dtype=torch.bfloat16, device="cuda")
    copy = graph_us(lambda i: dst.copy_(src), 4)
    read = graph_us(lambda i: src.sum(dtype=torch.float32), 4)
    del src, dst
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mm = graph_us(lambda i: a @ b, 4)
    return {"copy_tbs": 2 * n * 2 / copy / 1e6, "read_tbs": n * 2 / read / 1e6, "matmul_tflops": 2 * 8192 ** 3 / mm / 1e6}


def _streams_linear(x, w, parts: int, streams):
    """F.linear as `parts` GEMMs over slices of K on `parts` streams at once, summed (the split-K that cuBLAS's
    heuristics do not pick for skinny M: more CTAs reading weights together)."""
    k = x.shape[1] // parts
    cur = torch.cuda.current_stream()
    outs = []
    for p in range(parts):
        s = cur if p == 0 else streams[p - 1]
        s.wait_stream(cur)
        with torch.cuda.stream(s):
            outs.append(F.linear(x[:, p * k:(p + 1) * k], w[:, p * k:(p + 1) * k]))
    for s in streams[:parts - 1]:
        cur.wait_stream(s)
    y = outs[0].float()
    for o in outs[1:]:
        y += o
    return y.to(x.dtype)


def gemm(rows=(104, 100, 1), sweep: bool = False) -> dict:
    """Each weight GEMM at `rows` rows: cuBLAS, cuBLAS on the swapped problem (W @ x^T, transposed back), cuBLAS
    split-K over 2 / 4 streams, the Triton split-K kernel (its configuration sweep at 104 rows with `sweep`)."""
    from skillkv.engine.gemm import config, skinny_linear

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    streams = [torch.cuda.Stream() for _ in range(3)]
    out = {}
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(8, int(600e6 // (n * k * 2))))  # rotate through > L2 (60 MB) of weights
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        gb = n * k * 2 / 1e9
        for m in rows:
            if (name == "lm_head") != (m == 1):
                continue
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ ws[0].float().t()
            r = {"cublas_us": graph_us(lambda i: F.linear(x, ws[i % copies]), 2 * copies),
                 "cublas_err": rel(F.linear(x, ws[0]), ref),
                 "swapped_us": graph_us(lambda i: torch.mm(ws[i % copies], x.t()).t().contiguous(), 2 * copies)}
            for parts in (2, 4):
                r[f"streams{parts}_us"] = graph_us(lambda i, p=parts: _streams_linear(x, ws[i % copies], p, streams),
                                                   2 * copies)
                r[f"streams{parts}_err"] = rel(_streams_linear(x, ws[0], parts, streams), ref)
            cfgs = {}
            base = config(m, n, k, sms)
            if base is not None:
                cfgs["default"] = base
                if sweep and m == 104:
                    bm = base[0]
                    for split in (1, 2, 4, 8, 16):
                        for bn, bk, st, wp in ((128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 3, 8), (128, 64, 6, 4)):
                            if n % bn == 0 and k % (bk * split) == 0 and (bm, bn, bk, split, st, wp) != base:
                                cfgs[f"bn{bn}_bk{bk}_s{split}_st{st}_w{wp}"] = (bm, bn, bk, split, st, wp)
            for label, cfg in cfgs.items():
                try:
                    y = skinny_linear(x, ws[0], None, cfg)
                    same = torch.equal(y, skinny_linear(x, ws[0], None, cfg))
                    us = graph_us(lambda i, c=cfg: skinny_linear(x, ws[i % copies], None, c), 2 * copies)
                    r[f"triton_{label}"] = {"cfg": cfg, "us": us, "err": rel(y, ref), "deterministic": same}
                except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a crash
                    r[f"triton_{label}"] = {"cfg": cfg, "error": repr(e)[:200]}
            timed = [(lb[:-3], v) for lb, v in r.items() if lb.endswith("_us")]
            timed += [(lb, v["us"]) for lb, v in r.items() if lb.startswith("triton_") and "us" in v]
            best = min(timed, key=lambda t: t[1])
            r["best"], r["best_tbs"] = best[0], gb / best[1] * 1e6 / 1e3
            r["cublas_tbs"] = gb / r["cublas_us"] * 1e3
            out[f"{name}_m{m}"] = r
        del ws
    return out


def _pages(n_pages: int, total: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(total, generator=g)[:n_pages].to(torch.int32)


def attention(sizes=(2048, 8192, 20480), q_len: int = 100) -> dict:
    from flash_attn_interface import flash_attn_with_kvcache as fa3

    g = torch.Generator().manual_seed(0)
    out, ps, layers = {}, 16, 4
    scale = D ** -0.5
    for s in sizes:
        kv = s + q_len
        n_pages = -(-kv // ps)
        total = n_pages + 64
        kc = [torch.randn(total, ps, HK, D, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
        vc = [torch.randn(total, ps, HK, D, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
        q = torch.randn(q_len + 4, HQ, D, dtype=torch.bfloat16, device="cuda")
        pages = _pages(n_pages, total - 1, g).cuda()
        # the reference: SDPA over the gathered keys, lower-right causal
        kk = kc[0][pages.long()].view(-1, HK, D)[:kv]
        vv = vc[0][pages.long()].view(-1, HK, D)[:kv]
        mask = torch.arange(kv, device="cuda")[None, :] <= torch.arange(kv - q_len, kv, device="cuda")[:, None]
        ref = F.scaled_dot_product_attention(q[:q_len].transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                             vv.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                             enable_gqa=True)[0].transpose(0, 1)
        r = {}
        for width_kind in ("tight", "bucket"):
            width = n_pages if width_kind == "tight" else 1 << (n_pages - 1).bit_length()
            for batch in (1, 2):
                table = torch.full((batch, width), total - 1, dtype=torch.int32, device="cuda")
                table[0, :n_pages] = pages
                lens = torch.tensor([kv, 4][:batch], dtype=torch.int32, device="cuda")
                cu = torch.tensor([0, q_len, q_len + 4][:batch + 1], dtype=torch.int32, device="cuda")
                rows = cu[-1].item()
                for splits in (0, 1, 4, 8, 16):
                    if (width_kind, batch) != ("bucket", 2) and splits not in (0,):
                        continue
                    call = lambda i, t=table, ln=lens, c=cu, sp=splits: fa3(  # noqa: E731
                        q[:rows], kc[i % layers], vc[i % layers], cache_seqlens=ln, page_table=t, cu_seqlens_q=c,
                        max_seqlen_q=q_len + (4 if batch == 2 else 0), softmax_scale=scale, causal=True,
                        num_splits=sp)
                    o = call(0)
                    r[f"{width_kind}_b{batch}_splits{splits}"] = {"us": graph_us(call, 2 * layers),
                                                                   "err": rel(o[:q_len], ref)}
        r["floor_us"] = 4 * q_len * kv * HQ * D / 790e12 * 1e6
        out[f"question_{s}"] = r
        # long causal prefill of s fresh tokens: contiguous new K/V vs the same through the page table
        del kc, vc
        qf = torch.randn(s, HQ, D, dtype=torch.bfloat16, device="cuda")
        kf = torch.randn(s, HK, D, dtype=torch.bfloat16, device="cuda")
        vf = torch.randn(s, HK, D, dtype=torch.bfloat16, device="cuda")
        np_ = -(-s // ps)
        kp = torch.zeros(np_ + 8, ps, HK, D, dtype=torch.bfloat16, device="cuda")
        vp = torch.zeros_like(kp)
        pg = _pages(np_, np_ + 8, g).cuda()
        kp.view(-1, HK, D)[(pg.long()[:, None] * ps + torch.arange(ps, device="cuda")).flatten()[:s]] = kf
        vp.view(-1, HK, D)[(pg.long()[:, None] * ps + torch.arange(ps, device="cuda")).flatten()[:s]] = vf
        lens1 = torch.tensor([s], dtype=torch.int32, device="cuda")
        cu1 = torch.tensor([0, s], dtype=torch.int32, device="cuda")
        table1 = pg[None].contiguous()
        contig = lambda i: fa3(qf[None], kf[None], vf[None], softmax_scale=scale, causal=True)  # noqa: E731
        paged = lambda i: fa3(qf, kp, vp, cache_seqlens=lens1, page_table=table1, cu_seqlens_q=cu1,  # noqa: E731
                              max_seqlen_q=s, softmax_scale=scale, causal=True)
        a, b = contig(0)[0], paged(0)
        out[f"prefill_{s}"] = {"contiguous_us": graph_us(contig, 2), "paged_us": graph_us(paged, 2),
                               "rel_diff": rel(a, b), "same_bits": torch.equal(a, b),
                               "floor_us": 2 * s * s * HQ * D / 790e12 * 1e6}
        del qf, kf, vf, kp, vp
    return out


def ops(rows: int = 104) -> dict:
    """One layer's element-wise work (2 add+norm, RoPE + KV store, SiLU-mul) at `rows` rows."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    from skillkv.engine.ops import TorchOps
    from skillkv.engine.triton_ops import TritonOps
    from skillkv.model import _dummy_config

    _, cfg = _dummy_config("llama-3.1-8b")
    cfg.max_position_embeddings = 32768
    rot = LlamaRotaryEmbedding(cfg).to("cuda")
    ln = LlamaRMSNorm(H, eps=1e-5).cuda().to(torch.bfloat16)
    ln.weight.data.normal_(1, 0.1)
    pos = torch.arange(20480, 20480 + rows, device="cuda")
    slots = torch.randperm(4096, device="cuda")[:rows]
    pk = torch.zeros(256, 16, HK, D, dtype=torch.bfloat16, device="cuda")
    pv = torch.zeros_like(pk)
    qkv = torch.randn(rows, (HQ + 2 * HK) * D, dtype=torch.bfloat16, device="cuda")
    gu = torch.randn(rows, 2 * INTER, dtype=torch.bfloat16, device="cuda")
    a0, x0 = torch.randn(rows, H, dtype=torch.bfloat16, device="cuda"), torch.randn(rows, H, dtype=torch.bfloat16,
                                                                                     device="cuda")
    tri, tor = TritonOps(rot, D, 32768, torch.device("cuda")), TorchOps(rot, D)
    views = lambda t: (t[:, :HQ * D].view(rows, HQ, D), t[:, HQ * D:(HQ + HK) * D].view(rows, HK, D),  # noqa: E731
                       t[:, (HQ + HK) * D:].view(rows, HK, D))
    res = {}
    for name, o in (("triton", tri), ("torch", tor)):
        o.begin(x0, pos)

        def layer(i, o=o):
            a, x = a0.clone(), x0.clone()
            o.add_norm(a, x, ln)
            q, k, v = views(qkv)
            if hasattr(o, "rope_store"):
                o.rope_store(q, k, v, type("P", (), {"k": [pk], "v": [pv]}), 0, slots)
            else:
                qr, kr = o.rope(q, k)
                pk.view(-1, HK, D).index_copy_(0, slots, kr)
                pv.view(-1, HK, D).index_copy_(0, slots, v)
                qr.contiguous()
            o.silu_mul(gu)
            o.add_norm(a, x, ln)
        res[f"{name}_layer_us"] = graph_us(layer, 8)
    # correctness of each Triton op against the torch modules
    a, x = a0.clone(), x0.clone()
    tri.add_norm(a, x, ln)
    res["add_norm_err"] = rel(a, ln(x0 + a0))
    res["add_norm_residual_equal"] = torch.equal(x, x0 + a0)
    q, k, v = views(qkv)
    tor.begin(x0.float(), pos)  # float32 cos/sin: the reference
    qr, kr = tor.rope(q.float(), k.float())
    qt, kt = tri.rope_store(q, k, v, type("P", (), {"k": [pk], "v": [pv]}), 0, slots)
    res["rope_q_err"], res["rope_k_err"] = rel(qt, qr), rel(kt, kr)
    res["store_k_equal"] = torch.equal(pk.view(-1, HK, D)[slots], kt)
    res["store_v_equal"] = torch.equal(pv.view(-1, HK, D)[slots], v)
    res["silu_mul_err"] = rel(tri.silu_mul(gu), F.silu(gu[:, :INTER].float()) * gu[:, INTER:].float())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--parts", default="ceilings,gemm,attention,ops")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for part in parts:
        try:
            res[part] = globals()[part]()
        except Exception as e:  # noqa: BLE001 - keep the other parts' numbers
            res[part] = {"error": repr(e)[:500]}
        (args.out / "kernels.json").write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()
    print(summary(res))


def summary(res: dict) -> str:
    lines = []
    c = res.get("ceilings", {})
    if "copy_tbs" in c:
        lines.append(f"ceilings: copy {c['copy_tbs']:.2f} TB/s, read {c['read_tbs']:.2f} TB/s, "
                     f"matmul {c['matmul_tflops']:.0f} TFLOP/s")
    for key, r in res.get("gemm", {}).items():
        if isinstance(r, dict) and "cublas_us" in r:
            tri = r.get("triton_default", {})
            lines.append(f"gemm {key:>12}: cublas {r['cublas_us']:6.1f} us ({r['cublas_tbs']:.2f} TB/s), swapped "
                         f"{r['swapped_us']:6.1f}, streams2 {r['streams2_us']:6.1f}, streams4 {r['streams4_us']:6.1f}, "
                         f"triton {tri.get('us', float('nan')):6.1f}; best {r['best']} {r['best_tbs']:.2f} TB/s")
    for key, r in res.get("attention", {}).items():
        if isinstance(r, dict):
            lines.append(f"attn {key}: " + ", ".join(f"{k} {v['us']:.1f}" if isinstance(v, dict) else
                                                      f"{k} {v:.3g}" for k, v in r.items()))
    if "triton_layer_us" in res.get("ops", {}):
        o = res["ops"]
        lines.append(f"ops per layer: triton {o['triton_layer_us']:.1f} us, torch {o['torch_layer_us']:.1f} us; "
                     + ", ".join(f"{k} {v}" for k, v in o.items() if not k.endswith("_us")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
