"""skillkv loadtest: concurrent clients against `skillkv serve`, answers checked against solo answers (see
skillkv.measure.loadtest)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, JsonOpt, ModelOpt, SkillsOpt, StoreOpt, err, print_json
from skillkv.errors import SkillkvError


@app.command("loadtest")
def loadtest_cmd(
    url: Optional[str] = typer.Option(None, "--url", help="A running server (default: start one in-process)."),
    clients: int = typer.Option(64, "--clients", min=1, max=1024, help="Concurrent streaming clients."),
    requests: int = typer.Option(128, "--requests", min=1, max=100000, help="Requests in all."),
    distinct: int = typer.Option(32, "--distinct", min=1, max=100, help="Different prompts (solo answers)."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1, help="Answer tokens per request."),
    timeout: float = typer.Option(900, "--timeout", min=1, help="Seconds for the whole run."),
    model: Optional[str] = ModelOpt,
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    device: Optional[str] = DeviceOpt,
    attention: str = typer.Option("auto", "--attention", help="auto | torch | flashinfer (own server)."),
    kv_budget: Optional[str] = typer.Option(None, "--gpu-kv-budget", "--kv-budget", metavar="SIZE",
                                            help="KV pool (own server).",
                                            show_default=False),
    out: Optional[Path] = typer.Option(Path("bench_out/serve.json"), "--out", help="JSON results."),
    doc: Optional[Path] = typer.Option(None, "--doc", help="Write the Markdown table into this file's serve "
                                       "section (docs/BENCHMARKS.md)."),
    note: str = typer.Option("", "--note", help="A sentence about the conditions, written next to the numbers."),
    as_json: bool = JsonOpt,
):
    """Load-test a server: p50/p99 time to first token, throughput, every answer equal to its solo answer."""
    from skillkv.cli.common import check_device, check_store
    from skillkv.config import parse_bytes

    if url is None:
        check_store(store)
        device = check_device(device)
    from skillkv.measure.loadtest import run

    server_args = {"model": model, "skills": skills, "store": store, "device": device, "attention": attention,
                   "kv_budget": parse_bytes(kv_budget)}
    if url is not None and any(v for k, v in server_args.items() if k != "attention"):
        raise SkillkvError("--url tests a running server; --model/--skills/--store/--device/--kv-budget configure "
                           "an in-process one")
    log = (lambda s: err.print(s, markup=False, soft_wrap=True)) if as_json else print
    try:
        r = run(url=url.rstrip("/") if url else None, clients=clients, requests=requests, distinct=distinct,
                max_tokens=max_tokens, timeout=timeout, out=out, doc=doc, server_args=server_args, note=note,
                log=log)
    except (TimeoutError, RuntimeError, OSError) as e:
        raise SkillkvError(f"load test failed: {e}") from None
    if as_json:
        print_json(r)
    if r["errors"] or r["identical_to_solo"] != r["completed"]:
        raise typer.Exit(1)
