"""Options shared by several commands, defined once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

ModelOpt = typer.Option(None, "--model", "-m", help="default | HF folder | file.gguf | dummy:<preset>. "
                        "Env: SKILLKV_MODEL.", show_default=False)
StoreOpt = typer.Option(None, "--store", help="Snapshot store folder (default ./cache_store; env SKILLKV_STORE).",
                        show_default=False)
SkillsOpt = typer.Option(None, "--skills", help="Skills folder (default ./skills; env SKILLKV_SKILLS).",
                         show_default=False)
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).", show_default=False)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]skillkv: warning:[/] {msg}", markup=True, highlight=False, soft_wrap=True)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def open_kv(model: Optional[str], store: Optional[Path], skills: Optional[Path], device: Optional[str] = None):
    from skillkv.api import SkillKV

    return SkillKV(model=model, store=store, skills=skills, device=device, on_warning=warn)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
