"""The compile stage: skills -> stored snapshots, incremental by content hash.

Every snapshot is made here, whoever needs it (`skillkv compile`, `watch`, an exact-mode ask of a new combination,
compose's neighbour snapshots), by one code path: `chain(skills)` loads the stored pieces of the ordered chain
[preamble + skill 1][skill 2]...[skill k] (verified on load) and computes the missing ones on the runner, each over
the pieces before it, storing each piece as it is made (skillkv.store keys: a chain key names the exact prefix a
piece continues). The runner computes a piece with the same kernels in any mode, so exact mode over stored pieces
equals a full prefill of the same segments bit for bit.

`compile(skills)` stores, per skill, everything an ask may need later:
  - its single-skill snapshot (chain [skill]);
  - with `neighbours`, its compose neighbour snapshot (chain [NEIGHBOUR, skill]; skillkv.compose.neighbour), so a
    composed ask computes only its question and repair tokens;
  - the stored combinations it is part of (chains an exact-mode ask stored before) when a skill in them changed.
A skill that cannot compile (longer than the model's context, a store error on its file...) is skipped with its
reason, by name and numbers; every other skill still compiles. With `verify`, a stored piece counts as current only
once it reads back and verifies (every checksum, not only the header): a damaged one is removed and recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from skillkv.compose.neighbour import NEIGHBOUR
from skillkv.errors import PromptTooLong, SkillkvError, SnapshotError
from skillkv.prompt import PromptBuilder
from skillkv.runners.base import KV, ReadyKV, Runner
from skillkv.skills import Skill
from skillkv.snapshot import COMPRESSIONS, Snapshot
from skillkv.store import Store, snapshot_key


@dataclass
class CompileResult:
    skill: str
    status: str  # compiled | recompiled | up to date | skipped
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class SkillState:
    skill: Skill
    state: str  # current | stale | missing
    tokens: int = 0
    bytes: int = 0


def concat(pieces: list[KV], device=None) -> KV:
    """One KV from consecutive pieces, on `device` (default: the first piece's)."""
    dev = device if device is not None else pieces[0][0][0].device
    if len(pieces) == 1:
        return [(k.to(dev), v.to(dev)) for k, v in pieces[0]]
    import torch

    return [(torch.cat([p[i][0].to(dev) for p in pieces]), torch.cat([p[i][1].to(dev) for p in pieces]))
            for i in range(len(pieces[0]))]


class Compiler:
    """Snapshots of one model (`fingerprint`) in `store`. `runner()` returns the runner (the model loads only when
    a piece must be computed); `max_context` is the model's context; `on_warning` takes one-line warnings."""

    def __init__(self, store: Store, builder: PromptBuilder, fingerprint: str, runner: Callable[[], Runner],
                 max_context: int, on_warning: Callable[[str], None]):
        self.store, self.builder, self.fingerprint = store, builder, fingerprint
        self.runner, self.max_context, self.on_warning = runner, max_context, on_warning
        self._checked: set[str] = set()  # keys verified by this compile (`verify`)
        self._repaired = 0  # damaged pieces `verify` removed (and so recomputed)

    # ------------------------------------------------------------------ chains

    def keys(self, skills: list[Skill]) -> list[str]:
        """Chain keys: piece i is skill i's segment after the pieces before it."""
        keys, parent = [], ""
        for s in skills:
            parent = snapshot_key(self.fingerprint, parent, s.content_hash)
            keys.append(parent)
        return keys

    def piece_ids(self, skills: list[Skill], i: int) -> list[int]:
        """Token ids of chain piece i: the preamble plus the first skill, then one skill per piece."""
        ids = self.builder.skill_ids(skills[i])
        return self.builder.preamble_ids() + ids if i == 0 else ids

    def pieces(self, skills: list[Skill]) -> list[tuple[str, list[int]]]:
        return [(k, self.piece_ids(skills, i)) for i, k in enumerate(self.keys(skills))]

    def stored(self, skills: list[Skill]) -> bool:
        """Whether every piece of the chain is in the store (no loading)."""
        return bool(skills) and all(self.store.contains(k) for k in self.keys(skills))

    def _load(self, key: str, ids: list[int]) -> Snapshot | None:
        """A verified snapshot, or None if it must be computed (missing, or bad: warned about and removed)."""
        if not self.store.contains(key):
            return None
        try:
            return self.store.get(key, token_ids=ids)
        except SnapshotError as e:
            self.on_warning(f"{e}; recompiling")
            self.store.remove([key])
            return None

    def chain(self, skills: list[Skill], compression: str = "none", recompute: bool = False,
              rewrite: bool = False) -> tuple[list[KV], dict]:
        """The exact KV of preamble + `skills` in this order, as one KV per piece: stored pieces loaded, missing
        ones computed on the runner and stored; with `recompute` every piece is computed (the tier policy found
        that faster than loading) and only the missing ones stored, or with `rewrite` too all of them (each
        replaced atomically: a stored piece is never removed before its new file is in place). Returns (pieces,
        info) with info = cached / computed token counts, snapshot_load seconds and per skill where its KV came
        from ("l2" | "computed")."""
        info = {"cached": 0, "computed": 0, "snapshot_load": 0.0, "tiers": []}
        keys, pieces, start = self.keys(skills), [], 0
        for i, (skill, key) in enumerate(zip(skills, keys)):
            ids = self.piece_ids(skills, i)
            t0 = time.perf_counter()
            snap = None if recompute else self._load(key, ids)
            info["snapshot_load"] += time.perf_counter() - t0
            if snap is not None:
                pieces.append(list(zip(snap.keys, snap.values)))
                info["cached"] += len(ids)
                info["tiers"].append("l2")
            else:
                kv = self._compute(keys[i - 1] if i else None, pieces, start, ids)
                if rewrite or not (recompute and self.store.contains(key)):
                    self.store.put(Snapshot(keys=[k for k, _ in kv], values=[v for _, v in kv], token_ids=ids,
                                            fingerprint=self.fingerprint, key=key, skill=skill.name,
                                            content_hash=skill.content_hash, start=start,
                                            parent=keys[i - 1] if i else ""), compression)
                pieces.append(kv)
                info["computed"] += len(ids)
                info["tiers"].append("computed")
            start += len(ids)
        return pieces, info

    def chain_kv(self, skills: list[Skill], compression: str = "none") -> tuple[KV, dict]:
        """`chain` as one contiguous KV (the pieces concatenated)."""
        pieces, info = self.chain(skills, compression)
        return concat(pieces, self.runner().device), info

    def _compute(self, parent: str | None, pieces: list[KV], start: int, ids: list[int]) -> KV:
        """KV rows of `ids` prefilled after the prefix `parent` (made of `pieces`, admitted if not resident)."""
        if start + len(ids) + 1 > self.max_context:
            raise PromptTooLong(f"{start + len(ids):,} tokens; the model's context is {self.max_context:,}")
        runner = self.runner()
        if parent is not None and not runner.resident(parent):
            runner.admit(parent, [ReadyKV(p) for p in pieces])
        seq = runner.open(parent)
        try:
            t0 = time.perf_counter()
            runner.prefill([seq], [ids])
            kv = runner.read(seq, start, start + len(ids))
            self._measured(len(ids), time.perf_counter() - t0)
            return kv
        finally:
            runner.release(seq)

    def _measured(self, tokens: int, seconds: float) -> None:
        """Record the prefill rate of a computed piece: `skillkv stats` estimates time saved with it (skillkv.stats,
        the way `skillkv bench` measures: a full prefill of a skill-sized prompt); never fails a compile."""
        from skillkv.stats import MIN_RATE_TOKENS, StatsDB

        if tokens >= MIN_RATE_TOKENS:
            try:
                StatsDB(self.store.root, on_warning=self.on_warning).record_prefill(self.store.dir.name, tokens,
                                                                                    seconds)
            except Exception as e:  # noqa: BLE001 - statistics are never worth a failed compile
                self.on_warning(f"prefill rate not recorded ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------ compile

    def current(self, skills: list[Skill], verify: bool = False) -> bool:
        """Whether the chain's last piece is stored and its header says it is this content (no tensor read); with
        `verify`, also whether every piece of the chain reads back and verifies (a damaged one is removed)."""
        key, ids = self.pieces(skills)[-1]
        if not (self.store.contains(key) and self.store.header_matches(key, skills[-1].content_hash, len(ids))):
            return False
        return not verify or all([self._verified(k, piece) for k, piece in self.pieces(skills)])

    def _verified(self, key: str, ids: list[int]) -> bool:
        if key in self._checked:
            return True
        try:
            self.store.get(key, token_ids=ids)
        except SnapshotError:
            self.store.remove([key])
            self._repaired += 1
            return False
        self._checked.add(key)
        return True

    def compile(self, skills: list[Skill], compression: str = "none", force: bool = False, neighbours: bool = False,
                on_result: Callable[[CompileResult], None] | None = None,
                current: list[Skill] | None = None, verify: bool = False) -> list[CompileResult]:
        """Compile `skills` (module docstring), one result per skill, in order; then refresh the stored
        combinations of `current` skills (default: `skills`) that changed. Never raises for one skill: its result
        is "skipped" with the reason."""
        if compression not in COMPRESSIONS:
            raise SkillkvError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
        self.store.ensure_writable()
        results, self._checked = [], set()
        for skill in skills:
            r = self.compile_skill(skill, compression, force, neighbours, verify)
            results.append(r)
            on_result and on_result(r)
        self._refresh_combinations(current if current is not None else skills, compression)
        return results

    def compile_skill(self, skill: Skill, compression: str = "none", force: bool = False,
                      neighbours: bool = False, verify: bool = False) -> CompileResult:
        """One skill's snapshots (module docstring); a failure is a "skipped" result, never an exception."""
        t0 = time.perf_counter()
        key = self.keys([skill])[0]
        n, repaired = len(self.piece_ids([skill], 0)), self._repaired
        try:
            existed = self.store.contains(key)
            fresh = force or not self.current([skill], verify)
            if fresh:  # --force recomputes and replaces: the old file stays until the new one is renamed over it
                stale = not existed and any(e.skill == skill.name and not e.parent
                                            for e in self.store.entries().values())
                self.chain([skill], compression, recompute=force, rewrite=force)
            reason = self._neighbour(skill, compression, force, verify) if neighbours else ""
        except SkillkvError as e:
            return CompileResult(skill.name, "skipped", n, 0, time.perf_counter() - t0, f"{skill.name}: {e}")
        e = self.store.entries()[key]
        status = "up to date" if not fresh else "recompiled" if (existed or stale) else "compiled"
        if self._repaired > repaired:  # --verify found one of its pieces damaged (a neighbour snapshot too)
            status = "recompiled"
        return CompileResult(skill.name, status, e.tokens, e.bytes, time.perf_counter() - t0, reason)

    def _neighbour(self, skill: Skill, compression: str, force: bool, verify: bool = False) -> str:
        """Store the skill's compose neighbour snapshot; returns a note when it cannot be made."""
        chain = [NEIGHBOUR, skill]
        total = sum(len(ids) for _, ids in self.pieces(chain))
        if total + 1 > self.max_context:
            return f"no compose neighbour snapshot ({total:,} tokens with it; the context is {self.max_context:,})"
        if force or not self.current(chain, verify):
            self.chain(chain, compression, recompute=force, rewrite=force)
        return ""

    def _refresh_combinations(self, skills: list[Skill], compression: str) -> None:
        """Recompute stored combinations (chains of 2+ skills an ask stored) whose skills are all current but
        whose pieces are not, so the next ask of them computes only the question."""
        by_name = {s.name: s for s in skills}
        entries = self.store.entries()
        parents = {e.parent for e in entries.values()}
        for e in list(entries.values()):
            if not e.parent or e.key in parents:
                continue  # not the tail of a combination
            names, k = [], e.key
            while k and k in entries and len(names) < 64:
                names.append(entries[k].skill)
                k = entries[k].parent
            names.reverse()
            if k or names[0] == NEIGHBOUR.name or not all(n in by_name for n in names):
                continue
            chain = [by_name[n] for n in names]
            if not self.stored(chain):
                try:
                    self.chain(chain, compression)
                except SkillkvError as err:
                    self.on_warning(f"combination {' + '.join(names)} not refreshed: {err}")

    # ------------------------------------------------------------------ state

    def status(self, skills: list[Skill]) -> list[SkillState]:
        """Each skill with the state of its single-skill snapshot: current, stale (a snapshot of an older version
        is stored) or missing."""
        entries, out = self.store.entries(), []
        for s in skills:
            key = self.keys([s])[0]
            e = entries.get(key)
            if e is not None and self.store.contains(key):
                out.append(SkillState(s, "current", e.tokens, e.bytes))
            elif any(x.skill == s.name and not x.parent for x in entries.values()):
                out.append(SkillState(s, "stale"))
            else:
                out.append(SkillState(s, "missing"))
        return out

    def live_keys(self, skills: list[Skill]) -> set[str]:
        """Keys whose whole chain still matches `skills` (combination and neighbour pieces included): what gc keeps."""
        by_hash = {s.content_hash for s in skills} | {NEIGHBOUR.content_hash}
        entries, live = self.store.entries(), set()
        for key, e in entries.items():
            k, ok = key, True
            while k:
                x = entries.get(k)
                if x is None or x.content_hash not in by_hash:
                    ok = False
                    break
                k = x.parent
            if ok and snapshot_key(self.fingerprint, e.parent, e.content_hash) == key:
                live.add(key)
        return live
