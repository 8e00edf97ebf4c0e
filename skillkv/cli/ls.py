"""skillkv ls: skills and the state of their snapshots for the current model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import (FollowOpt, JsonOpt, ModelOpt, SkillsArg, SkillsOpt, StoreOpt, human_bytes, open_kv, out,
                                print_json, printable, skills_dir)
from skillkv.cli.table import Col, print_table

COLOR = {"current": "green", "stale": "yellow", "missing": "red"}


@app.command("ls")
def ls_cmd(
    skills: Optional[Path] = SkillsArg,
    skills_opt: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    model: Optional[str] = ModelOpt,
    as_json: bool = JsonOpt,
):
    """List skills with their snapshot state (current / stale / missing)."""
    skills = skills_dir(skills, skills_opt)
    kv = open_kv(model, store, skills, follow_symlinks=follow_symlinks)
    rows = kv.status()
    problems = kv.load_skills().problems
    if as_json:
        print_json({"model": kv.handle.name, "store": str(kv.snapshots.dir),
                    "skills": [{"name": r.skill.name, "description": r.skill.description, "state": r.state,
                                "tokens": r.tokens, "bytes": r.bytes} for r in rows],
                    "problems": problems})
        return
    out.print(f"{kv.handle.name} -> {printable(str(kv.snapshots.dir))}", markup=False, soft_wrap=True)
    print_table([Col("skill"), Col("state"), Col("tokens", right=True, drop=1), Col("size", right=True, drop=2),
                 Col("description", flex=True)],
                [[r.skill.name, (r.state, COLOR[r.state]), f"{r.tokens:,}" if r.tokens else "",
                  human_bytes(r.bytes) if r.bytes else "", " ".join(r.skill.description.split())] for r in rows])
    for p in problems:
        out.print(f"skipped: {printable(p)}", markup=False, soft_wrap=True, style="red")
