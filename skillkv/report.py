"""The usage report of one model's store: what `skillkv stats` prints and serve's GET /stats returns.

Only the user's skills are listed under "skills". The compose stand-in skill (skillkv.compose.neighbour, compiled
into the store so composed asks find their neighbour snapshots) is reported apart, under "internal", so the store's
bytes still add up. Reading never creates anything: a folder without a store reports zeros.
"""

from __future__ import annotations

from skillkv.errors import SkillkvError


def collect(kv, max_bytes: int | None) -> tuple[dict, list[dict]]:
    """The stats report for this model's store (and the raw ask rows, for the plot)."""
    from skillkv.compose.neighbour import NEIGHBOUR
    from skillkv.stats import StatsDB, summary

    asks, rate, samples = StatsDB(kv.store_root, on_warning=kv.on_warning).report(kv.tag)
    rep = summary(asks, rate)
    rep["prefill_rate_samples"] = samples
    entries = kv.snapshots.entries()
    try:
        states = {s.skill.name: s.state for s in kv.status()}
    except SkillkvError as e:  # skills folder gone: still report what the store and the database know
        kv.on_warning(f"{e}; skill states unknown")
        states = {}
    internal = [e for e in entries.values() if e.content_hash == NEIGHBOUR.content_hash and not e.parent
                and e.skill not in states]
    names = set(rep["skills"]) | set(states) | {e.skill for e in entries.values() if e not in internal}
    skills = {}
    for n in sorted(names):
        s = rep["skills"].get(n) or {"uses": 0, "tokens": 0, "tokens_saved": 0, "last_used": None,
                                     "tiers": {"l1": 0, "host": 0, "l2": 0, "computed": 0}}
        mine = [e for e in entries.values() if e.skill == n and e not in internal]
        s["snapshot_bytes"] = sum(e.bytes for e in mine)
        s["snapshots"] = len(mine)
        s["state"] = states.get(n) or ("removed" if states else "unknown")
        s["resident"] = "l2" if mine else "none"
        skills[n] = s
    rep["skills"] = skills
    rep["internal"] = {"compose_neighbour": {"skill": NEIGHBOUR.name, "snapshots": len(internal),
                                             "bytes": sum(e.bytes for e in internal)}}
    size = kv.snapshots.size_bytes()
    rep["store"] = {"path": str(kv.snapshots.dir), "bytes": size, "cap_bytes": max_bytes,
                    "used_of_cap": round(size / max_bytes, 3) if max_bytes else None}
    rep["model"] = kv.handle.name
    return rep, asks
