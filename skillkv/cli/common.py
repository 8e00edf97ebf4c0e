"""Options shared by several commands, defined once; the checks every command makes before it loads a model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from skillkv.errors import SkillkvError, StoreError
from skillkv.skills import printable  # noqa: F401 - the CLI prints text from skills through it

ModelOpt = typer.Option(None, "--model", "-m", metavar="MODEL", help="default | HF folder | file.gguf | "
                        "dummy:<preset>. Env: SKILLKV_MODEL.", show_default=False)
StoreOpt = typer.Option(None, "--store", metavar="DIR", help="Snapshot store folder (default ./cache_store; env "
                        "SKILLKV_STORE).", show_default=False)
SkillsOpt = typer.Option(None, "--skills", metavar="DIR", help="Skills folder (default ./skills; env "
                         "SKILLKV_SKILLS).", show_default=False)
SkillsArg = typer.Argument(None, metavar="SKILLS", help="Skills folder (default ./skills; env SKILLKV_SKILLS; or "
                           "--skills).", show_default=False)
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout (errors too: {\"error\": {...}}).")
DeviceOpt = typer.Option(None, "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when "
                         "available).", show_default=False)
EngineOpt = typer.Option("auto", "--engine", metavar="ENGINE", help="auto (paged where it can run the model) | hf "
                         "(transformers) | paged (KV pool, FlashInfer, CUDA graphs).")
KvBudgetOpt = typer.Option(None, "--gpu-kv-budget", metavar="SIZE", help="Paged engine KV pool size, e.g. 8GB or "
                           "512MiB (default: half the free device memory).", show_default=False)
HostBudgetOpt = typer.Option(None, "--host-kv-budget", metavar="SIZE", help="Paged engine host tier (pinned "
                             "memory) size, e.g. 16GB (default 4GiB).", show_default=False)
FollowOpt = typer.Option(False, "--follow-symlinks", help="Load skill folders and files that link outside the skills "
                         "folder (refused by default).")
PinOpt = typer.Option(None, "--pin", metavar="SKILL", help="Keep this skill resident in the paged engine's pool "
                      "(repeatable).", show_default=False)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]skillkv: warning:[/] {msg}", markup=True, highlight=False, soft_wrap=True)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def check_device(device: Optional[str]) -> Optional[str]:
    """`--device` checked before a model loads: cpu, cuda or cuda:N, and CUDA only where torch can use it."""
    if device is None:
        return None
    d = device.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", d):
        raise SkillkvError(f"unknown device {device!r} (cpu, cuda or cuda:N)")
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "this torch is built for the CPU only" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SkillkvError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if ":" in d and int(d.split(":")[1]) >= torch.cuda.device_count():
            raise SkillkvError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return d


def skills_dir(arg: Optional[Path], opt: Optional[Path]) -> Path:
    """The skills folder of a command that takes it as an argument or as --skills (the same folder twice is fine)."""
    from skillkv.config import default_skills

    if arg is not None and opt is not None and Path(arg) != Path(opt):
        raise SkillkvError(f"two skills folders given ({arg} and --skills {opt}); name one")
    return Path(arg or opt or default_skills())


def check_store(store: Optional[Path]) -> None:
    """A store path that is (or lies under) a file is refused in one line, by every command alike."""
    from skillkv.config import default_store

    root = Path(store) if store is not None else default_store()
    for p in (root, *root.parents):
        if p.is_dir():
            return
        if p.exists():
            where = "it is a file" if p == root else f"{p} is a file"
            raise StoreError(f"store {root} is not a folder ({where})")


def open_kv(model: Optional[str], store: Optional[Path], skills: Optional[Path], device: Optional[str] = None,
            engine: str = "auto", kv_budget: Optional[str] = None, pin: Optional[list[str]] = None,
            host_budget: Optional[str] = None, follow_symlinks: bool = False):
    from skillkv.config import parse_bytes

    budget, host = parse_bytes(kv_budget), parse_bytes(host_budget)  # checked before torch is imported
    check_store(store)
    device = check_device(device)
    from skillkv.api import SkillKV

    return SkillKV(model=model, store=store, skills=skills, device=device, on_warning=warn, engine=engine,
                   kv_budget=budget, pin=list(pin or []), host_budget=host, follow_symlinks=follow_symlinks)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(s: float) -> str:
    """12 ms, 1.25 s, 2 min 5 s."""
    if s < 1:
        return f"{s * 1e3:,.0f} ms"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"
