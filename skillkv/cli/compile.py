"""skillkv compile SKILLS_DIR: one snapshot per skill per model, incremental by content hash + fingerprint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, EngineOpt, JsonOpt, ModelOpt, StoreOpt, err, human_bytes, open_kv, out, print_json


@app.command("compile")
def compile_cmd(
    skills: Path = typer.Argument(Path("skills"), help="Folder of skills (<name>/SKILL.md)."),
    store: Optional[Path] = StoreOpt,
    model: Optional[str] = ModelOpt,
    compress: str = typer.Option("none", "--compress", help="none | zstd (per-layer, byte-plane shuffled)."),
    force: bool = typer.Option(False, "--force", help="Recompile even current snapshots."),
    only: Optional[list[str]] = typer.Option(None, "--skill", help="Compile only these skills."),
    device: Optional[str] = DeviceOpt,
    engine: str = EngineOpt,
    as_json: bool = JsonOpt,
):
    """Compile SKILL.md folders into KV snapshots (skips skills whose snapshot is current)."""
    kv = open_kv(model, store, skills, device, engine)
    n = len(kv.load_skills().skills) if not only else len(only)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"compiling for {kv.handle.name}", total=n)

        def advance(r):
            if r.status != "skipped":
                bar.advance(task)
        results = kv.compile(only or None, compression=compress, force=force, on_result=advance)
    if as_json:
        print_json({"model": kv.handle.name, "fingerprint": kv.fingerprint, "store": str(kv.snapshots.dir),
                    "results": [asdict(r) for r in results]})
    else:
        out.print(f"[bold]{kv.handle.name}[/] -> {kv.snapshots.dir}", soft_wrap=True)
        t = Table()
        for col in ("skill", "tokens", "bytes", "seconds", "status"):
            t.add_column(col, justify="right" if col in ("tokens", "bytes", "seconds") else "left")
        for r in results:
            status = r.status if r.status != "skipped" else "[red]skipped[/] (see below)"
            t.add_row(r.skill, str(r.tokens or ""), human_bytes(r.bytes) if r.bytes else "",
                      f"{r.seconds:.2f}" if r.status != "skipped" else "", status)
        out.print(t)
        for r in results:
            if r.status == "skipped":
                err.print(f"skillkv: skipped: {r.reason}", markup=False, soft_wrap=True)
    if results and all(r.status == "skipped" for r in results):
        raise typer.Exit(2)
