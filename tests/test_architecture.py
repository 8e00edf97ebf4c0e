"""The layout's contracts: layers import only downwards (import-linter, configured in pyproject.toml), one job per
file (api.py at most 300 lines, no module over 400), one byte-size parser for every option."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skillkv.config import parse_bytes
from skillkv.errors import SkillkvError

REPO = Path(__file__).resolve().parent.parent


def test_layers_import_only_downwards():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (make install installs it)")
    p = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "1 kept, 0 broken" in p.stdout


def test_one_job_per_file():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in (REPO / "skillkv").rglob("*.py")}
    assert sizes["skillkv/api.py"] <= 300
    assert {f: n for f, n in sizes.items() if n > 400} == {}


@pytest.mark.parametrize("text,expect", [("2G", 2 * 10**9), ("2GB", 2 * 10**9), ("2gb", 2 * 10**9),
                                         ("2GiB", 2 * 2**30), ("2Gi", 2 * 2**30), ("512MiB", 512 * 2**20),
                                         ("1.5GB", 1_500_000_000), ("100MB", 10**8), ("8 GB", 8 * 10**9),
                                         ("1000000", 10**6), ("64k", 64_000), ("64KiB", 65536), ("1TB", 10**12)])
def test_one_byte_parser_with_documented_units(text, expect):
    assert parse_bytes(text) == expect


@pytest.mark.parametrize("text", ["-1", "-2GB", "0", "x", "2GX", "1e9", "GB", ""])
def test_byte_parser_refuses_in_one_line(text):
    with pytest.raises(SkillkvError) as e:
        parse_bytes(text)
    assert "\n" not in str(e.value)


def test_every_size_option_uses_the_one_parser():
    """No module parses sizes on its own: the CLI's budget and cap options all go through config.parse_bytes."""
    for p in (REPO / "skillkv").rglob("*.py"):
        text = p.read_text()
        if p.name != "config.py":
            assert "def parse_bytes" not in text, p
    for cmd in ("ask", "serve", "compile", "gc", "stats", "loadtest", "watch"):
        src = (REPO / "skillkv" / "cli" / f"{cmd}.py").read_text() + (REPO / "skillkv/cli/common.py").read_text()
        if "budget" in src or "max-bytes" in src:
            assert "parse_bytes" in src, cmd
