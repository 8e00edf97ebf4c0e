"""skillkv bench: measured numbers for docs/BENCHMARKS.md (see skillkv.measure.bench).

It measures in a temporary store of its own (a fresh compile is one of the numbers), so it takes no --store.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, JsonOpt, ModelOpt, check_device, print_json


@app.command("bench")
def bench_cmd(
    model: Optional[str] = ModelOpt,
    out: Path = typer.Option(Path("bench_out"), "--out", metavar="DIR", help="Folder for the JSON results."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repetitions (smoke test)."),
    device: Optional[str] = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Run the benchmarks and write JSON (and a Markdown table) under --out."""
    device = check_device(device)
    from skillkv.measure.bench import run_bench

    if not as_json:
        run_bench(model=model, out=out, quick=quick, device=device)
        return
    with contextlib.redirect_stdout(sys.stderr):  # the Markdown table: stdout holds only the JSON
        r = run_bench(model=model, out=out, quick=quick, device=device)
    print_json(r)
