"""skillkv ls: skills and the state of their snapshots for the current model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skillkv.cli import app
from skillkv.cli.common import JsonOpt, ModelOpt, StoreOpt, human_bytes, open_kv, out, print_json


@app.command("ls")
def ls_cmd(
    skills: Path = typer.Argument(Path("skills"), help="Folder of skills."),
    store: Optional[Path] = StoreOpt,
    model: Optional[str] = ModelOpt,
    as_json: bool = JsonOpt,
):
    """List skills with their snapshot state (current / stale / missing)."""
    kv = open_kv(model, store, skills)
    rows = kv.status()
    problems = kv.load_skills().problems
    if as_json:
        print_json({"model": kv.handle.name, "store": str(kv.snapshots.dir),
                    "skills": [{"name": r.skill.name, "description": r.skill.description, "state": r.state,
                                "tokens": r.tokens, "bytes": r.bytes} for r in rows],
                    "problems": problems})
        return
    out.print(f"[bold]{kv.handle.name}[/] -> {kv.snapshots.dir}", soft_wrap=True)
    t = Table()
    for col in ("skill", "state", "tokens", "bytes", "description"):
        t.add_column(col, overflow="ellipsis", no_wrap=col == "description", max_width=60)
    color = {"current": "green", "stale": "yellow", "missing": "red"}
    for r in rows:
        t.add_row(r.skill.name, f"[{color[r.state]}]{r.state}[/]", str(r.tokens or ""),
                  human_bytes(r.bytes) if r.bytes else "", r.skill.description)
    out.print(t)
    for p in problems:
        out.print(f"[red]skipped[/] {p}")
