"""Tier policy: load a snapshot's KV from a tier only when that is faster than recomputing it.

Decisions come from numbers measured once per model and machine (`measure`), cached in the store as
`<store>/<model-tag>/tiers.json`:
  disk_gbs         cold read of a snapshot-sized file into host memory, reader threads as the L2 reader uses
  cached_gbs       the same read of a file the OS page cache holds (a snapshot compiled or read recently)
  h2d_gbs          pinned host -> device copy (on the CPU: a host memcpy)
  zstd_gbs         zstd decode of KV-like data, decoded bytes per second over the reader threads
  prefill          [(tokens, seconds)] of the model prefilling that many tokens from scratch
  bytes_per_token  KV bytes per token

Estimates (seconds) for a snapshot of `tokens` tokens, `kv` = tokens * bytes_per_token, `file` its size:
  host           kv / h2d
  l2, none       max(file / disk, kv / h2d)                 (pipelined: reads, checks and copies overlap; `disk`
                                                            is cached_gbs for a file the page cache holds, asked
                                                            of the kernel with mincore)
  l2, zstd       max(file / disk, kv / zstd, kv / h2d)
  recompute      prefill time interpolated linearly between measured points (extrapolated from the last two)
A tier is chosen when its estimate times `margin` is below the recompute estimate.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from skillkv.lazy import torch
TIERS = ("host", "l2")


@dataclass
class Measurements:
    device: str
    bytes_per_token: int
    disk_gbs: float
    h2d_gbs: float
    zstd_gbs: float
    prefill: list[list[float]] = field(default_factory=list)  # [[tokens, seconds], ...] ascending
    cached_gbs: float = 0.0  # 0: not measured (older tiers.json): a cached file is read at disk_gbs
    measured_at: float = 0.0

    def recompute_seconds(self, tokens: int) -> float:
        pts = sorted(self.prefill)
        if not pts:
            return float("inf")
        pts = [[0.0, 0.0]] + pts if pts[0][0] > 0 else pts
        for (t0, s0), (t1, s1) in zip(pts, pts[1:]):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / max(t1 - t0, 1e-9)
        (t0, s0), (t1, s1) = pts[-2], pts[-1]
        return s1 + (s1 - s0) * (tokens - t1) / max(t1 - t0, 1e-9)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Measurements:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class TierPolicy:
    """Per snapshot: load it from `tier` ("host" or "l2") or recompute it (see the module docstring)."""

    def __init__(self, m: Measurements, margin: float = 1.0):
        self.m, self.margin = m, margin

    def load_seconds(self, tier: str, tokens: int, file_bytes: int | None = None, compression: str = "none",
                     cached: bool = False) -> float:
        """Estimated seconds to load `tokens` from `tier`; `cached`: the L2 file is in the OS page cache."""
        m = self.m
        kv = tokens * m.bytes_per_token
        h2d = kv / (m.h2d_gbs * 1e9)
        if tier == "host":
            return h2d
        if tier != "l2":
            raise ValueError(f"unknown tier {tier!r} (choose from {', '.join(TIERS)})")
        file_bytes = kv if file_bytes is None else file_bytes
        rate = m.cached_gbs if cached and m.cached_gbs > 0 else m.disk_gbs
        parts = [file_bytes / (rate * 1e9), h2d]
        if compression == "zstd":
            parts.append(kv / (m.zstd_gbs * 1e9))
        return max(parts)

    def should_load(self, tier: str, tokens: int, file_bytes: int | None = None, compression: str = "none") -> bool:
        return self.load_seconds(tier, tokens, file_bytes, compression) * self.margin < self.m.recompute_seconds(tokens)

    def crossover(self, tier: str, compression: str = "none", ratio: float = 1.0, limit: int = 1 << 20) -> int | None:
        """The smallest token count (power-of-two steps, then bisection) from which loading from `tier` beats
        recomputing, for files of `ratio` x the raw KV size; None if it never does up to `limit`."""
        def wins(n):
            return self.should_load(tier, n, int(n * self.m.bytes_per_token * ratio), compression)
        n = 1
        while n <= limit and not wins(n):
            n *= 2
        if n > limit:
            return None
        lo = n // 2
        while lo + 1 < n:
            mid = (lo + n) // 2
            lo, n = (lo, mid) if wins(mid) else (mid, n)
        return n


# ---------------------------------------------------------------------------------------------- measuring


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float:
    """The fraction of `path`'s pages the OS page cache holds (Linux mincore), 0.0 where it cannot be asked."""
    import ctypes
    import mmap

    try:
        size = os.path.getsize(path)
        if not size:
            return 1.0
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private: writable for ctypes, never written
        try:
            page = mmap.PAGESIZE
            buf = (ctypes.c_char * size).from_buffer(mm)
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
            del buf
            return sum(v & 1 for v in vec) / len(vec) if rc == 0 else 0.0
        finally:
            mm.close()
    except (OSError, ValueError, AttributeError):
        return 0.0


