"""What each command imports, read from `sys.modules` of a fresh process once the command has run: `skillkv ask` on
the default model (the lean runner) never imports transformers (nor the sympy / torch._dynamo it pulls in); `ls`,
`stats`, `gc` and a `compile` with every snapshot up to date import neither torch nor transformers (on a CPU-only
torch build: with a CUDA build, choosing the device asks torch whether a GPU is there).

Not `-X importtime`: an ask imports torch from two threads at once (the tiers' reader and the main thread), and the
interpreter's per-import lines then interleave on stderr, so a module's line can be lost (seen: torch missing from
3 runs in 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from skillkv.model.files import torch_build_has_accelerator

CPU_ONLY = pytest.mark.skipif(torch_build_has_accelerator(), reason="a CUDA build of torch: the device check imports it")
Q = "How long should the subject line of a commit message be?"


AFTER = ("import json, sys\nfrom skillkv.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
         "    assert e.code in (0, None), e.code\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)")


def _imported(argv: list[str]) -> set[str]:
    """Every module loaded once `skillkv *argv` has run (main(), as the console entry point runs it)."""
    p = subprocess.run([sys.executable, "-c", AFTER, *argv], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert p.returncode == 0, (argv, p.stderr[-800:])
    return set(json.loads(p.stderr.strip().splitlines()[-1]))


def _heavy(mods: set[str], roots: tuple[str, ...]) -> set[str]:
    return {m for m in mods if m.split(".")[0] in roots}


@pytest.mark.slow
@pytest.mark.parametrize("pick", [["--skill", "git-commit-messages"], []], ids=["named-skill", "automatic-selection"])
def test_ask_on_the_default_model_imports_no_transformers(real_kv, real_store, pick):
    """With a named skill, and with automatic selection (its embedding model runs on select/bert.py)."""
    from skillkv.generate import SamplingParams

    real_kv.ask(Q, ["git-commit-messages"], params=SamplingParams(max_tokens=1))  # the snapshot is stored
    mods = _imported(["ask", Q, *pick, "--store", str(real_store), "--skills", str(real_kv.skills_dir),
                      "--max-tokens", "1", "--json", "--device", "cpu"])
    assert "torch" in mods and "skillkv.engine.llama" in mods  # it did run the lean runner
    assert ("skillkv.select.bert" in mods) == (not pick)  # automatic selection embedded the question
    assert _heavy(mods, ("transformers", "sympy")) == set()
    assert not {m for m in mods if m.startswith(("torch._dynamo", "torch.distributed.tensor"))}


def _store_commands(store, skills, model: list[str]) -> list[list[str]]:
    where = ["--store", str(store), *model]
    return [["ls", str(skills), *where], ["stats", "--skills", str(skills), *where], ["gc", str(skills), *where],
            ["compile", str(skills), *where]]


@CPU_ONLY
def test_store_commands_import_neither_torch_nor_transformers(tiny_kv, tiny_skills):
    """Everything compiled (the last command, compile, finds every snapshot current)."""
    assert {r.status for r in tiny_kv.compile()} == {"compiled"}
    for argv in _store_commands(tiny_kv.store_root, tiny_skills, ["--model", "dummy:tiny"]):
        assert _heavy(_imported(argv), ("torch", "transformers")) == set(), argv[0]


@CPU_ONLY
@pytest.mark.slow
def test_store_commands_on_the_default_model_import_neither_torch_nor_transformers(real_kv, real_store):
    real_kv.compile()
    for argv in _store_commands(real_store, real_kv.skills_dir, []):
        assert _heavy(_imported(argv), ("torch", "transformers")) == set(), argv[0]
