"""skillkv stats: questions asked, prefill tokens and time saved, tier hit rates, per-skill use, store size."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import (FollowOpt, JsonOpt, ModelOpt, SkillsOpt, StoreOpt, human_bytes, human_seconds, open_kv,
                                out, print_json, printable, warn)
from skillkv.cli.table import Col, print_table
from skillkv.report import collect

COLOR = {"current": "green", "stale": "yellow", "missing": "red", "removed": "yellow"}


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%d %b %H:%M") if ts else "never"


def _print(rep: dict, plot: Optional[Path]) -> None:
    tk, st = rep["tokens"], rep["store"]
    cap = f"of a {human_bytes(st['cap_bytes'])} cap ({st['used_of_cap']:.0%})" if st["cap_bytes"] else "no cap set"
    nb = rep["internal"]["compose_neighbour"]
    extra = f" ({human_bytes(nb['bytes'])} of it compose stand-in snapshots)" if nb["bytes"] else ""
    modes = ", ".join(f"{m} {n}" for m, n in rep["by_mode"].items())
    if rep["prefill_rate_tok_s"]:
        saved = f"about {human_seconds(rep['est_time_saved_s'])} at {rep['prefill_rate_tok_s']:,.0f} tok/s"
    else:
        saved = "time: known once a skill compiles here"
    hits = ", ".join(f"{t} {c} ({rep['tier_hit_rate'].get(t, 0):.0%})" for t, c in rep["tier_hits"].items() if c)
    for key, value in [("model", rep["model"]), ("store", st["path"]),
                       ("size", f"{human_bytes(st['bytes'])}, {cap}{extra}"),
                       ("questions", f"{rep['questions']:,}" + (f" ({modes})" if modes else "")),
                       ("tokens", f"{tk['prompt']:,} prompt: {tk['cached']:,} from skill KV, {tk['computed']:,} "
                                  "computed"),
                       ("saved", f"{rep['prefill_tokens_saved']:,} prefill tokens ({saved})"),
                       ("tiers", hits or "none yet")]:
        out.print(f"{key:<10} {printable(value)}", markup=False, soft_wrap=True)
    out.print()
    rows = []
    for n, s in rep["skills"].items():
        tr = s["tiers"]
        rows.append([n, (s["state"], COLOR.get(s["state"], "")), f"{s['uses']:,}", f"{s['tokens_saved']:,}",
                     human_bytes(s["snapshot_bytes"]) if s["snapshot_bytes"] else "", _when(s["last_used"]),
                     f"{tr.get('l1', 0) + tr.get('host', 0) + tr.get('memory', 0)}/{tr.get('l2', 0)}/"
                     f"{tr.get('computed', 0)}"])
    print_table([Col("skill"), Col("state"), Col("uses", right=True), Col("saved", right=True),
                 Col("size", right=True, drop=2), Col("last used", drop=3), Col("hot/l2/new", drop=4)], rows)
    if plot is not None:
        out.print(f"plot -> {printable(str(plot))}", markup=False, soft_wrap=True)


@app.command("stats")
def stats_cmd(
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    model: Optional[str] = ModelOpt,
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes", metavar="SIZE", help="Store cap to compare "
                                            "against, e.g. 2GB (env SKILLKV_STORE_MAX_BYTES).", show_default=False),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="PNG", help="Write a PNG: tokens (and time) saved "
                                        "over time, use per skill.", show_default=False),
    as_json: bool = JsonOpt,
):
    """Usage statistics recorded by every ask (SQLite in the store)."""
    from skillkv.config import parse_bytes

    cap = parse_bytes(max_bytes or os.environ.get("SKILLKV_STORE_MAX_BYTES") or None)
    kv = open_kv(model, store, skills, follow_symlinks=follow_symlinks)
    rep, asks = collect(kv, cap)
    if plot is not None:
        from skillkv.stats import plot as draw

        draw(asks, rep["skills"], plot, title=f"skillkv stats: {rep['model']} ({rep['store']['path']})",
             rate=rep["prefill_rate_tok_s"])
        rep["plot"] = str(plot)
    if as_json:
        print_json(rep)
        return
    _print(rep, plot)
    if not rep["questions"]:
        warn("no asks recorded yet for this model (run skillkv ask first)")
