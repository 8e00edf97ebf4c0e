"""`skillkv eval`'s harness on a tiny random model: metrics, the doc section and the fidelity record."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, write_skill

from skillkv.compose import fidelity
from skillkv.compose.repair import Repair
from skillkv.errors import SkillkvError
from skillkv.measure.evaluate import BEGIN, END, has_fact, markdown, parse_settings, run_eval, write_section


@pytest.fixture
def eval_set(tmp_path, tiny_skills):
    root = tmp_path / "evalset"
    root.mkdir()
    (root / "skills").symlink_to(tiny_skills)
    rows = [{"id": "s1", "q": "What does B-17 mean?", "skills": ["beta-codes"], "expect": ["disk"]},
            {"id": "m1", "q": "Which level is the default?", "skills": ["beta-codes", "alpha-tool"],
             "needs": ["alpha-tool"], "expect": ["7"]}]
    (root / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_run_eval_measures_exact_as_identical_and_full_repair_as_identical(eval_set):
    from skillkv.api import SkillKV

    res = run_eval(lambda store: SkillKV(model="dummy:tiny", store=store, skills=eval_set / "skills", device="cpu"),
                   eval_set, [Repair(), Repair(lead=10 ** 6)], max_tokens=6, reverse=True)
    s = res["summary"]
    assert set(s) == {"single", "multi", "multi-reversed", "all"}
    for g in ("single", "multi"):
        assert s[g]["exact"]["top1"] == 1.0 and s[g]["exact"]["identical"] == 1.0
        assert s[g]["exact"]["kl_first"] < 1e-6
    full_repair = s["multi"][Repair(lead=10 ** 6).label]
    assert full_repair["top1"] == 1.0 and full_repair["identical"] == 1.0 and full_repair["recomputed"] > 0.3
    assert s["multi"][Repair().label]["recomputed"] == 0.0
    assert set(s["multi-reversed"]) == {"full", Repair().label, Repair(lead=10 ** 6).label}
    assert res["questions"] == 3  # two, plus the multi-skill one reversed
    text = markdown(res)
    assert text.startswith(BEGIN) and text.endswith(END) and "| compose (no repair) |" in text


def test_write_section_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "EVAL.md"
    doc.write_text("# Selection\nkeep me\n")
    write_section(doc, f"{BEGIN}\nfirst\n{END}")
    doc.write_text(doc.read_text() + "\n## Later section\nkeep me too\n")
    write_section(doc, f"{BEGIN}\nsecond\n{END}")
    text = doc.read_text()
    assert "keep me\n" in text and "keep me too" in text and "second" in text and "first" not in text
    assert text.count(BEGIN) == 1


def test_settings_and_fact_matching():
    assert parse_settings("0,lead16,r0.1,lead8+r0.15,d0.2+p3") == [
        Repair(), Repair(lead=16), Repair(recompute=0.1), Repair(lead=8, recompute=0.15),
        Repair(recompute=0.2, select="deviation", probe_layer=3)]
    assert Repair(recompute=0.2, select="deviation", probe_layer=3).label == (
        "compose (recompute 0.2 by deviation, probe layer 3)")
    assert Repair(lead=8, recompute=0.15).label == "compose (lead 8, recompute 0.15)"
    assert parse_settings("plain,plain+r0.15") == [Repair(neighbour=False), Repair(recompute=0.15, neighbour=False)]
    assert Repair(recompute=0.15, neighbour=False).label == "compose (plain, recompute 0.15)"
    with pytest.raises(SkillkvError):
        parse_settings("lots")
    assert has_fact("The canary gets 7 percent.", "7") and not has_fact("It listens on 7431.", "7")
    assert has_fact("use X-TIDE-KEY", "X-Tide-Key") and not has_fact("B-170", "B-17")


def test_best_setting_is_the_cheapest_passing_one():
    rec = {"fingerprint": "f", "full_fact_accuracy": 0.5, "settings": [
        {"repair": Repair(lead=32).to_json(), "top1": 0.99, "fact_accuracy": 0.5, "recomputed": 0.12},
        {"repair": Repair(lead=8).to_json(), "top1": 0.985, "fact_accuracy": 0.49, "recomputed": 0.04},
        {"repair": Repair().to_json(), "top1": 0.95, "fact_accuracy": 0.5, "recomputed": 0.0},
        {"repair": {"lead": -3}, "top1": 1.0, "fact_accuracy": 1.0, "recomputed": 0.0}]}
    assert fidelity.best_setting(rec) == Repair(lead=8)
    assert fidelity.best_setting(None) is None
    # full mode answering nothing measures nothing about facts: no setting passes, however close the tokens
    assert fidelity.best_setting({**rec, "full_fact_accuracy": 0.0,
                                  "settings": [{**x, "fact_accuracy": 0.0} for x in rec["settings"]]}) is None


def test_cli_eval_writes_json_doc_and_record(monkeypatch, capsys, eval_set, tmp_path):
    out, doc, store = tmp_path / "r.json", tmp_path / "EVAL.md", tmp_path / "store"
    code, stdout, err = run_cli(monkeypatch, capsys, "eval", "--set", str(eval_set), "--model", "dummy:tiny",
                                "--device", "cpu", "--store", str(store), "--settings", "0,lead4", "--max-tokens",
                                "4", "--threads", str(torch.get_num_threads()), "--out", str(out), "--doc", str(doc),
                                "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["record"]["settings"][0]["repair"] == Repair().to_json()
    assert json.loads(out.read_text())["summary"]["multi"]["exact"]["top1"] == 1.0
    assert BEGIN in doc.read_text()
    recs = list(store.glob("*/compose-fidelity.json"))
    assert len(recs) == 1 and json.loads(recs[0].read_text())["fingerprint"] == res["record"]["fingerprint"]
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--set", str(tmp_path / "nope"), "--model", "dummy:tiny")
    assert code != 0 and err.strip().startswith("skillkv: error:")


def test_shipped_record_is_keyed_by_weights_and_the_store_record_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "SHIPPED", tmp_path / "shipped")
    weights = "ab" * 32
    ok = {"repair": Repair(recompute=0.15).to_json(), "top1": 0.985, "fact_accuracy": 0.5, "recomputed": 0.15}
    rec = {"fingerprint": "f1", "weights_id": weights, "full_fact_accuracy": 0.5, "settings": [ok]}
    with pytest.raises(SkillkvError):
        fidelity.write_shipped({**rec, "weights_id": "random-seed-0"})  # dummy weights never ship
    fidelity.write_shipped(rec)
    assert "fingerprint" not in fidelity.read_shipped(weights)
    assert fidelity.read_shipped("cd" * 32) is None and fidelity.read_shipped("../x") is None
    store = tmp_path / "store"
    assert fidelity.best_setting(fidelity.for_model(store, "f2", weights)) == Repair(recompute=0.15)
    fidelity.write(store, {**rec, "fingerprint": "f2", "settings": [{**ok, "top1": 0.9}]})
    assert fidelity.best_setting(fidelity.for_model(store, "f2", weights)) is None  # the store's own measurement
    assert fidelity.best_setting(fidelity.for_model(store, "f3", weights)) == Repair(recompute=0.15)


def test_record_takes_the_worse_skill_order():
    from skillkv.measure.evaluate import fidelity_record

    r = Repair(recompute=0.15)
    row = lambda top1, facts: {"top1": top1, "facts": facts, "recomputed": 0.15}  # noqa: E731
    result = {"fingerprint": "f", "model": "m", "eval_set": "e", "summary": {
        "multi": {"full": {"facts": 0.5, "questions": 20}, r.label: row(0.99, 0.5)},
        "multi-reversed": {r.label: row(0.97, 0.5)}}}
    [s] = fidelity_record(result, [r])["settings"]
    assert s["top1"] == 0.97 and not s["passes"]


def test_a_second_model_gets_its_own_doc_section(monkeypatch, capsys, eval_set, tmp_path):
    """`--doc-section compose-gemma` writes a section of its own: the default model's section is kept as it is,
    and rerunning replaces only the named one. A bad section name is refused before any model runs."""
    doc = tmp_path / "EVAL.md"
    doc.write_text(f"intro\n{BEGIN}\ndefault model table\n{END}\nafter\n")
    args = ["eval", "--set", str(eval_set), "--model", "dummy:gemma3-tiny", "--device", "cpu", "--store",
            str(tmp_path / "store"), "--settings", "0", "--max-tokens", "3", "--no-reverse", "--limit", "2",
            "--out", str(tmp_path / "g.json"), "--doc", str(doc), "--command", "make eval-gemma", "--json"]
    for _ in range(2):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--doc-section", "compose-gemma")
        assert code == 0, err
    text = doc.read_text()
    assert text.startswith(f"intro\n{BEGIN}\ndefault model table\n{END}\nafter\n")
    assert text.count("<!-- compose-gemma:begin -->") == 1 and text.count("<!-- compose-gemma:end -->") == 1
    gemma = text.split("<!-- compose-gemma:begin -->")[1]
    assert "second model family: `dummy-gemma3-tiny`" in gemma and "make eval-gemma" in gemma
    assert "### Method notes" not in gemma
    code, out, err = run_cli(monkeypatch, capsys, *args, "--doc-section", "Bad Name!")  # --json: a JSON error
    assert code != 0 and err == "" and "bad docs section name" in json.loads(out)["error"]["message"]
