"""`skillkv bench --quick` on the default model end to end: every scenario runs, exact answers equal full ones in
every row (from the store and resident), and the lean runner's rows come with the transformers runner's beside
them (the comparison docs/BENCHMARKS.md's CPU table is read by)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quick_bench_on_the_default_model(tmp_path, monkeypatch):
    from conftest import REPO

    from skillkv.measure.bench import markdown, run_bench

    monkeypatch.chdir(REPO)  # the bench compiles the project's skills/
    r = run_bench(out=tmp_path, quick=True, device="cpu", doc=None)
    assert r["engine"] == "paged" and r["reference"]["engine"] == "hf"
    assert [t["skill"] for t in r["ttft"]] == ["git-commit-messages", "gpu-performance"]
    for t in r["ttft"] + [r["reference"]["ttft"]]:
        assert t["identical_first_token"] and t["exact_ms"] > 0 and t["exact_resident_ms"] > 0 and t["full_ms"] > 0
    assert r["decode"]["tokens_per_s"] > 0 and r["reference"]["decode"]["tokens_per_s"] > 0
    assert r["cold"]["wall_ms"] > 0 and r["reference"]["cold"]["wall_ms"] > 0
    assert r["batch"]["identical_answers"] == r["batch"]["questions"]
    table = markdown(r)
    assert "transformers runner (`--engine hf`)" in table and "KV already resident" in table
    assert (tmp_path / "cpu.json").is_file()
