"""Lenient repairs, named wrong types, strict validation and `printable`: the messages a user reads."""

from __future__ import annotations

import pytest

from skillkv.errors import SkillError
from skillkv.frontmatter import parse_lenient, parse_strict
from skillkv.skills import load_skills, parse_skill, printable, validate_skill


def skill(root, folder, text: str):
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "SKILL.md").write_text(text, encoding="utf-8")
    return d


@pytest.mark.parametrize("value,word", [("123", "a number"), ("1.5", "a number"), ("true", "a boolean"),
                                        ("[a]", "a list"), ("{a: b}", "a mapping"), ("2024-01-01", "a date")])
def test_wrong_types_are_named(tmp_path, value, word):
    d = skill(tmp_path, "typed", f"---\nname: {value}\ndescription: x\n---\nbody\n")
    with pytest.raises(SkillError, match=f"'name' must be a string, got {word}$"):
        parse_skill(d)


def test_colon_repair_keeps_the_whole_value_and_says_so(tmp_path):
    fm = "name: c\ndescription: The runbook: severity levels: paging\nmetadata:\n  note: a: b\n"
    data, body, warnings = parse_lenient(f"---\n{fm}---\nBody\n", "X/SKILL.md")
    assert data["description"] == "The runbook: severity levels: paging"
    assert data["metadata"] == {"note": "a: b"}
    assert body == "Body\n"
    assert len(warnings) == 2 and all(w.startswith("X/SKILL.md: line ") and "': '" in w for w in warnings)


def test_block_scalars_are_not_touched_by_the_repair():
    text = "---\nname: c\ndescription: |\n  keep: this: as is\n  and: this\nbad: a: b\n---\n"
    data, _, warnings = parse_lenient(text, "X")
    assert data["description"] == "keep: this: as is\nand: this\n" and data["bad"] == "a: b"
    assert len(warnings) == 1


def test_a_valid_file_needs_no_repair_and_gives_no_warning():
    data, _, warnings = parse_lenient("---\nname: c\ndescription: 'quoted: fine'\n---\n", "X")
    assert warnings == [] and data["description"] == "quoted: fine"


def test_bom_is_a_repair_and_the_body_is_unchanged(tmp_path):
    plain = skill(tmp_path / "a", "bom-skill", "---\nname: bom-skill\ndescription: x\n---\nBody.\n")
    bom = skill(tmp_path / "b", "bom-skill", "\ufeff---\nname: bom-skill\ndescription: x\n---\nBody.\n")
    s1, s2 = parse_skill(plain), parse_skill(bom)
    assert s1.content_hash == s2.content_hash and s1.warnings == ()
    assert len(s2.warnings) == 1 and "byte-order mark" in s2.warnings[0]


def test_strict_reads_strings_only_and_refuses_flow_anchors_and_repeats():
    assert parse_strict("---\nname: 123\ndescription: x\n---\n", "X") == {"name": "123", "description": "x"}
    for bad in ("name: [a]", "name: &a x\ndescription: *a", "name: x\nname: y", "name: !!str x"):
        with pytest.raises(SkillError):
            parse_strict(f"---\n{bad}\n---\n", "X")


def test_validate_skill_names_the_problems(tmp_path):
    d = skill(tmp_path, "folder", "---\nname: other\ndescription: x\nversion: 1\n---\n")
    problems = validate_skill(d)
    assert len(problems) == 2 and all(str(d / "SKILL.md") in p for p in problems)
    assert any("unexpected keys version" in p for p in problems) and any("differs" in p for p in problems)
    assert validate_skill(tmp_path / "nope") and validate_skill(tmp_path)  # missing folder; no SKILL.md


def test_printable_makes_escapes_visible():
    assert printable("ok text é 名字") == "ok text é 名字"
    assert printable("\x1b[2J\x07\r\t\u202eevil\n") == "\\x1b[2J\\x07\\x0d\\x09\\u202eevil\\x0a"
    assert printable("a\nb", keep_newlines=True) == "a\nb"


def test_problem_folders_line_up_with_problems(tmp_path):
    skill(tmp_path, "good", "---\nname: good\ndescription: x\n---\nb\n")
    (tmp_path / "empty").mkdir()
    skill(tmp_path, "bad", "---\nname: [\n---\n")
    r = load_skills(tmp_path)
    assert [p.name for p in r.problem_folders] == ["bad", "empty"]
    assert all(str(f) in p for f, p in zip(r.problem_folders, r.problems))


def test_no_skills_at_all_names_the_first_folder(tmp_path):
    (tmp_path / "just-a-folder").mkdir()
    with pytest.raises(SkillError, match="holds no skills.*just-a-folder.*empty folder"):
        load_skills(tmp_path)


def test_a_control_character_in_a_folder_name_stays_one_line(tmp_path):
    d = skill(tmp_path, "evil\x1b[31m\nname", "---\nname: [\n---\n")
    r = load_skills(tmp_path)
    assert len(r.problems) == 1 and "\n" not in r.problems[0] and "\x1b" not in r.problems[0]
    assert printable(d) in r.problems[0]
