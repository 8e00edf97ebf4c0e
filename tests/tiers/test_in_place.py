"""Snapshots read from L2 straight into the paged runner's pages on the CPU (Tiers._read_in_place,
Runner.reserve): exact, no host buffer, damaged or stale pieces never served and their pages given back."""

from __future__ import annotations

import pytest
import torch

from skillkv.errors import SnapshotError
from skillkv.store import Store
from skillkv.tiers.l2_reader import L2Reader
from skillkv.tiers.tiers import Tiers

from test_tiers import _damage, _prefill_fails, _runner, _store_pieces, tiny  # noqa: F401 - tiny: the fixture


def _piecewise_logits(eng, pieces):
    """Logits of the last piece's last token, every piece prefilled as its own step (as full mode does)."""
    r = eng.start(None)
    for ids in pieces:
        out = eng.prefill([r], [ids])[0]
    eng.finish(r)
    return out


@pytest.fixture
def setup(tmp_path, tiny, monkeypatch):  # noqa: F811
    h, model = tiny
    runner, eng = _runner(model)
    store = Store(tmp_path, h.tag, h.fingerprint)
    reads = []
    real = L2Reader.read

    def spy(self, path, **kw):
        reads.append(kw.get("into") is not None)
        return real(self, path, **kw)
    monkeypatch.setattr(L2Reader, "read", spy)
    tiers = Tiers(store, 0, lambda: runner, reader_threads=2, chunk_bytes=256, pin=False)
    monkeypatch.setattr(tiers.host, "alloc", lambda n: pytest.fail("a host buffer was allocated"))
    yield runner, eng, store, tiers, reads
    tiers.close()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_pieces_land_in_place_and_the_prefill_is_bit_identical(setup, compression):
    runner, eng, store, tiers, reads = setup
    a, b, q = list(range(5, 27)), list(range(30, 41)), [60, 61, 62]  # 22 + 11 tokens: partial last page
    pieces = _store_pieces(eng, store, [a, b], compression)
    ref = _piecewise_logits(eng, [a, b, q])
    free = len(eng.table.free)
    assert tiers.reads_in_place(runner)
    for expect in ("l2", "l1", "l2"):
        assert tiers.make_resident("ab", pieces) == expect
        r = runner.open("ab")
        assert torch.equal(runner.prefill([r], [q])[0], ref)
        runner.release(r)
        runner.settle("ab")
        if expect == "l1":
            runner.retire(lambda key: False)  # evicted: the next one reads the store again
    assert reads == [True, True, True, True]  # both pieces, twice, each straight into the pages
    assert len(tiers.host) == 0 and not runner._pending
    runner.retire(lambda key: False)
    assert len(eng.table.free) == free
    eng.table.check()


def test_a_damaged_piece_is_never_served_and_its_pages_come_back(setup):
    runner, eng, store, tiers, _ = setup
    (key, ids), = _store_pieces(eng, store, [list(range(5, 30))])
    _damage(store, key, "v.{last}", byte=3, bit=0x01)
    free = len(eng.table.free)
    assert tiers.make_resident(key, [(key, ids)]) == "l2"
    _prefill_fails(runner, key)
    runner.settle("nothing")
    assert not eng.resident(key) and len(eng.table.free) == free
    eng.table.check()


def test_a_stale_piece_after_a_good_one_admits_nothing(setup):
    runner, eng, store, tiers, reads = setup
    pieces = _store_pieces(eng, store, [list(range(5, 27)), list(range(30, 41))])
    free = len(eng.table.free)
    stale = [pieces[0], (pieces[1][0], pieces[1][1][:-1] + [3])]
    with pytest.raises(SnapshotError, match="stale|differ"):
        tiers.make_resident("ab", stale)
    assert reads == [True, True]  # the good piece was being read into the reserved pages: given back after it
    assert not eng.resident("ab") and not runner._reserved and len(eng.table.free) == free
    eng.table.check()
    assert tiers.make_resident("ab", pieces) == "l2"  # the key is free for a good read
    runner.settle("ab")


def test_pages_that_are_not_one_run_fall_back_to_a_copy(setup, monkeypatch):
    runner, eng, store, tiers, reads = setup
    a, q = list(range(5, 27)), [60, 61]
    pieces = _store_pieces(eng, store, [a])
    ref = _piecewise_logits(eng, [a, q])
    real = eng.table.alloc
    monkeypatch.setattr(eng.table, "alloc", lambda n, **kw: real(n, **kw)[::-1])  # scattered pages
    monkeypatch.setattr(tiers.host, "alloc", lambda n: torch.empty(n, dtype=torch.uint8))
    assert tiers.make_resident("a", pieces) == "l2"
    r = runner.open("a")
    assert torch.equal(runner.prefill([r], [q])[0], ref)
    runner.release(r)
    assert reads == [False] and not runner._reserved
    eng.table.check()


def test_prefetch_without_a_host_tier_only_warms_the_page_cache(setup, monkeypatch):
    """A read into a host buffer would be dropped once done (no tier keeps it): the files are announced to the OS
    instead, and a loaded runner that reads in place gets nothing at all."""
    import os

    runner, eng, store, tiers, reads = setup
    pieces = _store_pieces(eng, store, [list(range(5, 27))])
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: advised.append(how))
    tiers.prefetch(pieces + [("f" * 32, [1, 2])])  # an unknown key is skipped; its error surfaces on use
    assert advised == [os.POSIX_FADV_WILLNEED] and reads == [] and not tiers._reading
    tiers.prefetch(pieces, runner)
    assert advised == [os.POSIX_FADV_WILLNEED] and reads == []
    assert tiers.make_resident("a", pieces) == "l2" and reads == [True]
    runner.settle("a")


def test_destinations_that_do_not_fit_the_snapshot_are_refused(setup):
    runner, eng, store, tiers, _ = setup
    (key, ids), = _store_pieces(eng, store, [list(range(5, 27))])
    into = runner.reserve("a", len(ids) + 1)  # one row too many
    try:
        with pytest.raises(SnapshotError, match="does not match"):
            tiers.reader.read(store.file_path(key), fingerprint=store.fingerprint, key=key, token_ids=ids, into=into)
    finally:
        runner.abandon("a")
    assert not eng.resident("a") and not runner._reserved
    eng.table.check()
