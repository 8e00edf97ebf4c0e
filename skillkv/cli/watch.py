"""skillkv watch SKILLS_DIR: recompile a skill when its files change (see skillkv.watch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from skillkv.cli import app
from skillkv.cli.common import (DeviceOpt, EngineOpt, FollowOpt, JsonOpt, ModelOpt, SkillsArg, SkillsOpt, StoreOpt, err,
                                open_kv, out, print_json, printable, skills_dir)


@app.command("watch")
def watch_cmd(
    skills: Optional[Path] = SkillsArg,
    skills_opt: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    model: Optional[str] = ModelOpt,
    compress: str = typer.Option("none", "--compress", metavar="CODEC", help="none | zstd."),
    debounce: float = typer.Option(0.3, "--debounce", min=0.0, help="Seconds of quiet before a skill recompiles."),
    once: bool = typer.Option(False, "--once", help="Stop after the first changed skill is processed."),
    max_events: Optional[int] = typer.Option(None, "--max-events", min=1, help="Stop after N processed changes."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0, help="Stop after this many seconds."),
    device: Optional[str] = DeviceOpt,
    engine: str = EngineOpt,
    as_json: bool = JsonOpt,
):
    """Compile what is out of date, then recompile each skill as its files change (Ctrl-C stops)."""
    skills = skills_dir(skills, skills_opt)
    from skillkv.watch import Watcher, check_root

    check_root(skills)  # before the model is resolved: a wrong folder is reported at once
    kv = open_kv(model, store, skills, device, engine, follow_symlinks=follow_symlinks)

    def show(line) -> None:
        if as_json:
            print_json(line.to_json())
        else:
            color = {"error": "red", "deleted": "yellow", "renamed": "yellow"}.get(line.result, "green")
            text = Text(f"{printable(line.skill)}  {line.tokens:,} tokens  {line.seconds:.2f} s  ")
            text.append(line.result, style=color)
            if line.detail:
                text.append(f" ({printable(line.detail)})")
            out.print(text, soft_wrap=True, highlight=False)

    w = Watcher(kv, skills, on_line=show, debounce=debounce, compression=compress)
    w.run(max_events=1 if once else max_events, timeout=timeout,
          ready=None if as_json else lambda: err.print(f"watching {printable(str(w.root))} (Ctrl-C stops)", style="dim",
                                                           markup=False, soft_wrap=True))
