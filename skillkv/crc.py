"""crc32 of snapshot bytes: zlib-ng's when installed (the same checksum as zlib's; 28.8 vs 6.6 GB/s on the 2-core
AMD EPYC of docs/BENCHMARKS.md, so verifying the 86 MB of a 1,839-token snapshot takes 3 instead of 13 ms), else
zlib's. Every snapshot read and write checksums every byte (skillkv/snapshot.py, skillkv/tiers/l2_reader.py)."""

from __future__ import annotations

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the zlib-ng wheel is a dependency; an environment without it is only slower
    from zlib import crc32

__all__ = ["crc32"]
