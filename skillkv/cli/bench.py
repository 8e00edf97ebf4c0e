"""skillkv bench: measured numbers for docs/BENCHMARKS.md (see skillkv.measure.bench).

It measures in a temporary store of its own (a fresh compile is one of the numbers), so it takes no --store.
With --agent it runs the agent-trace benchmark instead (skillkv.measure.agent_bench): multi-turn agent conversations
against skillkv serve, the same server in `mode: full`, and llama.cpp's server, side by side; the options marked
"(--agent)" belong to it (--skills: the catalog and bodies of the traces and the in-process server's skills).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from skillkv.cli import app
from skillkv.cli.common import DeviceOpt, JsonOpt, ModelOpt, check_device, err, print_json
from skillkv.errors import SkillkvError


def _command(quick: bool, model: Optional[str], gguf: Optional[Path], given: dict) -> str:
    """The command that measures the same thing again (where the output goes and the note left out)."""
    keep = ["--conversations", "--turns", "--seed", "--scale", "--context", "--no-tools", "--concurrent",
            "--no-llamacpp", "--skills"]
    words = ["skillkv", "bench", "--agent"] + (["--quick"] if quick else []) + \
        (["--model", model] if model else []) + (["--gguf", str(gguf)] if gguf else [])
    for k in keep:
        v = given[k]
        words += [] if v is None else [k] if v is True else [k, str(v)]
    return shlex.join(words)


@app.command("bench")
def bench_cmd(
    model: Optional[str] = ModelOpt,
    out: Path = typer.Option(Path("bench_out"), "--out", metavar="DIR", help="Folder for the JSON results."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repetitions (smoke test); --agent: 6 turns."),
    device: Optional[str] = DeviceOpt,
    agent: bool = typer.Option(False, "--agent", help="Agent conversations against skillkv serve, mode full and "
                               "llama.cpp (issue 22) instead."),
    url: Optional[str] = typer.Option(None, "--url", metavar="URL", help="(--agent) A running skillkv server "
                                      "(default: start one in-process).", show_default=False),
    conversations: Optional[int] = typer.Option(None, "--conversations", min=1, max=64,
                                                help="(--agent) Conversations, default 4.", show_default=False),
    turns: Optional[int] = typer.Option(None, "--turns", min=4, max=200, help="(--agent) Requests per "
                                        "conversation, default 20 (6 with --quick).", show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="(--agent) Trace seed, default 0.",
                                       show_default=False),
    scale: Optional[float] = typer.Option(None, "--scale", min=0.05, max=64, help="(--agent) Multiply tool and "
                                          "result sizes, default 1 (8k context).", show_default=False),
    context: Optional[int] = typer.Option(None, "--context", min=256, help="(--agent) Context the traces fill "
                                          "(default: the model's, at most 8192 x scale).", show_default=False),
    no_tools: bool = typer.Option(False, "--no-tools", help="(--agent) Send no `tools`; tool calls flattened into "
                                  "the text."),
    concurrent: bool = typer.Option(False, "--concurrent", help="(--agent) One thread per conversation instead "
                                    "of round-robin."),
    no_llamacpp: bool = typer.Option(False, "--no-llamacpp", help="(--agent) Leave the llama.cpp column out."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", metavar="FILE", help="(--agent) The GGUF llama.cpp "
                                        "serves (default: the default model's).", show_default=False),
    skills: Optional[Path] = typer.Option(None, "--skills", metavar="DIR", help="(--agent) Skills folder (the "
                                          "catalog and the bodies the traces bring).", show_default=False),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help="(--agent) Snapshot store.",
                                         show_default=False),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="(--agent) Seconds per column, default "
                                            "3600.", show_default=False),
    kv_budget: Optional[str] = typer.Option(None, "--gpu-kv-budget", "--kv-budget", metavar="SIZE", help="(--agent) "
                                            "The in-process server's KV pool (default: as serve).", show_default=False),
    host_budget: Optional[str] = typer.Option(None, "--host-budget", metavar="SIZE", help="(--agent) The in-process "
                                              "server's host memory for the host tier and the prefix cache's spill "
                                              "(default: as serve).", show_default=False),
    doc: Optional[Path] = typer.Option(None, "--doc", metavar="FILE", help="(--agent) Write the table into this "
                                       "file's agent section.", show_default=False),
    note: Optional[str] = typer.Option(None, "--note", help="(--agent) A sentence written next to the numbers.",
                                       show_default=False),
    as_json: bool = JsonOpt,
):
    """Run the benchmarks and write JSON (and a Markdown table) under --out."""
    device = check_device(device)
    given = {"--url": url, "--conversations": conversations, "--turns": turns, "--seed": seed, "--scale": scale,
             "--context": context, "--no-tools": no_tools or None, "--concurrent": concurrent or None,
             "--no-llamacpp": no_llamacpp or None, "--gguf": gguf, "--skills": skills, "--store": store,
             "--timeout": timeout, "--doc": doc, "--note": note, "--host-budget": host_budget,
             "--gpu-kv-budget": kv_budget}
    if not agent:
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise SkillkvError(f"{extra[0]} belongs to the agent benchmark: add --agent")
        from skillkv.measure.bench import run_bench

        if not as_json:
            run_bench(model=model, out=out, quick=quick, device=device)
            return
        with contextlib.redirect_stdout(sys.stderr):  # the Markdown table: stdout holds only the JSON
            r = run_bench(model=model, out=out, quick=quick, device=device)
        print_json(r)
        return
    if url is not None and (store is not None or device is not None):
        raise SkillkvError("--url measures a running server; --store/--device configure an in-process one (--model "
                           "and --skills still say what the traces are made of)")
    if gguf is not None and not gguf.is_file():
        raise SkillkvError(f"--gguf {gguf}: no such file")
    from skillkv.cli.common import check_store
    from skillkv.config import parse_bytes
    from skillkv.measure.agent_bench import run

    check_store(store)
    log = lambda s: err.print(s, markup=False, soft_wrap=True)  # noqa: E731 - progress on stderr, as bench's
    try:
        r = run(url=url.rstrip("/") if url else None, model=model, skills=skills, store=store, device=device,
                conversations=conversations or 4, turns=turns or (6 if quick else 20), seed=seed or 0,
                scale=scale or 1.0, context=context, tools=not no_tools, concurrent=concurrent,
                llamacpp=not no_llamacpp, gguf=gguf, timeout=timeout or 3600, out=out / "agent.json", doc=doc,
                host_budget=parse_bytes(host_budget, allow_zero=True), kv_budget=parse_bytes(kv_budget),
                note=note or "", command=_command(quick, model, gguf, given), log=log)
    except (TimeoutError, RuntimeError, OSError) as e:
        raise SkillkvError(f"agent benchmark failed: {e}") from None
    from skillkv.measure.agent_report import markdown

    if as_json:
        print_json({k: v for k, v in r.items() if k != "columns"} | {"columns": {
            n: c["summary"] for n, c in r["columns"].items()}})
    else:
        print(markdown(r))
    failed = any(c["summary"]["errors"] for c in r["columns"].values())
    if failed or r["identical"]["mismatches"]:
        raise typer.Exit(1)
