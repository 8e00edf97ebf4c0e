"""parse_skill / load_skills: validation, lenient loading, compiled text and content hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from skillkv.errors import SkillError
from skillkv.skills import load_skills, parse_skill

REPO_SKILLS = Path(__file__).parent.parent / "skills"


def make_skill(root: Path, folder: str, frontmatter: str, body: str = "Body text.\n") -> Path:
    """Write `root/folder/SKILL.md` with the given raw frontmatter lines; return the folder."""
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "SKILL.md").write_text(f"---\n{frontmatter.rstrip()}\n---\n{body}", encoding="utf-8")
    return d


def valid(root: Path, name: str, desc: str = "Use when testing.", body: str = "Body text.\n") -> Path:
    return make_skill(root, name, f"name: {name}\ndescription: {desc}", body)


def assert_one_line_about(problem: str, folder: Path) -> None:
    assert "\n" not in problem
    assert str(folder / "SKILL.md") in problem


# ---------------------------------------------------------------------------------------------- parse


def test_valid_skill_parses(tmp_path):
    d = make_skill(tmp_path, "pdf-tools", "name: pdf-tools\ndescription: '  Work with PDF files.  '\nlicense: MIT",
                   "# PDF\nUse pdftotext.\n")
    s = parse_skill(d)
    assert s.name == "pdf-tools"
    assert s.description == "Work with PDF files."
    assert s.body == "# PDF\nUse pdftotext.\n"
    assert s.path == d
    assert s.files == ()
    assert s.warnings == ()
    assert s.compiled_text == "# pdf-tools\nWork with PDF files.\n\n# PDF\nUse pdftotext.\n"


def test_valid_skill_loads_without_problems(tmp_path):
    valid(tmp_path, "pdf-tools")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["pdf-tools"]
    assert r.problems == [] and r.warnings == []
    assert set(r.by_name()) == {"pdf-tools"}


def test_name_differs_from_folder_is_a_warning_and_still_loads(tmp_path):
    d = make_skill(tmp_path, "folder-name", "name: other-name\ndescription: Something.")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["other-name"]
    assert r.problems == []
    assert len(r.warnings) == 1
    w = r.warnings[0]
    assert "\n" not in w and str(d / "SKILL.md") in w
    assert "other-name" in w and "folder-name" in w


def test_name_of_64_characters_is_valid(tmp_path):
    name = "a" * 64
    valid(tmp_path, name)
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == [name]
    assert r.problems == []


@pytest.mark.parametrize("bad", ["Bad-Name", "UPPER", "-leading", "trailing-", "double--hyphen", "under_score",
                                 "a" * 65])
def test_invalid_name_is_skipped_with_one_line_problem(tmp_path, bad):
    d = make_skill(tmp_path, "bad-skill", f"name: '{bad}'\ndescription: Something.")
    valid(tmp_path, "good-skill")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["good-skill"]
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], d)
    assert "invalid name" in r.problems[0]


@pytest.mark.parametrize("fm", ["name: no-desc", "name: no-desc\ndescription: ''", "name: no-desc\ndescription: '   '",
                                "name: no-desc\ndescription: [a, b]"])
def test_missing_or_empty_description_is_skipped(tmp_path, fm):
    d = make_skill(tmp_path, "no-desc", fm)
    valid(tmp_path, "ok-skill")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["ok-skill"]
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], d)
    assert "description" in r.problems[0]


def test_missing_name_is_skipped(tmp_path):
    d = make_skill(tmp_path, "no-name", "description: Something.")
    valid(tmp_path, "ok-skill")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["ok-skill"]
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], d)
    assert "'name'" in r.problems[0]


@pytest.mark.parametrize("fm", ["name: [unclosed\ndescription: x", "name: a\n  description: : :", "name: 'open\ndescription: x",
                                "name: x\n- item"])
def test_unparseable_yaml_is_skipped_others_still_load(tmp_path, fm):
    valid(tmp_path, "aaa-first")
    d = make_skill(tmp_path, "broken", fm)
    valid(tmp_path, "zzz-last")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["aaa-first", "zzz-last"]
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], d)
    assert "not valid YAML" in r.problems[0]
    assert r.warnings == []


def test_no_frontmatter_is_skipped(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "SKILL.md").write_text("# Just markdown\nno frontmatter here\n")
    valid(tmp_path, "ok-skill")
    r = load_skills(tmp_path)
    assert [s.name for s in r.skills] == ["ok-skill"]
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], d)


def test_frontmatter_that_is_not_a_mapping_is_skipped(tmp_path):
    d = make_skill(tmp_path, "listy", "- name\n- description")
    r = load_skills(tmp_path / "listy")
    assert r.skills == []
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], d)


def test_unknown_keys_warn_and_are_kept_in_metadata(tmp_path):
    d = make_skill(tmp_path, "meta-skill",
                   "name: meta-skill\ndescription: Something.\nversion: '2.1'\nauthor: Ada\ntags: [x, y]\n"
                   "metadata:\n  team: infra")
    r = load_skills(tmp_path)
    (s,) = r.skills
    assert s.metadata == {"team": "infra", "version": "2.1", "author": "Ada", "tags": ["x", "y"]}
    assert r.problems == []
    assert len(r.warnings) == 1
    w = r.warnings[0]
    assert "\n" not in w and str(d / "SKILL.md") in w
    for key in ("version", "author", "tags"):
        assert key in w


def test_known_optional_keys_do_not_warn(tmp_path):
    make_skill(tmp_path, "full-skill", "name: full-skill\ndescription: Something.\nlicense: MIT\n"
                                       "compatibility: any\nallowed-tools: Bash\nmetadata:\n  version: '1'")
    r = load_skills(tmp_path)
    assert r.warnings == [] and r.problems == []
    assert r.skills[0].metadata == {"version": "1"}


def test_non_string_unknown_key_does_not_crash_loading(tmp_path):
    make_skill(tmp_path, "odd-keys", "name: odd-keys\ndescription: Something.\n1: one\nversion: '2'")
    valid(tmp_path, "ok-skill")
    r = load_skills(tmp_path)
    assert "ok-skill" in r.by_name()


# ---------------------------------------------------------------------------------------------- compiled text


def test_references_are_compiled_in_sorted_order_and_scripts_are_not(tmp_path):
    d = valid(tmp_path, "ref-skill", body="Main body.\n")
    (d / "references").mkdir()
    (d / "references" / "b-second.md").write_text("SECOND REFERENCE\n")
    (d / "references" / "a-first.md").write_text("FIRST REFERENCE\n")
    (d / "references" / "c-third.md").write_text("THIRD REFERENCE\n")
    (d / "scripts").mkdir()
    (d / "scripts" / "run.py").write_text("print('SCRIPT CODE')\n")
    (d / "scripts" / "notes.md").write_text("SCRIPT NOTES\n")
    s = parse_skill(d)
    assert [rel for rel, _ in s.files] == ["references/a-first.md", "references/b-second.md",
                                           "references/c-third.md"]
    text = s.compiled_text
    i1, i2, i3 = (text.index(x) for x in ("FIRST REFERENCE", "SECOND REFERENCE", "THIRD REFERENCE"))
    assert text.index("Main body.") < i1 < i2 < i3
    assert "## File: references/a-first.md" in text
    assert "SCRIPT CODE" not in text and "SCRIPT NOTES" not in text


def test_content_hash_tracks_body_and_references_not_scripts(tmp_path):
    d = valid(tmp_path, "hash-skill", body="Version one.\n")
    (d / "references").mkdir()
    (d / "references" / "ref.md").write_text("Reference one.\n")
    (d / "scripts").mkdir()
    (d / "scripts" / "tool.sh").write_text("echo one\n")
    h0 = parse_skill(d).content_hash
    assert parse_skill(d).content_hash == h0  # deterministic

    (d / "scripts" / "tool.sh").write_text("echo two\n")
    (d / "scripts" / "new.md").write_text("new script doc\n")
    assert parse_skill(d).content_hash == h0

    (d / "references" / "ref.md").write_text("Reference two.\n")
    h1 = parse_skill(d).content_hash
    assert h1 != h0

    md = d / "SKILL.md"
    md.write_text(md.read_text().replace("Version one.", "Version two."))
    h2 = parse_skill(d).content_hash
    assert h2 not in (h0, h1)


def test_content_hash_ignores_metadata_but_tracks_description(tmp_path):
    d = make_skill(tmp_path, "m-skill", "name: m-skill\ndescription: First.\nmetadata:\n  version: '1'")
    h0 = parse_skill(d).content_hash
    make_skill(tmp_path, "m-skill", "name: m-skill\ndescription: First.\nmetadata:\n  version: '2'")
    assert parse_skill(d).content_hash == h0
    make_skill(tmp_path, "m-skill", "name: m-skill\ndescription: Second.\nmetadata:\n  version: '2'")
    assert parse_skill(d).content_hash != h0


# ---------------------------------------------------------------------------------------------- load_skills


def test_missing_folder_raises(tmp_path):
    with pytest.raises(SkillError, match="does not exist"):
        load_skills(tmp_path / "nope")


def test_empty_folder_raises(tmp_path):
    (tmp_path / "sub").mkdir()  # a sub-folder without SKILL.md does not count
    with pytest.raises(SkillError, match="no skills"):
        load_skills(tmp_path)


def test_file_instead_of_folder_raises(tmp_path):
    f = tmp_path / "SKILL.md"
    f.write_text("---\nname: x\ndescription: y\n---\n")
    with pytest.raises(SkillError, match="not a folder"):
        load_skills(f)


def test_duplicate_name_second_is_a_problem(tmp_path):
    first = make_skill(tmp_path, "aaa-folder", "name: dup-name\ndescription: First.")
    second = make_skill(tmp_path, "bbb-folder", "name: dup-name\ndescription: Second.")
    r = load_skills(tmp_path)
    assert [(s.name, s.path) for s in r.skills] == [("dup-name", first)]
    assert r.skills[0].description == "First."
    assert len(r.problems) == 1
    assert_one_line_about(r.problems[0], second)
    assert "dup-name" in r.problems[0]


def test_folder_that_is_itself_a_skill_loads_as_one(tmp_path):
    root = valid(tmp_path, "single-skill")
    valid(root, "nested-skill")  # ignored: root itself is the skill
    r = load_skills(root)
    assert [s.name for s in r.skills] == ["single-skill"]
    assert r.skills[0].path == root
    assert r.problems == [] and r.warnings == []


def test_repository_skills_load_cleanly():
    r = load_skills(REPO_SKILLS)
    assert r.problems == []
    assert r.warnings == []
    folders = sorted(p.parent.name for p in REPO_SKILLS.glob("*/SKILL.md"))
    assert folders and [s.name for s in r.skills] == folders
