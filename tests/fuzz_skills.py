"""The fuzz corpus of malformed and hostile skill folders (issue 12), generated at test time: nothing big committed.

`build(root, outside)` writes every case under `root` (and link targets under `outside`, a folder beside it) and
returns {folder name: Case}. `Case.kind` says what loading must do:
  "skip"  one problem line naming the folder; the skill is not loaded
  "warn"  the skill loads, with exactly one warning line naming the folder
  "good"  the skill loads with no line at all (CRLF, a 5 MB body, a Unicode name, escapes in a description)
`Case.strict` is False where skillkv's own bounds (not the spec) decide, so the strict verdict may differ from the
spec's reference validator there; `Case.special` marks cases the reference validator cannot be run on (a FIFO it
would block on forever).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Case:
    kind: str
    strict: bool = True
    special: bool = False


def fm(name: str, desc: str = "Use when testing.", extra: str = "") -> str:
    return f"---\nname: {name}\ndescription: {desc}\n{extra}---\n# Body\nSome text.\n"


def _write(root: Path, folder: str, text: str | bytes) -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "SKILL.md").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def build(root: Path, outside: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}

    def add(folder: str, kind: str, text: str | bytes | None = None, **kw) -> Path:
        cases[folder] = Case(kind, **kw)
        return _write(root, folder, text if text is not None else fm(folder))

    # broken YAML and frontmatter shapes
    broken = ["name: [unclosed\ndescription: x", "name: 'open\ndescription: x", "name: x\n- item",
              "name: a\n  description: : :", "name: {a: b\ndescription: x", "name: x\ndescription: \"bad \\q\"",
              "name: x\n description: y\n  other: z", "? [a\n: b", "name: x\ndescription: y\n...\nmore: z",
              "name: x\ndescription: y\n  key: [z", "name: x\n  description: y", "%YAML 9.9\n---",
              "name: x\ndescription: @reserved", "name: x\ndescription: `tick", "&a name: x\n*a : y"]
    for i, b in enumerate(broken):
        add(f"broken-yaml-{i:02d}", "skip", f"---\n{b}\n---\nBody\n")
    add("no-frontmatter", "skip", "# Just markdown\nno frontmatter here\n")
    add("unclosed-frontmatter", "skip", "---\nname: unclosed-frontmatter\ndescription: x\nBody with no end\n")
    add("empty-frontmatter", "skip", "---\n\n---\nBody\n")
    add("frontmatter-is-list", "skip", "---\n- a\n- b\n---\nBody\n")
    add("frontmatter-is-scalar", "skip", "---\njust a string\n---\nBody\n")
    add("empty-file", "skip", "")
    # wrong types and missing keys
    for tag, value in [("int", "123"), ("float", "1.5"), ("bool", "true"), ("null", "null"), ("list", "\n  - a"),
                       ("map", "\n  a: b"), ("date", "2024-01-01")]:
        add(f"type-name-{tag}", "skip", f"---\nname: {value}\ndescription: Something.\n---\nBody\n")
        add(f"type-desc-{tag}", "skip", f"---\nname: type-desc-{tag}\ndescription: {value}\n---\nBody\n")
    add("missing-name", "skip", "---\ndescription: Something.\n---\nBody\n")
    add("missing-description", "skip", "---\nname: missing-description\n---\nBody\n")
    add("empty-description", "skip", "---\nname: empty-description\ndescription: '   '\n---\nBody\n")
    # names: invalid, path traversal, control characters
    for i, bad in enumerate(["Upper-Case", "under_score", "-leading", "trailing-", "double--hyphen", "a" * 65,
                             "../../etc/passwd", "a/b", "..", ".hidden", "with space", "dot.name",
                             "\"\\e[2J\\e[31mred\"", "\"tab\\tname\"", "\"nul\\0name\""]):
        add(f"bad-name-{i:02d}", "skip", f"---\nname: {bad}\ndescription: Something.\n---\nBody\n")
    # bounds: huge frontmatter, deep nesting, alias bombs, size
    add("huge-frontmatter", "skip", fm("huge-frontmatter", "x" * 100_000))
    add("deep-flow", "skip", fm("deep-flow", extra="metadata: " + "[" * 5000 + "]" * 5000 + "\n"))
    block = "".join(f"{'  ' * i}k{i}:\n" for i in range(1, 200)) + "  " * 200 + "v: 1\n"
    add("deep-block", "skip", fm("deep-block", extra="metadata:\n" + block), strict=False)  # the spec sets no depth
    bomb = "metadata:\n  a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n" + "".join(
        f"  {c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    add("alias-bomb", "skip", fm("alias-bomb", extra=bomb))
    add("recursive-alias", "skip", fm("recursive-alias", extra="metadata: &r\n  self: *r\n"))
    add("too-big", "skip", fm("too-big") + "x" * (17 << 20), strict=False)
    # bytes: encodings and NULs
    add("latin1", "skip", fm("latin1", "Caf\xe9 au lait").encode("latin-1"))
    add("nul-bytes", "skip", fm("nul-bytes") + "\0\0binary\0", strict=False)  # the spec allows NUL in a body
    add("utf16", "skip", fm("utf16").encode("utf-16"))
    add("truncated-utf8", "skip", fm("truncated-utf8").encode() + "é".encode()[:1])
    # lenient: repaired (one warning) or loaded with one warning
    add("bom", "warn", "\ufeff" + fm("bom"))
    add("tabs", "warn", "---\nname: tabs\ndescription: Something.\nmetadata:\n\tversion: '1'\n---\nBody\n")
    add("colon-value", "warn", fm("colon-value", "The runbook: severity levels, paging and escalation"))
    add("colon-multiline", "warn", "---\nname: colon-multiline\ndescription: Use when: deploying\n  to staging: "
        "or prod\n---\nBody\n")
    add("unknown-keys", "warn", fm("unknown-keys", extra="version: 1.2\nauthor: someone\n"))
    add("name-not-folder", "warn", fm("another-name"))
    add("long-description", "warn", fm("long-description", "d" * 1500))
    add("long-compatibility", "warn", fm("long-compatibility", extra=f"compatibility: {'c' * 600}\n"))
    add("license-int", "warn", fm("license-int", extra="license: 2\n"))
    add("metadata-list", "warn", fm("metadata-list", extra="metadata:\n  - a\n"))
    add("empty-body", "warn", "---\nname: empty-body\ndescription: x\n---\n")
    d = add("lowercase-skill-md", "warn")
    os.replace(d / "SKILL.md", d / "skill.md")
    # files and folders that are not skills
    (root / "empty-folder").mkdir()
    cases["empty-folder"] = Case("skip")
    (root / "no-skill-md").mkdir()
    (root / "no-skill-md" / "README.md").write_text("not a skill\n")
    cases["no-skill-md"] = Case("skip")
    (root / "skill-md-is-dir" / "SKILL.md").mkdir(parents=True)
    cases["skill-md-is-dir"] = Case("skip")
    (root / "skill-md-is-fifo").mkdir()
    os.mkfifo(root / "skill-md-is-fifo" / "SKILL.md")
    cases["skill-md-is-fifo"] = Case("skip", special=True)
    (root / "skill-md-dangling").mkdir()
    (root / "skill-md-dangling" / "SKILL.md").symlink_to(root / "nowhere.md")
    cases["skill-md-dangling"] = Case("skip")
    add("zz-duplicate-name", "skip", fm("valid-plain"))
    # links out of the skills folder and out of a skill
    outside.mkdir(parents=True, exist_ok=True)
    _write(outside, "linked-out", fm("linked-out"))
    (root / "linked-out").symlink_to(outside / "linked-out")
    cases["linked-out"] = Case("skip", strict=False)  # refused by policy; its content is valid
    (root / "linked-dangling").symlink_to(outside / "gone")
    cases["linked-dangling"] = Case("skip")
    (outside / "secret.md").write_text("SECRET OUTSIDE TEXT\n")
    (outside / "secret.txt.notext").write_text("SECRET TWO\n")
    d = add("skill-md-linked-out", "skip", strict=False)
    (d / "SKILL.md").unlink()
    (d / "SKILL.md").symlink_to(outside / "linked-out" / "SKILL.md")
    d = add("ref-linked-out", "warn")
    (d / "references").mkdir()
    (d / "references" / "notes.md").symlink_to(outside / "secret.md")
    d = add("ref-not-utf8", "warn")
    (d / "references").mkdir()
    (d / "references" / "bad.md").write_bytes(b"\xff\xfe\x00bad")
    d = add("ref-fifo", "warn")
    (d / "references").mkdir()
    os.mkfifo(d / "references" / "pipe.md")
    d = add("thousands-of-files", "warn")
    (d / "references").mkdir()
    for i in range(3000):
        (d / "references" / f"f{i:04d}.md").write_text(f"file {i}\n")
    # good: must load with no line at all
    add("valid-plain", "good")
    add("crlf", "good", fm("crlf").replace("\n", "\r\n"))
    add("huge-body", "good", fm("huge-body") + ("lorem ipsum dolor sit amet " * 200_000))
    add("名字", "good", fm("名字", "A skill with a Unicode name."))
    add("escape-description", "good", fm("escape-description", "\"clears \\e[2J and \\u202e reverses\""))
    d = add("ref-linked-inside", "good")
    (d / "references").mkdir()
    (d / "notes.md").write_text("inside notes\n")
    (d / "references" / "notes.md").symlink_to(d / "notes.md")
    return cases
