"""Shared fixtures: tiny random models for the many small cases, the real default model once per session."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

# as the CLI does (skillkv/cli/__init__.py): sleeping OpenMP workers, set before torch is imported. On the shared
# 2-core machine under load, tests/test_real_model.py took 174 s with it and 531 s with spinning workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_skill(root: Path, name: str, description: str, body: str, extra: str = "") -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "SKILL.md").write_text(f"---\nname: {name}\ndescription: {description}\n{extra}---\n{body}\n")
    return d


@pytest.fixture
def tiny_skills(tmp_path) -> Path:
    """Three small synthetic skills."""
    root = tmp_path / "skills"
    write_skill(root, "alpha-tool", "Use when the user asks about the alpha tool and its flags.",
                textwrap.dedent("""\
                # Alpha tool
                The alpha tool takes --frobnicate and --level N. Level 7 is the default.
                """) * 3)
    write_skill(root, "beta-codes", "Use for beta error codes and what they mean.",
                "Code B-17 means the disk is full. Code B-42 means a checksum mismatch.\n" * 4)
    write_skill(root, "gamma-notes", "Use when writing gamma release notes.",
                "Gamma notes list Added, Fixed and Removed sections.\n" * 2)
    return root


@pytest.fixture
def tiny_kv(tmp_path, tiny_skills):
    from skillkv.api import SkillKV

    warnings: list[str] = []
    kv = SkillKV(model="dummy:tiny", store=tmp_path / "store", skills=tiny_skills, device="cpu",
                 on_warning=warnings.append)
    kv.warnings = warnings
    return kv


@pytest.fixture(scope="session")
def real_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-store")


@pytest.fixture(scope="session")
def real_kv(real_store):
    """The real default model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per test session."""
    from skillkv.api import SkillKV

    kv = SkillKV(model="default", store=real_store, skills=REPO / "skills", device="cpu")
    kv.runner  # load weights once
    return kv


@pytest.fixture
def skills_copy(tmp_path) -> Path:
    """A private copy of the repository's skills, safe to edit."""
    dst = tmp_path / "skills"
    shutil.copytree(REPO / "skills", dst)
    return dst


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(monkeypatch, capsys, *argv):
    """Run `skillkv *argv` in-process; return (exit code, stdout, stderr)."""
    import sys

    from skillkv.cli import main

    monkeypatch.setattr(sys, "argv", ["skillkv", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def place_dependent_gemm(monkeypatch) -> None:
    """Make every weight GEMM mode give the first row of each call other bits, so that no GEMM of the machine is
    batch-invariant (engine/invariance.py's failing branch, forced on any CPU)."""
    from skillkv.engine import invariance
    from skillkv.engine.gemm import Linear

    plain = Linear._call

    def call(self, x, w, b=None):
        y = plain(self, x, w, b).clone()
        y[0] = y[0] * (1 + 2 ** -20)
        return y
    monkeypatch.setattr(Linear, "_call", call)
    monkeypatch.setattr(invariance, "_PROCESS", {})


def chain_kv(kv, skills):
    """The exact KV of preamble + `skills` in this order on the runner's device (stored pieces loaded, missing ones
    computed and stored)."""
    return kv.compiler.chain_kv(skills)[0]


def composed_kv(kv, skills, repair):
    """(contiguous KV, info) of compose mode's prefix of `skills`, read back from the runner's sequence."""
    o = kv.open(skills, "compose", repair)
    try:
        return kv.runner.read(o.seq, 0, o.seq.length), o.info
    finally:
        kv.runner.release(o.seq)


TINY = ["--model", "dummy:tiny", "--device", "cpu"]


def one_line_error(code, err, needle):
    """A known error from the CLI: non-zero exit, one line on stderr naming it, no traceback."""
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("skillkv: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err
