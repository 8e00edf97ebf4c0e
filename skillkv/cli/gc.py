"""skillkv gc: remove stale snapshots (skills changed or gone) and, with --max-bytes, the least recently used."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import (FollowOpt, JsonOpt, ModelOpt, SkillsArg, SkillsOpt, StoreOpt, human_bytes, open_kv, out,
                                print_json, printable, skills_dir)


@app.command("gc")
def gc_cmd(
    skills: Optional[Path] = SkillsArg,
    skills_opt: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    model: Optional[str] = ModelOpt,
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes", metavar="SIZE", help="Then evict least recently "
                                            "used snapshots down to this size, e.g. 500MB or 2GiB (0 empties the "
                                            "store).", show_default=False),
    as_json: bool = JsonOpt,
):
    """Garbage-collect the store for the current model."""
    skills = skills_dir(skills, skills_opt)
    from skillkv.config import parse_bytes

    cap = parse_bytes(max_bytes, allow_zero=True)
    kv = open_kv(model, store, skills, follow_symlinks=follow_symlinks)
    kv.snapshots.ensure_writable()
    removed, freed = kv.gc(cap)
    if as_json:
        print_json({"removed": [{"skill": e.skill, "key": e.key, "bytes": e.bytes} for e in removed],
                    "freed_bytes": freed, "store_bytes": kv.snapshots.size_bytes()})
        return
    for e in removed:
        out.print(f"removed {printable(e.skill)} ({e.key[:12]}, {human_bytes(e.bytes)})", markup=False)
    out.print(f"freed {human_bytes(freed)}; store now {human_bytes(kv.snapshots.size_bytes())}")
