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
from skillkv.report import collect


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "never"


@app.command("stats")
def stats_cmd(
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    model: Optional[str] = ModelOpt,
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes", help="Store cap to compare against, e.g. 2GB "
                                            "(env SKILLKV_STORE_MAX_BYTES).", show_default=False),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: tokens saved over time, use per skill."),
    as_json: bool = JsonOpt,
):
    """Usage statistics recorded by every ask (SQLite in the store)."""
    from skillkv.config import parse_bytes

    cap = parse_bytes(max_bytes or os.environ.get("SKILLKV_STORE_MAX_BYTES") or None)
    kv = open_kv(model, store, skills)
    rep, asks = collect(kv, cap)
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
    for col in ("skill", "uses", "saved", "bytes", "last used", "hot/l2/new", "state"):
        t.add_column(col, justify="right" if col in ("uses", "saved", "bytes") else "left", no_wrap=True)
    color = {"current": "green", "stale": "yellow", "missing": "red", "removed": "yellow",
             "compose neighbour": "cyan"}
    for n, s in rep["skills"].items():
        tr = s["tiers"]
        t.add_row(n, str(s["uses"]), str(s["tokens_saved"]),
                  human_bytes(s["snapshot_bytes"]) if s["snapshot_bytes"] else "", _when(s["last_used"]),
                  f"{tr.get('l1', 0) + tr.get('host', 0) + tr.get('memory', 0)}/{tr.get('l2', 0)}/"
                  f"{tr.get('computed', 0)}",
                  f"[{color.get(s['state'], 'white')}]{s['state']}[/]")
    out.print(t)
    if plot is not None:
        out.print(f"plot -> {plot}")
    if not rep["questions"]:
        warn("no asks recorded yet for this model (run skillkv ask first)")
