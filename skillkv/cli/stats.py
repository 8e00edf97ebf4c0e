"""skillkv stats: questions asked, prefill tokens and time saved, tier hit rates, per-skill use, store size."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skillkv.cli import app
from skillkv.cli.common import JsonOpt, ModelOpt, SkillsOpt, StoreOpt, human_bytes, open_kv, out, print_json, warn
from skillkv.errors import SkillkvError


def collect(kv, max_bytes: int | None) -> tuple[dict, list[dict]]:
    """The stats report for this model's store (and the raw ask rows, for the plot)."""
    from skillkv.compose.neighbour import NEIGHBOUR
    from skillkv.stats import StatsDB, summary

    asks = StatsDB(kv.store_root, on_warning=kv.on_warning).asks(model=kv.tag)
    rep = summary(asks)
    entries = kv.snapshots.entries()
    try:
        states = {s.skill.name: s.state for s in kv.status()}
    except SkillkvError as e:  # skills folder gone: still report what the store and the database know
        kv.on_warning(f"{e}; skill states unknown")
        states = {}
    names = set(rep["skills"]) | set(states) | {e.skill for e in entries.values()}
    skills = {}
    for n in sorted(names):
        s = rep["skills"].get(n) or {"uses": 0, "tokens": 0, "tokens_saved": 0, "last_used": None,
                                     "tiers": {"memory": 0, "l2": 0, "computed": 0}}
        mine = [e for e in entries.values() if e.skill == n]
        s["snapshot_bytes"] = sum(e.bytes for e in mine)
        s["snapshots"] = len(mine)
        s["state"] = states.get(n) or ("compose neighbour" if n == NEIGHBOUR.name else  # skillkv.compose.repair
                                       "removed" if states else "unknown")
        s["resident"] = "l2" if mine else "none"
        skills[n] = s
    rep["skills"] = skills
    rep["store"] = {"path": str(kv.snapshots.dir), "bytes": kv.snapshots.size_bytes(), "cap_bytes": max_bytes,
                    "used_of_cap": round(kv.snapshots.size_bytes() / max_bytes, 3) if max_bytes else None}
    rep["model"] = kv.handle.name
    return rep, asks


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "never"


@app.command("stats")
def stats_cmd(
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    model: Optional[str] = ModelOpt,
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="Store cap to compare against "
                                            "(env SKILLKV_STORE_MAX_BYTES).", show_default=False),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: tokens saved over time, use per skill."),
    as_json: bool = JsonOpt,
):
    """Usage statistics recorded by every ask (SQLite in the store)."""
    if max_bytes is None and os.environ.get("SKILLKV_STORE_MAX_BYTES"):
        try:
            max_bytes = int(os.environ["SKILLKV_STORE_MAX_BYTES"])
        except ValueError:
            raise SkillkvError("SKILLKV_STORE_MAX_BYTES must be a whole number of bytes") from None
    kv = open_kv(model, store, skills)
    rep, asks = collect(kv, max_bytes)
    if plot is not None:
        from skillkv.stats import plot as draw

        draw(asks, rep["skills"], plot)
        rep["plot"] = str(plot)
    if as_json:
        print_json(rep)
        return
    tk = rep["tokens"]
    saved = f"{rep['est_time_saved_s']:.1f} s" if rep["est_time_saved_s"] is not None else "unknown"
    rate = f"{rep['prefill_rate_tok_s']:.0f} tok/s" if rep["prefill_rate_tok_s"] else "not measured yet"
    out.print(f"[bold]{rep['model']}[/] -> {rep['store']['path']}", soft_wrap=True)
    out.print(f"questions {rep['questions']} | prompt tokens {tk['prompt']} ({tk['cached']} cached, "
              f"{tk['computed']} computed) | prefill tokens saved {rep['prefill_tokens_saved']} | "
              f"est. time saved {saved} (prefill rate {rate})", soft_wrap=True)
    hits = rep["tier_hits"]
    out.print("tier hits: " + ", ".join(f"{t} {c} ({rep['tier_hit_rate'].get(t, 0):.0%})" for t, c in hits.items()),
              soft_wrap=True)
    st = rep["store"]
    cap = f" of {human_bytes(st['cap_bytes'])} cap ({st['used_of_cap']:.0%})" if st["cap_bytes"] else " (no cap set)"
    out.print(f"store {human_bytes(st['bytes'])}{cap}", soft_wrap=True)
    t = Table()
    for col in ("skill", "uses", "saved", "bytes", "last used", "mem/l2/new", "state"):
        t.add_column(col, justify="right" if col in ("uses", "saved", "bytes") else "left", no_wrap=True)
    color = {"current": "green", "stale": "yellow", "missing": "red", "removed": "yellow",
             "compose neighbour": "cyan"}
    for n, s in rep["skills"].items():
        tr = s["tiers"]
        t.add_row(n, str(s["uses"]), str(s["tokens_saved"]),
                  human_bytes(s["snapshot_bytes"]) if s["snapshot_bytes"] else "", _when(s["last_used"]),
                  f"{tr.get('memory', 0)}/{tr.get('l2', 0)}/{tr.get('computed', 0)}",
                  f"[{color.get(s['state'], 'white')}]{s['state']}[/]")
    out.print(t)
    if plot is not None:
        out.print(f"plot -> {plot}")
    if not rep["questions"]:
        warn("no asks recorded yet for this model (run skillkv ask first)")
