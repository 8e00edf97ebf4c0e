"""Statistics: every ask recorded with tiers; `skillkv stats` totals, per skill, plot; bad databases survive."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import run_cli as run

from skillkv.generate import SamplingParams
from skillkv.stats import DB_NAME, StatsDB, summary

GREEDY = SamplingParams(max_tokens=2)
TINY = ["--model", "dummy:tiny", "--device", "cpu"]


def test_every_ask_records_tiers(tiny_kv):
    tiny_kv.compile(["beta-codes"])
    tiny_kv.forget_resident()  # compile leaves the KV resident in the runner: start from disk
    a1 = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=GREEDY)  # from disk
    a2 = tiny_kv.ask("What does B-42 mean?", ["beta-codes"], params=GREEDY)  # resident in the runner (L1)
    a3 = tiny_kv.ask("Default level?", ["alpha-tool"], params=GREEDY)  # computed now
    a4 = tiny_kv.ask("Default level?", ["alpha-tool"], mode="full", params=GREEDY)
    assert (a1.tiers, a2.tiers, a3.tiers, a4.tiers) == (["l2"], ["l1"], ["computed"], ["computed"])
    rows = StatsDB(tiny_kv.store_root).asks(tiny_kv.tag)
    assert [r["mode"] for r in rows] == ["exact", "exact", "exact", "full"]
    assert [p["tier"] for r in rows for p in r["per_skill"]] == ["l2", "l1", "computed", "computed"]
    assert rows[0]["cached_tokens"] == a1.tokens["cached"] and rows[0]["ttft_ms"] == a1.timings_ms["ttft"]
    s = summary(rows)
    assert s["questions"] == 4 and s["prefill_tokens_saved"] == a1.tokens["cached"] + a2.tokens["cached"]
    assert s["tier_hits"] == {"l1": 1, "host": 0, "memory": 0, "l2": 1, "computed": 2}
    assert s["skills"]["beta-codes"]["uses"] == 2 and s["skills"]["beta-codes"]["tiers"]["l2"] == 1
    assert s["prefill_rate_tok_s"] is None and s["est_time_saved_s"] is None  # no rate given: unknown
    # the rate is the compile stage's, measured as `skillkv bench` does (full prefills of skill-sized prompts)
    rate, n = StatsDB(tiny_kv.store_root).prefill_rate(tiny_kv.tag)
    assert n >= 1 and rate > 0  # beta-codes' piece (>= 256 tokens) was computed
    s = summary(rows, rate)
    assert s["prefill_rate_tok_s"] == round(rate, 1) and s["est_time_saved_s"] == round(s["tokens"]["cached"] / rate, 3)


def test_stats_cli_json_and_plot(monkeypatch, capsys, tiny_skills, tmp_path):
    store = str(tmp_path / "store")
    common = ["--skills", str(tiny_skills), "--store", store, *TINY]
    assert run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY)[0] == 0
    for q in ("What does B-17 mean?", "What does B-42 mean?"):
        assert run(monkeypatch, capsys, "ask", q, "-s", "beta-codes", *common, "--max-tokens", "2", "--json")[0] == 0
    png = tmp_path / "stats.png"
    code, out, err = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), "--store", store, *TINY[:2],
                         "--json", "--plot", str(png), "--max-bytes", "10000000")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["questions"] == 2 and rep["tier_hits"]["l2"] == 2
    beta = rep["skills"]["beta-codes"]
    assert beta["uses"] == 2 and beta["state"] == "current" and beta["snapshot_bytes"] > 0
    assert rep["skills"]["gamma-notes"]["uses"] == 0 and rep["skills"]["gamma-notes"]["state"] == "current"
    assert 0 < rep["store"]["used_of_cap"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an edited skill shows as stale; the human table prints
    md = tiny_skills / "beta-codes" / "SKILL.md"
    md.write_text(md.read_text() + "\nmore\n")
    code, out, err = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), "--store", store, *TINY[:2])
    assert code == 0 and "beta-codes" in out and "stale" in out and "questions  2" in out


def test_corrupted_database_is_recreated_with_a_warning(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite at all" * 100)
    warnings = []
    db = StatsDB(tmp_path, on_warning=warnings.append)
    assert db.asks() == []
    assert len(warnings) == 1 and "recreated" in warnings[0]
    assert list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))
    from skillkv.stats import AskRecord

    db.record(AskRecord("m", "exact", ["a"], ["l2"], [10], 12, 10, 2, 1.0, 2.0, 3.0))
    assert len(db.asks()) == 1


def test_locked_database_skips_never_crashes(tiny_kv):
    tiny_kv.compile(["beta-codes"])
    db = StatsDB(tiny_kv.store_root)
    db.asks()  # create
    con = sqlite3.connect(str(db.path))
    con.execute("BEGIN EXCLUSIVE")
    try:
        tiny_kv._stats = StatsDB(tiny_kv.store_root, on_warning=tiny_kv.on_warning, timeout=0.1)
        ans = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=GREEDY)
        assert ans.answer is not None
        assert any("locked" in w and "skipped" in w for w in tiny_kv.warnings)
    finally:
        con.rollback()
        con.close()
    assert (tmp_path_db := db.path).exists() and StatsDB(tiny_kv.store_root).asks() == []
    assert not list(tmp_path_db.parent.glob(f"{DB_NAME}.corrupt-*"))


@pytest.mark.parametrize("damage", ["schema"])
def test_wrong_schema_is_recreated(tmp_path, damage):
    con = sqlite3.connect(str(tmp_path / DB_NAME))
    con.execute("CREATE TABLE asks (x INTEGER)")
    con.commit()
    con.close()
    warnings = []
    assert StatsDB(tmp_path, on_warning=warnings.append).asks() == [] and "recreated" in warnings[0]
