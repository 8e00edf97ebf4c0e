"""Snapshot files: exact roundtrips, truncation/corruption/staleness detection, atomic writes, compression."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from skillkv.errors import SnapshotError
from skillkv.snapshot import FORMAT_VERSION, Snapshot, shuffle_bytes, decode, encode, read_header, read_snapshot, write_snapshot

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def make_snap(dtype=torch.float32, layers=3, kv_heads=2, tokens=7, head_dim=8, seed=0, key="k" * 32,
              fingerprint="fp-a", start=11, parent="p" * 32) -> Snapshot:
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, kv_heads, head_dim)  # NHD, as documented in skillkv.snapshot
    ks = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    vs = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    ids = torch.randint(0, 50_000, (tokens,), generator=g).tolist()
    return Snapshot(keys=ks, values=vs, token_ids=ids, fingerprint=fingerprint, key=key, skill="demo-skill",
                    content_hash="c" * 64, start=start, parent=parent)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_same(a: Snapshot, b: Snapshot) -> None:
    assert len(a.keys) == len(b.keys) and len(a.values) == len(b.values)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)
        assert torch.equal(bits(x), bits(y))  # bit-identical, also for -0.0 / NaN payloads
    assert a.token_ids == b.token_ids
    for f in ("fingerprint", "key", "skill", "content_hash", "start", "parent"):
        assert getattr(a, f) == getattr(b, f), f


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------- roundtrips


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_decode_roundtrip_is_bit_identical(dtype, compression):
    snap = make_snap(dtype)
    back = decode(encode(snap, compression))
    assert_same(snap, back)
    assert back.meta["compression"] == compression
    assert back.meta["dtype"] == str(dtype)


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_read_roundtrip_is_bit_identical(tmp_path, dtype, compression):
    snap = make_snap(dtype, seed=3)
    path = tmp_path / "s.safetensors"
    n = write_snapshot(path, snap, compression)
    assert n == path.stat().st_size
    back = read_snapshot(path, fingerprint=snap.fingerprint, key=snap.key, token_ids=snap.token_ids)
    assert_same(snap, back)
    meta = read_header(path)
    assert meta["key"] == snap.key and meta["tokens"] == str(len(snap.token_ids))


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_roundtrip(dtype, compression):
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -65504.0, 3.14159])
    t = special.repeat(4 * 2).reshape(4, 2, 8).to(dtype)  # [tokens, kv_heads, head_dim]
    snap = Snapshot(keys=[t.clone(), -t], values=[t * 2, t.clone()], token_ids=[1, 2, 3, 4], fingerprint="f",
                    key="k", skill="s", content_hash="h")
    back = decode(encode(snap, compression))
    for x, y in zip(snap.keys + snap.values, back.keys + back.values):
        assert torch.equal(bits(x), bits(y))


def test_non_contiguous_input_roundtrips():
    base = torch.randn(8, 2, 5, generator=torch.Generator().manual_seed(1))
    k = base[2:6, :, ::2]  # a strided slice of a longer cache: not contiguous
    assert not k.is_contiguous()
    snap = Snapshot(keys=[k], values=[k * 3], token_ids=[5, 6, 7, 8], fingerprint="f", key="k", skill="s",
                    content_hash="h")
    for compression in ("none", "zstd"):
        back = decode(encode(snap, compression))
        assert torch.equal(back.keys[0], k) and torch.equal(back.values[0], k * 3)


def test_unknown_compression_raises():
    with pytest.raises(SnapshotError, match="compression"):
        encode(make_snap(), "lz4")


# ---------------------------------------------------------------------------------------------- truncation, corruption


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_truncated_file_raises(tmp_path, compression):
    snap = make_snap(torch.bfloat16)
    full = tmp_path / "full.safetensors"
    write_snapshot(full, snap, compression)
    data = full.read_bytes()
    n = header_len(data)
    cuts = {"empty": 0, "in length": 3, "length only": 8, "in header": 8 + n // 2, "header only": 8 + n,
            "in data": 8 + n + (len(data) - 8 - n) // 2, "last byte missing": len(data) - 1}
    for what, cut in cuts.items():
        p = tmp_path / f"cut-{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(SnapshotError):
            read_snapshot(p)
        with pytest.raises(SnapshotError):
            decode(data[:cut])
        if cut < 8 + n:
            with pytest.raises(SnapshotError):
                read_header(p)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_flipped_byte_in_data_region_raises_checksum_error(tmp_path, compression):
    data = encode(make_snap(torch.float16), compression)
    start = 8 + header_len(data)
    rng = random.Random(0)
    offsets = {start, len(data) - 1, (start + len(data)) // 2, *(rng.randrange(start, len(data)) for _ in range(5))}
    for off in sorted(offsets):
        bad = bytearray(data)
        bad[off] ^= 0x10
        p = tmp_path / "bad.safetensors"
        p.write_bytes(bytes(bad))
        with pytest.raises(SnapshotError, match="checksum"):
            read_snapshot(p)


def test_header_claiming_more_layers_raises_snapshot_error():
    data = encode(make_snap(layers=2))
    assert b'"layers":"2"' in data
    with pytest.raises(SnapshotError):
        decode(data.replace(b'"layers":"2"', b'"layers":"3"'))


def test_wrong_format_version_raises():
    data = encode(make_snap())
    current = f'"format":"{FORMAT_VERSION}"'.encode()
    assert current in data
    with pytest.raises(SnapshotError, match="format"):
        decode(data.replace(current, f'"format":"{FORMAT_VERSION + 1}"'.encode()))


def test_expectation_mismatches_raise(tmp_path):
    snap = make_snap()
    p = tmp_path / "s.safetensors"
    write_snapshot(p, snap)
    read_snapshot(p, fingerprint="fp-a", key=snap.key, token_ids=snap.token_ids)  # the matching case reads
    with pytest.raises(SnapshotError, match="another model"):
        read_snapshot(p, fingerprint="fp-b")
    with pytest.raises(SnapshotError, match="expected"):
        read_snapshot(p, key="x" * 32)
    with pytest.raises(SnapshotError, match="stale"):
        read_snapshot(p, token_ids=snap.token_ids[:-1] + [snap.token_ids[-1] + 1])
    with pytest.raises(SnapshotError, match="stale"):
        read_snapshot(p, token_ids=snap.token_ids + [1])


def test_non_snapshot_files_raise(tmp_path):
    from safetensors.torch import save as st_save

    rng = random.Random(42)
    cases = {
        "random.bin": bytes(rng.randrange(256) for _ in range(4096)),
        "text.safetensors": b"hello, this is not a snapshot at all\n" * 10,
        "json.safetensors": struct.pack("<Q", 2) + b"{}",
        "plain.safetensors": st_save({"w": torch.zeros(3)}),  # valid safetensors, no skillkv metadata
        "other-meta.safetensors": st_save({"w": torch.zeros(3)}, metadata={"hello": "world"}),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(SnapshotError):
            read_snapshot(p)
        with pytest.raises(SnapshotError):
            read_header(p)


def test_missing_file_raises(tmp_path):
    with pytest.raises(SnapshotError, match="cannot read"):
        read_snapshot(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------- atomic writes


def test_write_leaves_no_temp_files_and_overwrites(tmp_path):
    p = tmp_path / "deep" / "dir" / "s.safetensors"
    write_snapshot(p, make_snap(seed=1))
    write_snapshot(p, make_snap(seed=2), "zstd")
    assert [x.name for x in p.parent.iterdir()] == ["s.safetensors"]
    assert_same(read_snapshot(p), make_snap(seed=2))


@pytest.mark.parametrize("fail_at", ["replace", "fsync", "encode"])
def test_failed_write_keeps_previous_file_and_no_temp(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "s.safetensors"
    write_snapshot(p, make_snap(seed=1))
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if fail_at == "encode":
        monkeypatch.setattr("skillkv.snapshot.st_save", boom)
    else:
        monkeypatch.setattr(f"skillkv.snapshot.os.{fail_at}", boom)
    with pytest.raises(OSError):
        write_snapshot(p, make_snap(seed=2), "zstd")
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert no_temp_files(tmp_path)
    assert [x.name for x in tmp_path.iterdir()] == ["s.safetensors"]


# ---------------------------------------------------------------------------------------------- compression


def test_zstd_shuffle_shrinks_smooth_bf16():
    import zstandard

    n = 4 * 256 * 64
    smooth = torch.sin(torch.arange(n, dtype=torch.float32) / 50).reshape(256, 4, 64).to(torch.bfloat16)
    snap = Snapshot(keys=[smooth.clone(), smooth * 0.5], values=[smooth * 2, -smooth], token_ids=list(range(256)),
                    fingerprint="f", key="k", skill="s", content_hash="h")
    raw_size, zstd_size = len(encode(snap, "none")), len(encode(snap, "zstd"))
    assert zstd_size < raw_size / 4
    c = zstandard.ZstdCompressor(level=3)
    unshuffled = len(c.compress(smooth.view(torch.uint8).numpy().tobytes()))
    assert len(c.compress(shuffle_bytes(smooth))) < unshuffled  # the byte-plane shuffle itself helps


def test_metadata_is_all_strings_and_describes_the_snapshot():
    snap = make_snap(torch.bfloat16, layers=2, kv_heads=3, tokens=5, head_dim=4)
    meta = decode(encode(snap, "zstd")).meta
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["shape"]) == [5, 3, 4]
    assert meta["layers"] == "2" and meta["tokens"] == "5" and meta["start"] == "11"
    assert meta["skill"] == "demo-skill" and meta["fingerprint"] == "fp-a"
