"""skillkv serve: an OpenAI-compatible server that keeps skills hot between questions (see skillkv.serve).

It logs one line per request on stderr (client, method, path, status, skills, cached / computed tokens, first token
and total time); with --json, every log line is a JSON object on stdout instead. Ctrl-C stops it cleanly (exit 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, FollowOpt, ModelOpt, PinOpt, SkillsOpt, StoreOpt


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS", help="Interface to bind (0.0.0.0 exposes "
                             "it to the network)."),
    port: int = typer.Option(8321, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    model: Optional[str] = ModelOpt,
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    device: Optional[str] = DeviceOpt,
    kv_budget: Optional[str] = typer.Option(None, "--gpu-kv-budget", "--kv-budget", metavar="SIZE", help="KV pool "
                                            "size, e.g. 2GiB (default: 2 GiB on the CPU, half the free GPU memory on "
                                            "CUDA).", show_default=False),
    host_budget: Optional[str] = typer.Option(None, "--host-budget", metavar="SIZE", help="Host memory for the host "
                                              "tier (snapshots) and for prefix-cache pages evicted from the KV pool, "
                                              "each (default: 4 GiB on CUDA, none on the CPU).", show_default=False),
    pin: Optional[list[str]] = PinOpt,
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most requests decoded together."),
    max_step_tokens: int = typer.Option(4096, "--max-step-tokens", min=1, help="Prompt tokens admitted per step."),
    max_body: str = typer.Option("1MiB", "--max-body-size", metavar="SIZE", help="Largest request body; a larger "
                                 "one is answered 413 without being read."),
    attention: str = typer.Option("auto", "--attention", metavar="BACKEND", help="auto | torch | flashinfer."),
    batch_invariant: Optional[bool] = typer.Option(None, "--batch-invariant/--no-batch-invariant",
                                                   help="Answers independent of batching (rows padded to 8, a GEMM "
                                                   "checked on this machine). Default: on where the check holds.",
                                                   show_default=False),
    watch: bool = typer.Option(True, "--watch/--no-watch", help="Recompile skills edited on disk."),
    neighbours: Optional[bool] = typer.Option(None, "--compose-neighbours/--no-compose-neighbours",
                                              help="Compile compose mode's neighbour snapshots at start (default: "
                                              "when auto mode composes this model).", show_default=False),
    max_tokens: int = typer.Option(256, "--default-max-tokens", min=1, help="Answer limit when a request sets none."),
    as_json: bool = typer.Option(False, "--json", help="Log lines as JSON objects on stdout (one per request: "
                                 "{\"event\": \"request\", ...})."),
):
    """Serve POST /v1/chat/completions (OpenAI API), /v1/models, /skills, /stats, /health."""
    import importlib.util

    from skillkv.cli.common import check_device, check_store, print_json, warn
    from skillkv.config import parse_bytes
    from skillkv.errors import SkillkvError

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise SkillkvError("skillkv serve needs FastAPI and uvicorn: pip install 'skillkv[serve]'")
    budget, body = parse_bytes(kv_budget), parse_bytes(max_body)
    host_bytes = parse_bytes(host_budget, allow_zero=True)
    check_store(store)
    device = check_device(device)
    from skillkv.serve.server import ServeConfig, Server

    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"binding {host}: the server has no authentication")
    cfg = ServeConfig(host=host, port=port, model=model, skills=skills, store=store, device=device,
                      kv_budget=budget, host_budget=host_bytes, pins=pin or [], max_batch=max_batch,
                      max_step_tokens=max_step_tokens,
                      attention=attention, batch_invariant=batch_invariant, watch=watch,
                      default_max_tokens=max_tokens, body_limit=body, follow_symlinks=follow_symlinks,
                      compose_neighbours=neighbours)
    if as_json:
        Server(cfg, log=lambda s: print_json({"event": "log", "message": s}), access=print_json).run()
    else:
        Server(cfg).run()
