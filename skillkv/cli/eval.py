"""skillkv eval: fidelity of every mode (full, exact, compose at several repair settings, no skills) against a full
prefill on the composition evaluation set; writes JSON, the docs/EVAL.md section and the fidelity record that
`--mode auto` follows (see skillkv.measure.evaluate and skillkv.compose.fidelity)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, JsonOpt, ModelOpt, StoreOpt, err, open_kv, print_json


@app.command("eval")
def eval_cmd(
    eval_set: Optional[Path] = typer.Option(None, "--set", help="Evaluation folder with skills/ and questions.jsonl "
                                            "(default: eval/compose).", show_default=False),
    model: Optional[str] = ModelOpt,
    store: Optional[Path] = StoreOpt,
    settings: Optional[str] = typer.Option(None, "--settings", help="Compose settings, comma-separated, terms "
                                           "joined by +: 0 (no repair), leadN, rF (recompute F, front tokens), dF "
                                           "(recompute F by deviation), pN (its probe layer), plain (no neighbour "
                                           "snapshots) (default: plain,plain+d0.15,plain+r0.15,0,r0.1,r0.15).",
                                           show_default=False),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Teacher-forced / answer tokens."),
    reverse: bool = typer.Option(True, "--reverse/--no-reverse", help="Also run multi-skill questions with the "
                                 "skills in reverse order (order independence)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON results file (default: docs/results/"
                                       "compose-<model>.json).", show_default=False),
    doc: str = typer.Option("docs/EVAL.md", "--doc", help="Markdown file whose compose section "
                                       "is replaced ('' to skip)."),
    doc_section: str = typer.Option("compose", "--doc-section", help="Name of the --doc section "
                                    "(<!-- NAME:begin --> ... <!-- NAME:end -->): compose for the default model, "
                                    "another name (e.g. compose-gemma) for a second model family."),
    command: str = typer.Option("make eval", "--command", help="The command named in the section as the way to "
                                "reproduce it."),
    record: bool = typer.Option(True, "--record/--no-record", help="Store the fidelity record that --mode auto "
                                "follows for this model."),
    ship: bool = typer.Option(False, "--ship", help="Also write the record into the package (skillkv/"
                              "compose/fidelity_records/), where --mode auto finds it for these weights in any store "
                              "(make eval does, for the default model)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1 is steadier on a shared CPU)."),
    render: Optional[Path] = typer.Option(None, "--render", help="Only rewrite the --doc section from this saved "
                                          "JSON result (no model run)."),
    device: Optional[str] = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Measure how close each mode stays to a full prefill; write the table and the policy record."""
    import json

    from skillkv.measure.bench import machine
    from skillkv.measure.evaluate import (DEFAULT_SET, DEFAULT_SETTINGS, fidelity_record, markdown, markers,
                                  parse_settings, run_eval, write_section)
    from skillkv.errors import SkillkvError
    from skillkv.compose import fidelity

    import torch

    torch.set_num_threads(threads)
    markers(doc_section)  # a bad name fails before the model runs
    if render is not None:
        try:
            saved = json.loads(render.read_text())
        except (OSError, ValueError) as e:
            raise SkillkvError(f"cannot read result {render} ({e})") from None
        write_section(Path(doc or "docs/EVAL.md"), markdown(saved, saved.get("machine"), command, doc_section),
                      doc_section)
        return
    eval_set = eval_set or DEFAULT_SET
    if not (eval_set / "skills").is_dir():
        raise SkillkvError(f"evaluation set {eval_set} has no skills/ folder")
    reps = parse_settings(settings or DEFAULT_SETTINGS)
    main_kv = open_kv(model, store, eval_set / "skills", device)

    def factory(scratch: Path):
        from skillkv.api import SkillKV

        kv = SkillKV(model=model, store=scratch, skills=eval_set / "skills", device=device,
                     on_warning=main_kv.on_warning)
        kv.handle = main_kv.handle  # one model in memory
        kv.snapshots.fingerprint = main_kv.handle.fingerprint
        return kv

    progress = None if as_json else (lambda line: err.print(line, markup=False, soft_wrap=True))
    result = run_eval(factory, eval_set, reps, limit, max_tokens, reverse, progress)
    result["machine"] = machine()
    out = out or Path("docs/results") / f"compose-{result['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    rec = fidelity_record(result, reps)
    if record:
        fidelity.write(main_kv.snapshots.dir, rec)
    if ship:
        fidelity.write_shipped(rec)
    if doc:
        write_section(Path(doc), markdown(result, result["machine"], command, doc_section), doc_section)
    if as_json:
        print_json({"summary": result["summary"], "record": rec, "out": str(out)})
        return
    from skillkv.cli.table import Col, print_table

    best = fidelity.best_setting(rec)
    for g, modes in result["summary"].items():
        err.print(f"{g}:", markup=False)
        print_table([Col("setting"), Col("top1", right=True), Col("same", right=True), Col("facts", right=True),
                     Col("KL1", right=True, drop=3), Col("ttft", right=True, drop=2),
                     Col("recomp.", right=True, drop=1)],
                    [[m, f"{x['top1']:.3f}", f"{x['identical']:.0%}", f"{x['facts']:.0%}", f"{x['kl_first']:.4f}",
                      f"{x['ttft_ms']:.0f} ms", f"{x['recomputed']:.1%}"] for m, x in modes.items()], console=err)
    err.print(f"results: {out}; auto mode for this model: "
              f"{'compose with ' + best.label if best else 'exact (no setting meets the bar)'}", markup=False)
