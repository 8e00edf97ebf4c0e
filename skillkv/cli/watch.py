"""skillkv watch SKILLS_DIR: recompile a skill when its files change (see skillkv.watch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, EngineOpt, JsonOpt, ModelOpt, StoreOpt, err, open_kv, out, print_json


@app.command("watch")
def watch_cmd(
    skills: Path = typer.Argument(Path("skills"), help="Folder of skills (<name>/SKILL.md) to watch."),
    store: Optional[Path] = StoreOpt,
    model: Optional[str] = ModelOpt,
    compress: str = typer.Option("none", "--compress", help="none | zstd."),
    debounce: float = typer.Option(0.3, "--debounce", min=0.0, help="Seconds of quiet before a skill recompiles."),
    once: bool = typer.Option(False, "--once", help="Stop after the first changed skill is processed."),
    max_events: Optional[int] = typer.Option(None, "--max-events", min=1, help="Stop after N processed changes."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0, help="Stop after this many seconds."),
    device: Optional[str] = DeviceOpt,
    engine: str = EngineOpt,
    as_json: bool = JsonOpt,
):
    """Compile what is out of date, then recompile each skill as its files change (Ctrl-C stops)."""
    from skillkv.watch import Watcher, check_root

    check_root(skills)  # before the model is resolved: a wrong folder is reported at once
    kv = open_kv(model, store, skills, device, engine)

    def show(line) -> None:
        if as_json:
            print_json(line.to_json())
        else:
            color = {"error": "red", "deleted": "yellow", "renamed": "yellow"}.get(line.result, "green")
            out.print(f"{line.skill}  {line.tokens} tokens  {line.seconds:.2f} s  [{color}]{line.result}[/]"
                      + (f" ({line.detail})" if line.detail else ""), soft_wrap=True, highlight=False)

    w = Watcher(kv, skills, on_line=show, debounce=debounce, compression=compress)
    w.run(max_events=1 if once else max_events, timeout=timeout,
          ready=None if as_json else lambda: err.print(f"[dim]watching {w.root} (Ctrl-C stops)[/]", soft_wrap=True))
