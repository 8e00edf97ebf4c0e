"""skillkv export: hand compiled skills to a vLLM + LMCache fleet or an SGLang HiCache fleet (skillkv.export).

    skillkv export SKILL... --to lmcache DIR --model-name NAME [--tp N] [--hash sha256_cbor] [--hash-seed 0]
    skillkv export SKILL... --to sglang-hicache DIR --model-name NAME [--tp N] [--page-size 64]
                   [--layout page_first|layer_first]
    skillkv export --check DIR
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, FollowOpt, JsonOpt, ModelOpt, SkillsOpt, StoreOpt, open_kv, out, print_json
from skillkv.errors import SkillkvError


def _print_export(r: dict) -> None:
    unit = "chunk" if r["target"] == "lmcache" else "page"
    size = r[f"{unit}_size"]
    out.print(f"[bold]{r['target']}[/] -> {r['folder']}  ({r['model_name']}, {r['dtype']}, tp {r['tp']})",
              soft_wrap=True, markup=True)
    out.print(f"skills: {', '.join(r['skills'])}", markup=False)
    out.print(f"exported {r['exported_tokens']} of the prompt's {r['prefix_tokens']} skill tokens as "
              f"{r[unit + 's']} full {unit}s of {size} x {r['tp']} rank(s): {r['files']} files "
              f"({r['written']} written, {r['kept']} already there); KV from {r['kv_source']}", markup=False)
    if r["left_out_tokens"]:
        out.print(f"left out: the last {r['left_out_tokens']} tokens (a partial {unit}; the target stores and "
                  f"looks up only full {unit}s)", markup=False)
    if r["cut_by_probes"]:
        out.print(f"left out: {r['cut_by_probes']} tokens at the skills' end that a question could tokenize "
                  "differently", markup=False)
    if r["skillkv_ids_agree"] < r["exported_tokens"]:
        out.print(f"note: the target tokenizes the whole prompt at once; skillkv's segment-wise ids differ from "
                  f"token {r['skillkv_ids_agree']}, so the KV was prefilled for the target's ids", markup=False)
    out.print(f"manifest: {r['manifest']}  (the system message clients must send is in it)", markup=False,
              soft_wrap=True)


def _print_check(reports: list[dict]) -> None:
    for rep in reports:
        status = "[green]ok[/]" if rep["ok"] else "[red]MISSES[/]"
        out.print(f"{status} {rep['manifest']}: {rep['target']} {rep['model_name']} "
                  f"[{', '.join(rep['skills'])}]", markup=True, soft_wrap=True, highlight=False)
        for r in rep["ranks"]:
            out.print(f"  rank {r['rank']}: {r['hits']}/{r['chunks']} chunks hit, {r['tokens']} of "
                      f"{rep['prompt_tokens']} prompt tokens; reader {r['reader']}; keys {r['keys']}",
                      markup=False, soft_wrap=True)
            for p in r["problems"]:
                out.print(f"    {p}", markup=False, soft_wrap=True)


@app.command("export")
def export_cmd(
    skills: Optional[list[str]] = typer.Argument(None, help="Skills, in prompt order.", show_default=False),
    to: Optional[tuple[str, Path]] = typer.Option(
        None, "--to", metavar="TARGET DIR", help="lmcache (vLLM + LMCache fs:// folder) or sglang-hicache "
        "(HiCache file storage folder).", show_default=False),
    check: Optional[Path] = typer.Option(None, "--check", help="Read an export folder back through the "
                                         "target's own code and report hits.", show_default=False),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model name the fleet serves "
                                             "(vLLM --model / served name, SGLang --served-model-name).",
                                             show_default=False),
    tp: int = typer.Option(1, "--tp", help="The fleet's tensor-parallel size (files per rank)."),
    hash_: str = typer.Option("sha256_cbor", "--hash", help="LMCache pre_caching_hash_algorithm: sha256_cbor "
                              "(vLLM fleets) or builtin (LMCache without vLLM)."),
    hash_seed: str = typer.Option("0", "--hash-seed", help="The fleet's PYTHONHASHSEED (sha256_cbor)."),
    page_size: int = typer.Option(64, "--page-size", help="SGLang --page-size."),
    layout: str = typer.Option("page_first", "--layout", help="SGLang --hicache-mem-layout: page_first | "
                               "layer_first."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="The fleet's KV dtype; must equal the model's "
                                        "(default: the model's).", show_default=False),
    store: Optional[Path] = StoreOpt,
    follow_symlinks: bool = FollowOpt,
    skills_dir: Optional[Path] = SkillsOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Export skills' KV for a vLLM + LMCache or SGLang HiCache fleet, or --check an export folder."""
    from skillkv.export import check as check_folder, export, validate

    if check is not None:
        if to is not None or skills:
            raise SkillkvError("--check DIR takes no skills and no --to")
        reports = check_folder(check)
        print_json({"reports": reports}) if as_json else _print_check(reports)
        if not all(r["ok"] for r in reports):
            raise typer.Exit(1)
        return
    if to is None or to[0] is None:
        raise SkillkvError("say where to: --to lmcache DIR or --to sglang-hicache DIR (or --check DIR)")
    if not skills:
        raise SkillkvError("name the skills to export, in prompt order")
    if not model_name:
        raise SkillkvError("--model-name is required: the name the fleet serves the model under")
    target, folder = to
    validate(target, model_name, tp, hash_, hash_seed, page_size, layout)
    kv = open_kv(model, store, skills_dir, device, follow_symlinks=follow_symlinks)
    r = export(kv, list(skills), target, folder, model_name, tp=tp, hash=hash_, hash_seed=hash_seed,
               page_size=page_size, layout=layout, dtype=dtype)
    print_json(r) if as_json else _print_export(r)
