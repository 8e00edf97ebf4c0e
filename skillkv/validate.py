"""The Agent Skills specification's rules: strict validation of a skill folder, the name rule, and `printable`.

`validate_skill(folder)` gives the problems by the spec's strict rules, with the verdicts of the spec's reference
validator (`skills-ref` 0.1.1, `agentskills validate DIR`; tests/test_validate.py compares the two on every skill of
the test corpus): SKILL.md (or skill.md) must be UTF-8 text starting with '---' (a BOM is an error), its frontmatter
strict YAML (strings only; no flow collections, anchors, aliases, tags or repeated keys), holding only the keys
name, description, license, compatibility, metadata, allowed-tools; `name` 1-64 lowercase letters (any script) and
digits in hyphen-separated words, equal to the folder name (both NFKC-normalised); `description` 1-1024 characters;
`compatibility` at most 500. skillkv adds its own bounds (file size, frontmatter size, nesting, aliases) and reads
no FIFO, device or dangling link: those are problems too. An empty list means valid.

Loading (skills.py) is lenient where the spec's client guidance allows, and uses `name_problem` for the same name
rule, so a name never holds a path separator, a dot or a control character.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from skillkv.errors import SkillError
from skillkv.frontmatter import parse_strict, read_text

KNOWN_KEYS = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}
MAX_NAME, MAX_DESCRIPTION, MAX_COMPATIBILITY = 64, 1024, 500
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` with control, escape, format (bidi overrides, zero-width) and separator characters made visible as
    escapes (ESC -> '\\x1b', U+202E -> '\\u202e'), so text from a skill printed to a terminal cannot clear, move or
    recolour it. With `keep_newlines`, '\\n' stays a line break."""
    out = []
    for ch in str(text):
        if (ch == "\n" and keep_newlines) or unicodedata.category(ch) not in _INVISIBLE:
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def normal_name(name: str) -> str:
    return unicodedata.normalize("NFKC", name.strip())


def name_problem(name: str) -> str | None:
    """Why `name` (already NFKC-normalised and stripped) is not a valid skill name, or None."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters (at most {MAX_NAME})"
    if name != name.lower():
        return "must be lowercase"
    if name.startswith("-") or name.endswith("-") or "--" in name:
        return "must not start or end with a hyphen or hold two in a row"
    if not all(c.isalnum() or c == "-" for c in name):
        return "may hold only letters, digits and hyphens"
    return None


def find_skill_md(folder: Path) -> Path | None:
    """SKILL.md, else skill.md (as the reference validator accepts it), else None. Links are not followed here."""
    for n in ("SKILL.md", "skill.md"):
        if (folder / n).is_symlink() or (folder / n).exists():
            return folder / n
    return None


def validate_skill(folder: Path | str) -> list[str]:
    """Problems of the skill folder by the spec's strict rules (one line each, naming the file); [] if valid."""
    folder = Path(folder)
    if not folder.exists():
        return [f"{printable(folder)}: does not exist"]
    if not folder.is_dir():
        return [f"{printable(folder)}: is not a folder"]
    md = find_skill_md(folder)
    if md is None:
        return [f"{printable(folder)}: missing required file SKILL.md"]
    where = printable(md)
    try:
        data = parse_strict(read_text(md, where), where)
    except SkillError as e:
        return [str(e)]
    problems = []
    extra = sorted(str(k) for k in data if k not in KNOWN_KEYS)
    if extra:
        problems.append(f"{where}: unexpected keys {printable(', '.join(extra))} (the spec allows "
                        f"{', '.join(sorted(KNOWN_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: 'name' must be a non-empty string")
    else:
        why = name_problem(normal_name(name))
        if why:
            problems.append(f"{where}: name {printable(normal_name(name))!r} {why}")
        elif normal_name(name) != unicodedata.normalize("NFKC", folder.name):
            problems.append(f"{where}: name {printable(normal_name(name))!r} differs from its folder "
                            f"{printable(folder.name)!r}")
    desc = data.get("description")
    if not isinstance(desc, str) or not desc.strip():
        problems.append(f"{where}: 'description' must be a non-empty string")
    elif len(desc) > MAX_DESCRIPTION:
        problems.append(f"{where}: description is {len(desc)} characters (at most {MAX_DESCRIPTION})")
    comp = data.get("compatibility")
    if "compatibility" in data and not isinstance(comp, str):
        problems.append(f"{where}: 'compatibility' must be a string")
    elif isinstance(comp, str) and len(comp) > MAX_COMPATIBILITY:
        problems.append(f"{where}: compatibility is {len(comp)} characters (at most {MAX_COMPATIBILITY})")
    return problems
