"""skillkv compile SKILLS_DIR: one snapshot per skill per model, incremental by content hash + fingerprint.

One skill never stops the others: a skill that cannot compile (malformed, longer than the model's context, ...) is
"skipped" with its reason and every other skill compiles. Exit code: 0 when every skill is compiled or up to date,
1 when any was skipped, 2 for usage errors (a missing folder, a bad option).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import (DeviceOpt, EngineOpt, FollowOpt, JsonOpt, ModelOpt, SkillsArg, SkillsOpt, StoreOpt, err,
                                human_bytes, open_kv, out, print_json, printable, skills_dir)
from skillkv.cli.progress import CompileProgress
from skillkv.cli.table import Col, print_table

COLOR = {"compiled": "green", "recompiled": "green", "up to date": "", "skipped": "red"}


def summary(results) -> str:
    n = {s: sum(r.status == s for r in results) for s in ("compiled", "recompiled", "up to date", "skipped")}
    parts = [f"{n['compiled'] + n['recompiled']} compiled", f"{n['up to date']} up to date", f"{n['skipped']} skipped"]
    return ", ".join(parts)


@app.command("compile")
def compile_cmd(
    skills: Optional[Path] = SkillsArg,
    skills_opt: Optional[Path] = SkillsOpt,
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    model: Optional[str] = ModelOpt,
    compress: str = typer.Option("none", "--compress", metavar="CODEC", help="none | zstd (per-layer, byte-plane "
                                 "shuffled)."),
    force: bool = typer.Option(False, "--force", help="Recompile even current snapshots."),
    verify: bool = typer.Option(False, "--verify", help="Read every stored snapshot back (all checksums, not only "
                                "the header) and recompile the damaged ones."),
    neighbours: Optional[bool] = typer.Option(None, "--compose-neighbours/--no-compose-neighbours",
                                              help="Also compile compose mode's neighbour snapshots (default: when "
                                              "auto mode composes this model).", show_default=False),
    only: Optional[list[str]] = typer.Option(None, "--skill", metavar="SKILL", help="Compile only these skills "
                                             "(repeatable).", show_default=False),
    device: Optional[str] = DeviceOpt,
    engine: str = EngineOpt,
    as_json: bool = JsonOpt,
):
    """Compile SKILL.md folders into KV snapshots (skips skills whose snapshot is current).

    Exit code 0: every skill compiled or up to date; 1: a skill was skipped (the others compiled); 2: usage error."""
    skills = skills_dir(skills, skills_opt)
    kv = open_kv(model, store, skills, device, engine, follow_symlinks=follow_symlinks)
    todo = kv.pick(only) if only else kv.load_skills().skills
    if not force and not verify:  # the progress bar counts what is not current (by its header)
        current = {s.skill.name for s in kv.status() if s.state == "current"}
        todo = [s for s in todo if s.name not in current]
    progress = CompileProgress(kv.handle.name, [(s.name, len(kv.compiler.piece_ids([s], 0))) for s in todo],
                               enabled=not as_json)
    try:
        results = kv.compile(only or None, compression=compress, force=force, on_result=progress.result,
                             neighbours=neighbours, verify=verify)
    finally:
        progress.close()
    if as_json:
        print_json({"model": kv.handle.name, "fingerprint": kv.fingerprint, "store": str(kv.snapshots.dir),
                    "results": [asdict(r) for r in results], "summary": summary(results)})
    else:
        out.print(f"{kv.handle.name} -> {printable(str(kv.snapshots.dir))}", markup=False, soft_wrap=True)
        print_table([Col("skill"), Col("status"), Col("tokens", right=True), Col("size", right=True, drop=1),
                     Col("time", right=True, drop=2)],
                    [[r.skill, (r.status, COLOR.get(r.status, "")), f"{r.tokens:,}" if r.tokens else "",
                      human_bytes(r.bytes) if r.bytes else "", f"{r.seconds:.2f} s" if r.status != "skipped" else ""]
                     for r in results])
        for r in results:
            if r.status == "skipped" or r.reason:
                err.print(f"skillkv: {'skipped' if r.status == 'skipped' else 'note'}: {printable(r.reason)}",
                          markup=False, soft_wrap=True)
        out.print(summary(results), markup=False)
    if any(r.status == "skipped" for r in results):
        raise typer.Exit(1)
