"""Micro-benchmark of the L2 -> host path on this machine (no GPU needed): disk, crc, zstd, the L2 reader.

    python -m skillkv.measure.bench_tiers [--tokens 2048] [--threads 1,2,4] [--out DIR]

Builds a snapshot of the Llama-3.1-8B KV shape (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token) of
random-normal KV (as `dummy:` weights produce; real KV compresses better), writes it uncompressed and with zstd,
and measures, page cache dropped (posix_fadvise DONTNEED) before every cold read:
  disk            raw cold read of the uncompressed file into a host buffer, N threads of 16 MiB preads
  crc32           zlib.crc32 over the KV bytes, N threads (one tensor per task)
  zstd            decode of the snapshot's frames into host tensors (snapshot.unzstd_into), N threads, per level;
                  and the same frames without the byte-plane shuffle (plain decompress) for comparison
  l2_none/zstd    L2Reader.read(...).wait_all(): cold file -> host buffer, crc per tensor (and decode), N threads
  old_none/zstd   the previous path, snapshot.decode(path.read_bytes()) (one read, then crc, then decode)
Prints a table and writes tiers.json. Numbers on a shared machine are noisy: rerun on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _best(fn, reps: int) -> float:
    """Median seconds of `reps` runs of fn() (fn does its own cold-cache preparation outside the timing)."""
    out = []
    for _ in range(reps):
        out.append(fn())
    return statistics.median(out)


def _real_kv(tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """bf16 KV [tokens, kv_heads, head_dim] per layer of the default model over the repository's skills."""
    from transformers import DynamicCache

    from skillkv.model import resolve_model

    h = resolve_model("default", device="cpu")
    model = h.load()
    root = Path(__file__).resolve().parents[2] / "skills"
    text = "\n\n".join(p.read_text() for p in sorted(root.glob("*/SKILL.md")))
    ids = h.tokenizer(text)["input_ids"][:tokens]
    import inspect

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), use_cache=True, **{kw: cache})
    ks = [layer.keys[0].transpose(0, 1).contiguous().to(torch.bfloat16) for layer in cache.layers]
    vs = [layer.values[0].transpose(0, 1).contiguous().to(torch.bfloat16) for layer in cache.layers]
    return ks, vs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--levels", default="1,3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the test snapshots (the disk to test)")
    ap.add_argument("--real", action="store_true", help="KV of the real default model over the repository's "
                    "skills (in bf16) instead of random-normal KV of the 8B shape")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    import zstandard

    from skillkv.tiers.l2_reader import L2Reader
    from skillkv.tiers.policy import drop_page_cache, disk_gbs
    from skillkv.snapshot import Snapshot, shuffle_bytes, decode, unzstd_into, write_snapshot

    if args.real:
        ks, vs = _real_kv(args.tokens)
    else:
        g = torch.Generator().manual_seed(0)
        shape = (args.tokens, 8, 128)
        ks = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(args.layers)]
        vs = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(args.layers)]
    shape, args.layers, args.tokens = tuple(ks[0].shape), len(ks), ks[0].shape[0]
    snap = Snapshot(keys=ks, values=vs, token_ids=list(range(args.tokens)), fingerprint="bench", key="k" * 32,
                    skill="bench", content_hash="-")
    kv_bytes = snap.nbytes
    res = {"source": "real default model" if args.real else "random normal, 8B shape", "tokens": args.tokens,
           "kv_bytes": kv_bytes, "cpu_count": os.cpu_count(), "threads": threads,
           "load_avg_start": os.getloadavg()[0], "rows": {}}
    rows = res["rows"]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        paths = {c: Path(d) / f"{c}.safetensors" for c in ("none", "zstd")}
        for c, p in paths.items():
            write_snapshot(p, snap, c)
        res["file_bytes"] = {c: p.stat().st_size for c, p in paths.items()}
        print(f"KV {kv_bytes / 1e6:.0f} MB ({res['source']}: {args.tokens} tokens, {args.layers} layers, bf16); "
              f"zstd file "
              f"{res['file_bytes']['zstd'] / res['file_bytes']['none']:.3f} of raw", file=sys.stderr)

        tensors = [t.view(torch.uint8).numpy() for t in ks + vs]
        for t in threads:
            rows[f"disk {t}"] = disk_gbs(paths["none"], t, reps=args.reps)
            with ThreadPoolExecutor(t) as ex:
                def crc():
                    t0 = time.perf_counter()
                    list(ex.map(zlib.crc32, tensors))
                    return time.perf_counter() - t0
                rows[f"crc32 {t}"] = kv_bytes / _best(crc, args.reps) / 1e9

        # zstd decode per level and thread count, with and without the byte-plane shuffle
        outs = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(2 * args.layers)]
        for o in outs:
            o.fill_(0)
        for level in [int(x) for x in args.levels.split(",")]:
            cctx = zstandard.ZstdCompressor(level=level)
            frames = [cctx.compress(shuffle_bytes(t)) for t in ks + vs]
            plain = [cctx.compress(t.view(torch.uint8).numpy().tobytes()) for t in ks + vs]
            rows[f"zstd L{level} ratio"] = sum(map(len, frames)) / kv_bytes
            rows[f"zstd L{level} ratio, no shuffle"] = sum(map(len, plain)) / kv_bytes
            for t in threads:
                with ThreadPoolExecutor(t) as ex:
                    def dec():
                        t0 = time.perf_counter()
                        list(ex.map(unzstd_into, frames, outs))
                        return time.perf_counter() - t0

                    def dec_plain():
                        def one(f, o):
                            dctx = zstandard.ZstdDecompressor()
                            with dctx.stream_reader(f) as r:
                                r.readinto(memoryview(o.view(torch.uint8).numpy()).cast("B"))
                        t0 = time.perf_counter()
                        list(ex.map(one, plain, outs))
                        return time.perf_counter() - t0
                    rows[f"zstd L{level} decode {t}"] = kv_bytes / _best(dec, args.reps) / 1e9
                    rows[f"zstd L{level} decode no-shuffle {t}"] = kv_bytes / _best(dec_plain, args.reps) / 1e9
        assert torch.equal(outs[0].view(torch.uint8), ks[0].view(torch.uint8))
        del outs

        # the L2 reader, cold, per thread count, into a reused (already faulted-in) host buffer as the GPU path's
        # caching pinned allocator provides, and into a fresh one (page faults included); and the previous path
        reused = torch.empty(kv_bytes, dtype=torch.uint8)
        reused.fill_(0)
        for t in threads:
            reader = L2Reader(threads=t, pin=False)
            for c, p in paths.items():
                for buf in ("reused", "fresh"):
                    def l2():
                        drop_page_cache(p)
                        t0 = time.perf_counter()
                        kv = reader.read(p, fingerprint="bench",
                                         alloc=(lambda n: reused[:n]) if buf == "reused" else None).wait_all()
                        dt = time.perf_counter() - t0
                        assert torch.equal(kv.values[-1].view(torch.uint8), vs[-1].view(torch.uint8))
                        return dt
                    sec = _best(l2, args.reps)
                    tag = f"l2_{c} {t}" + (" fresh buffer" if buf == "fresh" else "")
                    rows[f"{tag} ms"] = sec * 1e3
                    rows[f"{tag} file GB/s"] = res["file_bytes"][c] / sec / 1e9
                    rows[f"{tag} KV GB/s"] = kv_bytes / sec / 1e9
            reader.close()
        for c, p in paths.items():
            def old():
                drop_page_cache(p)
                t0 = time.perf_counter()
                decode(p.read_bytes(), p.name)
                return time.perf_counter() - t0
            rows[f"old_{c} ms"] = _best(old, args.reps) * 1e3
    res["load_avg_end"] = os.getloadavg()[0]
    for k, v in rows.items():
        print(f"{k:32s} {v:10.3f}")
    print(f"load average {res['load_avg_start']:.2f} -> {res['load_avg_end']:.2f} (of {os.cpu_count()} cores)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tiers.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
