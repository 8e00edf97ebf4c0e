"""The snapshot store: put/get/remove, the index as a rebuildable cache, gc, writability, keys, invariants."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import pytest
import torch

from skillkv.errors import SnapshotError, StoreError
from skillkv.snapshot import Snapshot, read_header
from skillkv.store import Store, snapshot_key

FP_A = "a" * 64
FP_B = "b" * 64
TAG = "dummy-tiny-aaaaaaaaaaaaaaaa"


def make_snap(skill: str, content: str = "", parent: str = "", fp: str = FP_A, tokens: int = 6,
              seed: int = 0) -> Snapshot:
    content_hash = hashlib.sha256((content or skill).encode()).hexdigest()
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, 2, 4)  # [tokens, kv_heads, head_dim]
    return Snapshot(keys=[torch.randn(shape, generator=g) for _ in range(2)],
                    values=[torch.randn(shape, generator=g) for _ in range(2)],
                    token_ids=list(range(100, 100 + tokens)), fingerprint=fp,
                    key=snapshot_key(fp, parent, content_hash), skill=skill, content_hash=content_hash,
                    start=10, parent=parent)


def snapshot_files(store: Store) -> set[str]:
    return {p.name for p in store.snap_dir.iterdir()} if store.snap_dir.is_dir() else set()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store", TAG, FP_A)


# ---------------------------------------------------------------------------------------------- basics


def test_put_get_contains_remove(store):
    snap = make_snap("alpha")
    assert not store.contains(snap.key)
    entry = store.put(snap)
    assert store.contains(snap.key)
    path = store.snap_dir / entry.file
    assert entry.file == f"alpha-{snap.key}.safetensors"
    assert entry.bytes == path.stat().st_size
    assert (entry.skill, entry.content_hash, entry.parent, entry.start, entry.tokens) == (
        "alpha", snap.content_hash, "", 10, 6)

    got = store.get(snap.key, token_ids=snap.token_ids)
    for a, b in zip(snap.keys + snap.values, got.keys + got.values):
        assert torch.equal(a, b)
    with pytest.raises(SnapshotError, match="stale"):
        store.get(snap.key, token_ids=[1, 2, 3])

    assert store.remove([snap.key]) == entry.bytes
    assert not store.contains(snap.key)
    assert not path.exists()
    with pytest.raises(SnapshotError, match="not in the store"):
        store.get(snap.key)
    assert store.remove([snap.key, "never-existed"]) == 0


def test_contains_is_false_when_the_file_vanished(store):
    snap = make_snap("alpha")
    entry = store.put(snap)
    (store.snap_dir / entry.file).unlink()
    assert not store.contains(snap.key)


def test_get_detects_a_corrupted_file(store):
    snap = make_snap("alpha")
    entry = store.put(snap)
    path = store.snap_dir / entry.file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        store.get(snap.key)


def test_get_refreshes_last_use(store):
    entry = store.put(make_snap("alpha"))
    path = store.snap_dir / entry.file
    old = time.time() - 1000
    os.utime(path, (old, old))
    store.get(entry.key)
    assert store.last_used(entry) > old + 900


# ---------------------------------------------------------------------------------------------- index


def test_index_survives_restart(store, monkeypatch):
    e1, e2 = store.put(make_snap("alpha")), store.put(make_snap("beta"), "zstd")
    assert (store.dir / "index.json").is_file()

    def no_rebuild(self):
        raise AssertionError("index.json should have been read, not rebuilt")

    monkeypatch.setattr(Store, "_rebuild", no_rebuild)
    again = Store(store.root, TAG, FP_A)
    assert again.entries() == {e1.key: e1, e2.key: e2}
    assert again.contains(e1.key) and again.contains(e2.key)
    assert again.get(e2.key).skill == "beta"


@pytest.mark.parametrize("damage", ["delete", "garbage", "empty", "json-list", "missing-fields", "truncated"])
def test_missing_or_corrupted_index_is_rebuilt_from_headers(store, damage):
    snaps = [make_snap("alpha"), make_snap("beta", parent="p" * 32), make_snap("gamma", tokens=3)]
    entries = {s.key: store.put(s, "zstd" if s.skill == "beta" else "none") for s in snaps}
    index = store.dir / "index.json"
    good = index.read_text()
    if damage == "delete":
        index.unlink()
    else:
        index.write_text({"garbage": "\x00\x01not json{{", "empty": "", "json-list": "[1, 2]",
                          "missing-fields": json.dumps({"entries": {"x": {"key": "x"}}}),
                          "truncated": good[: len(good) // 2]}[damage])

    again = Store(store.root, TAG, FP_A)
    rebuilt = again.entries()
    assert set(rebuilt) == set(entries)
    for key, e in entries.items():
        r = rebuilt[key]
        assert (r.file, r.skill, r.content_hash, r.parent, r.start, r.tokens, r.bytes, r.compression) == (
            e.file, e.skill, e.content_hash, e.parent, e.start, e.tokens, e.bytes, e.compression)
        assert again.get(key).key == key

    # the next update writes a complete, valid index again
    extra = again.put(make_snap("delta"))
    on_disk = json.loads(index.read_text())["entries"]
    assert set(on_disk) == set(entries) | {extra.key}


def test_rebuild_ignores_other_fingerprints_and_unreadable_files(tmp_path):
    mine = Store(tmp_path, TAG, FP_A)
    theirs = Store(tmp_path, TAG, FP_B)  # same folder, another model
    a = mine.put(make_snap("alpha"))
    b = theirs.put(make_snap("alpha", fp=FP_B))
    assert a.key != b.key
    (mine.snap_dir / "junk-0123.safetensors").write_bytes(b"not a snapshot")
    (mine.dir / "index.json").unlink()

    assert set(Store(tmp_path, TAG, FP_A).entries()) == {a.key}
    assert set(Store(tmp_path, TAG, FP_B).entries()) == {b.key}


# ---------------------------------------------------------------------------------------------- gc


def test_gc_removes_keys_that_are_not_live(store):
    a, b, c = (store.put(make_snap(n)) for n in ("alpha", "beta", "gamma"))
    removed, freed = store.gc({a.key, c.key})
    assert [e.key for e in removed] == [b.key]
    assert freed == b.bytes
    assert set(store.entries()) == {a.key, c.key}
    assert snapshot_files(store) == {a.file, c.file}


def test_gc_evicts_least_recently_used_beyond_max_bytes(store):
    a, b, c = (store.put(make_snap(n)) for n in ("alpha", "beta", "gamma"))
    now = time.time()
    for e, age in ((a, 300), (b, 100), (c, 200)):  # LRU order: a, c, b
        os.utime(store.snap_dir / e.file, (now - age, now - age))
    live = {a.key, b.key, c.key}

    removed, _ = store.gc(live, max_bytes=a.bytes + b.bytes + c.bytes)
    assert removed == []

    removed, freed = store.gc(live, max_bytes=b.bytes + c.bytes)
    assert [e.key for e in removed] == [a.key] and freed == a.bytes

    removed, _ = store.gc(live, max_bytes=b.bytes)
    assert [e.key for e in removed] == [c.key]
    assert set(store.entries()) == {b.key}
    assert snapshot_files(store) == {b.file}
    assert store.size_bytes() <= b.bytes


def test_gc_stale_entries_do_not_count_against_the_budget(store):
    a, b, c = (store.put(make_snap(n)) for n in ("alpha", "beta", "gamma"))
    now = time.time()
    for e, age in ((a, 300), (b, 200), (c, 100)):
        os.utime(store.snap_dir / e.file, (now - age, now - age))
    removed, _ = store.gc({b.key, c.key}, max_bytes=b.bytes + c.bytes)  # a is stale, b and c fit
    assert [e.key for e in removed] == [a.key]
    assert set(store.entries()) == {b.key, c.key}


def test_gc_lru_follows_reads(store):
    a, b = store.put(make_snap("alpha")), store.put(make_snap("beta"))
    now = time.time()
    os.utime(store.snap_dir / a.file, (now - 500, now - 500))
    os.utime(store.snap_dir / b.file, (now - 100, now - 100))
    store.get(a.key)  # a becomes the most recently used
    removed, _ = store.gc({a.key, b.key}, max_bytes=max(a.bytes, b.bytes))
    assert [e.key for e in removed] == [b.key]


def test_gc_leaves_young_temp_files_and_removes_old_strays(store):
    a = store.put(make_snap("alpha"))
    d = store.snap_dir
    young_tmp, old_tmp = d / ".tmp-young.safetensors", d / ".tmp-old.safetensors"
    young_stray, old_stray = d / "stray-young.safetensors", d / "stray-old.safetensors"
    for p in (young_tmp, old_tmp, young_stray, old_stray):
        p.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    for p in (old_tmp, old_stray):
        os.utime(p, (old, old))

    removed, _ = store.gc({a.key})
    assert removed == []
    assert snapshot_files(store) == {a.file, young_tmp.name, young_stray.name}
    assert set(store.entries()) == {a.key}


def test_gc_drops_entries_whose_file_is_gone(store):
    a, b = store.put(make_snap("alpha")), store.put(make_snap("beta"))
    (store.snap_dir / a.file).unlink()
    removed, _ = store.gc({a.key, b.key})
    assert [e.key for e in removed] == [a.key]
    assert set(store.entries()) == {b.key}


# ---------------------------------------------------------------------------------------------- writability


def test_ensure_writable_creates_folders_and_leaves_nothing(store):
    store.ensure_writable()
    assert store.snap_dir.is_dir()
    assert [p.name for p in store.dir.iterdir()] == ["snapshots"]


def test_unwritable_root_raises_one_line_store_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder")
    bad = Store(blocker / "store", TAG, FP_A)
    with pytest.raises(StoreError) as err:
        bad.ensure_writable()
    msg = str(err.value)
    assert "\n" not in msg and str(blocker / "store") in msg
    with pytest.raises(StoreError) as err:
        bad.put(make_snap("alpha"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- keys


def test_snapshot_key_depends_on_fingerprint_parent_and_content():
    ch, ch2 = "1" * 64, "2" * 64
    base = snapshot_key(FP_A, "", ch)
    assert base == snapshot_key(FP_A, "", ch)
    assert len(base) == 32 and int(base, 16) >= 0
    variants = {snapshot_key(FP_B, "", ch), snapshot_key(FP_A, base, ch), snapshot_key(FP_A, "", ch2),
                snapshot_key(FP_A, snapshot_key(FP_A, "", ch2), ch)}
    assert base not in variants and len(variants) == 4


# ---------------------------------------------------------------------------------------------- invariant


def test_random_operations_keep_index_and_files_in_sync(tmp_path):
    rng = random.Random(20240611)
    store = Store(tmp_path, TAG, FP_A)
    pool = [make_snap(f"skill-{i}", f"content {i}", parent=rng.choice(["", "p" * 32]), tokens=rng.randint(1, 9),
                      seed=i) for i in range(8)]
    all_keys = [s.key for s in pool]
    ops, sizes = [], []
    for _ in range(50):
        op = rng.choice(["put", "put", "put", "remove", "gc"])
        ops.append(op)
        if op == "put":
            store.put(rng.choice(pool), rng.choice(["none", "zstd"]))
        elif op == "remove":
            store.remove(rng.sample(all_keys, rng.randint(1, 3)))
        else:
            live = set(rng.sample(all_keys, rng.randint(0, len(all_keys))))
            max_bytes = rng.choice([None, rng.randint(0, 4000)])
            store.gc(live, max_bytes)
            assert set(store.entries()) <= live
            if max_bytes is not None:
                assert store.size_bytes() <= max_bytes

        index = store.entries()
        files = snapshot_files(store)
        assert {e.file for e in index.values()} == files, ops
        assert {read_header(store.snap_dir / f)["key"] for f in files} == set(index), ops
        assert set(Store(tmp_path, TAG, FP_A).entries()) == set(index), ops  # index.json on disk agrees
        sizes.append(len(index))
    assert {"put", "remove", "gc"} <= set(ops)
    assert max(sizes) >= 4  # the sequence really exercised a populated store
