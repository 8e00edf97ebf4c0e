"""The store never touches a path outside itself (issue 12): tampered index entries, symlinked snapshots, temp files
of dead writers, appended bytes, wrongly typed headers, and the one permission policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_store import FP_A, TAG, make_snap

from skillkv.errors import SnapshotError
from skillkv.snapshot import read_snapshot
from skillkv.store import Store


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store", TAG, FP_A)


def outside_files(tmp_path):
    """A sentinel folder beside the store, and its contents."""
    d = tmp_path / "outside"
    d.mkdir(exist_ok=True)
    (d / "precious.txt").write_text("do not delete\n")
    return d, {p.name: p.read_bytes() for p in d.iterdir()}


def tamper(store: Store, key: str, file: str) -> None:
    raw = json.loads((store.dir / "index.json").read_text())
    raw["entries"][key]["file"] = file
    (store.dir / "index.json").write_text(json.dumps(raw))
    store._index = None


@pytest.mark.parametrize("how", ["absolute", "dotdot", "other-name", "subdir"])
def test_a_tampered_index_path_is_never_unlinked(tmp_path, store, how):
    d, before = outside_files(tmp_path)
    snap = make_snap("alpha")
    store.put(snap)
    other = store.put(make_snap("beta", seed=1))
    target = {"absolute": str(d / "precious.txt"), "dotdot": "../../outside/precious.txt",
              "other-name": other.file, "subdir": "x/precious.txt"}[how]
    tamper(store, snap.key, target)
    fresh = Store(store.root, TAG, FP_A)
    e = fresh.entries()[snap.key]
    assert e.file == f"alpha-{snap.key}.safetensors"  # the index was rebuilt from the files
    fresh.remove([snap.key])
    fresh.gc(live_keys=set())
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not fresh.contains(snap.key) and not fresh.contains(other.key)


def test_entries_with_wrong_types_rebuild_the_index(store):
    snap = make_snap("alpha")
    store.put(snap)
    raw = json.loads((store.dir / "index.json").read_text())
    raw["entries"][snap.key]["tokens"] = "6; rm -rf /"
    raw["entries"]["../../x"] = dict(raw["entries"][snap.key], key="../../x")
    (store.dir / "index.json").write_text(json.dumps(raw))
    fresh = Store(store.root, TAG, FP_A)
    assert set(fresh.entries()) == {snap.key} and fresh.entries()[snap.key].tokens == 6


def test_a_symlinked_snapshot_is_neither_read_nor_unlinked_through(tmp_path, store):
    d, before = outside_files(tmp_path)
    snap = make_snap("alpha")
    e = store.put(snap)
    real = store.snap_dir / e.file
    moved = d / "moved.safetensors"
    os.replace(real, moved)
    real.symlink_to(moved)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    fresh = Store(store.root, TAG, FP_A)
    assert not fresh.contains(snap.key)
    with pytest.raises(SnapshotError, match="link"):
        fresh.get(snap.key)
    fresh.remove([snap.key])
    fresh.gc(live_keys=set())
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert Store(store.root, TAG, FP_A)._rebuild() == {}  # a link is not rebuilt into the index


def test_temp_files_of_dead_writers_are_removed_at_the_next_write(store):
    store.put(make_snap("alpha"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    dead_tmp = store.snap_dir / f".tmp-{dead}-abcd1234.safetensors"
    dead_idx = store.dir / f".index-{dead}.tmp"
    live_tmp = store.snap_dir / f".tmp-{os.getppid()}-abcd1234.safetensors"  # a live writer's: kept
    unknown = store.snap_dir / ".tmp-qwerty.safetensors"  # no pid: kept until it is an hour old
    for p in (dead_tmp, dead_idx, live_tmp, unknown):
        p.write_bytes(b"partial")
    store.put(make_snap("beta", seed=1))
    assert not dead_tmp.exists() and not dead_idx.exists()
    assert live_tmp.exists() and unknown.exists()
    os.utime(unknown, (0, 0))
    store.put(make_snap("gamma", seed=2))
    assert not unknown.exists() and live_tmp.exists()


def test_appended_bytes_are_corruption(store):
    snap = make_snap("alpha")
    e = store.put(snap)
    path = store.snap_dir / e.file
    read_snapshot(path, fingerprint=FP_A)
    with open(path, "ab") as f:
        f.write(b"\0" * 7)
    with pytest.raises(SnapshotError, match="after its last tensor"):
        read_snapshot(path, fingerprint=FP_A)
    with pytest.raises(SnapshotError):
        store.get(snap.key)


@pytest.mark.parametrize("field,value", [("fingerprint", 123), ("tokens", [6]), ("shape", {"a": 1}),
                                         ("checksums", 7), ("skill", None)])
def test_headers_with_wrong_types_give_snapshot_error(tmp_path, store, field, value):
    import struct

    snap = make_snap("alpha")
    e = store.put(snap)
    path = store.snap_dir / e.file
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"][field] = value
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    fixed = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    path.write_bytes(fixed)
    with pytest.raises(SnapshotError):
        read_snapshot(path, fingerprint=FP_A)
    fresh = Store(store.root, TAG, FP_A)
    assert snap.key not in fresh._rebuild() or field in ("tokens", "shape", "checksums", "fingerprint")


def test_store_files_follow_the_umask(store):
    old = os.umask(0o027)
    try:
        e = store.put(make_snap("alpha"))
    finally:
        os.umask(old)
    snap_mode = (store.snap_dir / e.file).stat().st_mode & 0o777
    index_mode = (store.dir / "index.json").stat().st_mode & 0o777
    assert snap_mode == index_mode == 0o640
