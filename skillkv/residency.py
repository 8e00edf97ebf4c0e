"""Exact prefixes made resident in the runner: from L1, from the host tier or the store (skillkv.tiers), or computed
and stored (skillkv.compile), whichever is there and, for stored pieces, faster than recomputing.

A snapshot found damaged, foreign or stale on the way in is never served: it is reported in one line, removed
from the store and recomputed (`damaged`).
"""

from __future__ import annotations

import time
from typing import Callable

from skillkv.compile import Compiler
from skillkv.errors import SnapshotError
from skillkv.runners.base import ReadyKV, Runner, Seq
from skillkv.skills import Skill
from skillkv.tiers.tiers import Tiers


class Residency:
    """`runner()` the runner (loaded on first use); `on_warning` takes one-line warnings."""

    def __init__(self, compiler: Compiler, tiers: Tiers, runner: Callable[[], Runner],
                 on_warning: Callable[[str], None]):
        self.compiler, self.tiers, self.runner, self.on_warning = compiler, tiers, runner, on_warning

    def make_resident(self, skills: list[Skill], pin: bool = False, settle: bool = False) -> dict:
        """The exact prefix of `skills` (1 or more) resident in the runner: L1, or paged in from the host cache or
        the store when every piece is stored and loading beats recomputing, else computed (and stored). With
        `settle`, stored pieces have fully arrived (a damaged one already replaced). Returns its info: cached /
        computed tokens, snapshot_load seconds, per skill the tier its KV came from."""
        pieces = self.compiler.pieces(skills)
        key, tokens = pieces[-1][0], sum(len(ids) for _, ids in pieces)
        t0 = time.perf_counter()
        where = self.tiers.choose(key, pieces)
        if where != "recompute":
            try:
                where = self.tiers.make_resident(key, pieces, pin)
                if settle:
                    self.runner().settle(key)
                return {"cached": tokens, "computed": 0, "snapshot_load": time.perf_counter() - t0,
                        "tiers": [where] * len(skills)}
            except SnapshotError as e:
                self.damaged(e, skills)
        # every piece stored but loading measured slower than a prefill: recompute them all (what is stored stays)
        kvs, info = self.compiler.chain(skills, recompute=where == "recompute" and self.compiler.stored(skills))
        self.runner().admit(key, [ReadyKV(kv) for kv in kvs], pin=pin)
        self.tiers.keep(pieces, kvs)
        return info

    def open(self, skills: list[Skill], settle: bool = False) -> tuple[Seq, dict]:
        """A sequence over the exact prefix of `skills` made resident (`make_resident`) and its info. A piece whose
        page-in already failed by then (damaged on the way in) is never served: the prefix is recomputed first."""
        key = self.compiler.pieces(skills)[-1][0]
        info = self.make_resident(skills, settle=settle)
        try:
            return self.runner().open(key), info
        except SnapshotError as e:
            self.damaged(e, skills)
        info = self.make_resident(skills, settle=settle)
        return self.runner().open(key), info

    def damaged(self, e: SnapshotError, skills: list[Skill]) -> None:
        """A damaged, foreign or stale snapshot: never served; removed from the store, so it is recompiled."""
        self.on_warning(f"{e}; recompiling")
        self.compiler.store.remove(self.compiler.keys(skills))

    def forget(self) -> None:
        """Evict every resident prefix no sequence holds and empty the host tier (the next ask reads the store)."""
        self.runner().retire(lambda key: False)
        self.runner().clear_cache()
        for key in self.tiers.host.keys():
            self.tiers.host.evict(key)
