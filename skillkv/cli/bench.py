"""skillkv bench: measured numbers for docs/BENCHMARKS.md (see skillkv.measure.bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, ModelOpt


@app.command("bench")
def bench_cmd(
    model: Optional[str] = ModelOpt,
    out: Path = typer.Option(Path("bench_out"), "--out", help="Folder for the JSON results."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repetitions (smoke test)."),
    device: Optional[str] = DeviceOpt,
):
    """Run the benchmarks and write JSON (and a Markdown table) under --out."""
    from skillkv.measure.bench import run_bench

    run_bench(model=model, out=out, quick=quick, device=device)
