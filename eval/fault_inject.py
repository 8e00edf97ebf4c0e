"""Faults for `make faults` (eval/faults.py): damage done to one snapshot file or to the index of a store.

Each fault takes (model dir of the store, the victim's file name, a random source, a context of extra files) and
changes files in that folder only, as a crash, a disk, a careless user or an attacker could. They know the layout
the store documents (index.json, snapshots/<skill>-<key>.safetensors) and the safetensors framing (8-byte header
length, JSON header, tensor data), nothing else.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path


def _snap(d: Path, name: str) -> Path:
    return d / "snapshots" / name


def _header_span(p: Path) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    return 8, 8 + n


def _flip(p: Path, lo: int, hi: int, rng: random.Random) -> None:
    data = bytearray(p.read_bytes())
    i = rng.randrange(lo, hi)
    data[i] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(data))


def truncate(d, name, rng, ctx):
    p = _snap(d, name)
    size = p.stat().st_size
    os.truncate(p, rng.randrange(0, size))


def bitflip_header(d, name, rng, ctx):
    p = _snap(d, name)
    _flip(p, *_header_span(p), rng)


def bitflip_data(d, name, rng, ctx):
    p = _snap(d, name)
    _flip(p, _header_span(p)[1], p.stat().st_size, rng)


def bitflip_checksums(d, name, rng, ctx):
    """Flip a digit inside the header's recorded crc32 list (the checksums, not the data)."""
    p = _snap(d, name)
    data = bytearray(p.read_bytes())
    lo = data.index(b'"checksums"')
    digits = [i for i in range(lo, _header_span(p)[1]) if 48 <= data[i] <= 57][:400]
    i = rng.choice(digits)
    data[i] = 48 + (data[i] - 48 + rng.randrange(1, 10)) % 10
    p.write_bytes(bytes(data))


def append_bytes(d, name, rng, ctx):
    with open(_snap(d, name), "ab") as f:
        f.write(os.urandom(rng.randrange(1, 4096)))


def empty_file(d, name, rng, ctx):
    _snap(d, name).write_bytes(b"")


def foreign(d, name, rng, ctx):
    """Another skill's snapshot (same model) under this one's name."""
    others = [p for p in (d / "snapshots").glob("*.safetensors") if p.name != name]
    _snap(d, name).write_bytes(rng.choice(others).read_bytes())


def other_model(d, name, rng, ctx):
    """A snapshot made by another model (ctx["other_model_file"]) under this one's name."""
    _snap(d, name).write_bytes(Path(ctx["other_model_file"]).read_bytes())


def delete_index(d, name, rng, ctx):
    (d / "index.json").unlink()


def corrupt_index(d, name, rng, ctx):
    p = d / "index.json"
    data = p.read_bytes()
    cut = rng.randrange(0, len(data))
    p.write_bytes(data[:cut] + os.urandom(rng.randrange(0, 64)))


def _edit_entry(d: Path, name: str, **changes) -> None:
    p = d / "index.json"
    raw = json.loads(p.read_text())
    for e in raw["entries"].values():
        if e["file"] == name:
            e.update(changes)
    p.write_text(json.dumps(raw))


def index_absolute_path(d, name, rng, ctx):
    _edit_entry(d, name, file=str(ctx["sentinel_file"]))


def index_dotdot_path(d, name, rng, ctx):
    rel = os.path.relpath(ctx["sentinel_file"], d / "snapshots")
    _edit_entry(d, name, file=rel)


def index_other_file(d, name, rng, ctx):
    others = sorted(p.name for p in (d / "snapshots").glob("*.safetensors") if p.name != name)
    _edit_entry(d, name, file=rng.choice(others))


def index_wrong_types(d, name, rng, ctx):
    _edit_entry(d, name, tokens="many", bytes=None, file=["x"])


def symlink_outside(d, name, rng, ctx):
    """The snapshot file replaced by a link to a copy of it outside the store."""
    p = _snap(d, name)
    copy = Path(ctx["outside_dir"]) / f"copy-{rng.randrange(1 << 30)}-{name}"
    copy.write_bytes(p.read_bytes())
    p.unlink()
    p.symlink_to(copy)


def symlink_sentinel(d, name, rng, ctx):
    p = _snap(d, name)
    p.unlink()
    p.symlink_to(ctx["sentinel_file"])


FAULTS = {f.__name__: f for f in (truncate, bitflip_header, bitflip_data, bitflip_checksums, append_bytes,
                                  empty_file, foreign, other_model, delete_index, corrupt_index, index_absolute_path,
                                  index_dotdot_path, index_other_file, index_wrong_types, symlink_outside,
                                  symlink_sentinel)}