def disk_gbs(path: Path, threads: int = 4, chunk: int = 16 << 20, reps: int = 3, cold: bool = True) -> float:
    """Median read bandwidth of `path` into a host buffer, `threads` readers of `chunk`-byte reads: from the disk
    (page cache dropped first), or with `cold=False` from the page cache (read once before)."""
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8)
    buf.fill_(0)  # fault the pages in: measure the disk, not page faults
    mv = memoryview(buf.numpy())
    out = []
    for _ in range(reps):
        if cold:
            drop_page_cache(path)
        fd = os.open(path, os.O_RDONLY)
        t0 = time.perf_counter()

        def rd(off):
            got = 0
            while got < min(chunk, size - off):
                k = os.preadv(fd, [mv[off + got:min(size, off + chunk)]], off + got)
                if k <= 0:
                    break
                got += k
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(rd, range(0, size, chunk)))
        out.append(size / (time.perf_counter() - t0) / 1e9)
        os.close(fd)
    return statistics.median(out)


def h2d_gbs(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Pinned host -> device copy bandwidth (host memcpy on the CPU)."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = []
    for _ in range(reps + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(device)
        out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(out[1:])


def zstd_gbs(dtype: torch.dtype | None = None, nbytes: int = 128 << 20, threads: int = 4,
             tensor_bytes: int = 8 << 20) -> tuple[float, float]:
    """(decoded GB/s over `threads` threads, compression ratio) of snapshot-style frames (byte-plane shuffled,
    one frame per tensor) of random-normal data in `dtype`: the L2 reader's decode path."""
    import zstandard

    dtype = dtype or torch.bfloat16

    from skillkv.snapshot import ZSTD_LEVEL, shuffle_bytes, unzstd_into

    g = torch.Generator().manual_seed(0)
    n = tensor_bytes // torch.empty((), dtype=dtype).element_size()
    t = torch.randn(n, generator=g).to(dtype)
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(shuffle_bytes(t))
    count = max(1, nbytes // tensor_bytes)
    outs = [torch.empty(n, dtype=dtype) for _ in range(min(count, 2 * threads))]
    for o in outs:
        o.fill_(0)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda o: unzstd_into(frame, o), outs))  # warm the per-thread buffers
        t0 = time.perf_counter()
        list(ex.map(lambda i: unzstd_into(frame, outs[i % len(outs)]), range(count)))
        dt = time.perf_counter() - t0
    assert torch.equal(outs[0].view(torch.uint8), t.view(torch.uint8))
    return count * tensor_bytes / dt / 1e9, len(frame) / tensor_bytes


def prefill_points(runner, sizes: list[int], reps: int = 2, vocab: int = 256) -> list[list[float]]:
    """[(tokens, median seconds)] of the runner (runners/base.Runner) prefilling `sizes` random tokens from an empty
    prefix."""
    cuda = runner.device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    pts = []
    for n in sizes:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        times = []
        for _ in range(reps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            seq = runner.open(None)
            runner.prefill([seq], [ids])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            runner.release(seq)
        pts.append([float(n), statistics.median(times[1:])])
    return pts


def measure(runner, sizes: list[int], bytes_per_token: int, kv_dtype: torch.dtype, tmp_dir: Path | None = None,
            threads: int = 4, file_bytes: int = 256 << 20, zstd_bytes: int = 128 << 20,
            vocab: int = 256) -> Measurements:
    """Measure every number the policy needs, for this runner's model and machine (`file_bytes` of disk reads
    in `tmp_dir`, which should be on the store's disk; `zstd_bytes` decoded)."""
    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        p = Path(d) / "probe.bin"
        with open(p, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(max(1, file_bytes >> 20)):
                f.write(block)
        disk = disk_gbs(p, threads)
        cached = disk_gbs(p, threads, cold=False)
    zgbs, _ = zstd_gbs(kv_dtype, nbytes=zstd_bytes, threads=threads, tensor_bytes=min(8 << 20, zstd_bytes))
    return Measurements(device=device_name(runner.device), bytes_per_token=bytes_per_token, disk_gbs=disk,
                        cached_gbs=cached,
                        h2d_gbs=h2d_gbs(runner.device), zstd_gbs=zgbs,
                        prefill=prefill_points(runner, sizes, vocab=vocab), measured_at=time.time())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def load_cached(path: Path, device: str) -> Measurements | None:
    """Measurements cached at `path` for `device`, or None (missing, unreadable, or another device)."""
    try:
        m = Measurements.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return m if m.device == device else None


def save(path: Path, m: Measurements) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(m.to_json(), indent=1))
    os.replace(tmp, path)


def policy_for(runner, store, bytes_per_token: int, kv_dtype: torch.dtype, sizes: list[int] = (512, 2048),
               remeasure: bool = False, **kw) -> TierPolicy:
    """The policy for this runner's model, from `<store>/<tag>/tiers.json` (measured and saved when missing,
    taken on another device, or `remeasure`)."""
    path = Path(store.dir) / "tiers.json"
    m = None if remeasure else load_cached(path, device_name(runner.device))
    if m is None:
        kw.setdefault("tmp_dir", Path(store.dir))
        Path(store.dir).mkdir(parents=True, exist_ok=True)
        m = measure(runner, list(sizes), bytes_per_token, kv_dtype, **kw)
        save(path, m)
    return TierPolicy(m)
