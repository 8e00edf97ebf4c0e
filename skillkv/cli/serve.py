"""skillkv serve: an OpenAI-compatible server that keeps skills hot between questions (see skillkv.serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, ModelOpt, SkillsOpt, StoreOpt


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8321, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    model: Optional[str] = ModelOpt,
    skills: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    device: Optional[str] = DeviceOpt,
    kv_budget: Optional[str] = typer.Option(None, "--gpu-kv-budget", "--kv-budget", help="KV pool size, e.g. 2GiB "
                                            "(default: 2 GiB on the CPU, half the free GPU memory on CUDA).",
                                            show_default=False),
    pin: Optional[list[str]] = typer.Option(None, "--pin", help="Keep this skill resident (repeatable)."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most requests decoded together."),
    max_step_tokens: int = typer.Option(4096, "--max-step-tokens", min=1, help="Prompt tokens admitted per step."),
    attention: str = typer.Option("auto", "--attention", help="auto | torch | flashinfer."),
    batch_invariant: bool = typer.Option(True, "--batch-invariant/--no-batch-invariant",
                                         help="Answers independent of batching (rows padded to 8)."),
    watch: bool = typer.Option(True, "--watch/--no-watch", help="Recompile skills edited on disk."),
    max_tokens: int = typer.Option(256, "--default-max-tokens", min=1, help="Answer limit when a request sets none."),
):
    """Serve POST /v1/chat/completions (OpenAI API), /v1/models, /skills, /stats, /health."""
    import importlib.util

    from skillkv.cli.common import warn
    from skillkv.errors import SkillkvError
    from skillkv.config import parse_bytes
    from skillkv.serve.server import ServeConfig, Server

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise SkillkvError("skillkv serve needs FastAPI and uvicorn: pip install 'skillkv[serve]'")

    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"binding {host}: the server has no authentication")
    cfg = ServeConfig(host=host, port=port, model=model, skills=skills, store=store, device=device,
                      kv_budget=parse_bytes(kv_budget), pins=pin or [], max_batch=max_batch,
                      max_step_tokens=max_step_tokens, attention=attention, batch_invariant=batch_invariant,
                      watch=watch, default_max_tokens=max_tokens)
    Server(cfg).run()
