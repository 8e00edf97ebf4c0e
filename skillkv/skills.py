"""Agent Skills: parse and validate `SKILL.md` folders (agentskills.io specification).

Strict validation, lenient loading: a skill whose frontmatter does not parse, or that has no `name` or
`description`, is skipped with a one-line problem naming the file; unknown keys (`version`, `author`, `tags`,
...) and a name that differs from the folder are warnings, and the skill still loads.

The *compiled text* of a skill — exactly what is prefilled and hashed — is defined here and only here by
`Skill.compiled_text`: the name, the description, the Markdown body, then each text file under `references/`
in sorted order. Files under `scripts/` and `assets/` are loaded on demand by agents, not compiled.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from skillkv.errors import SkillError

NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
KNOWN_KEYS = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}
COMPILED_DIRS = ("references",)
TEXT_SUFFIXES = {".md", ".txt", ".rst", ".json", ".yaml", ".yml", ".csv"}


@dataclass(frozen=True)
class Skill:
    """One parsed skill. `content_hash` covers exactly `compiled_text`."""

    name: str
    description: str
    body: str
    path: Path
    files: tuple[tuple[str, str], ...] = ()  # (relative path, text) of compiled extra files
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    warnings: tuple[str, ...] = ()

    @property
    def compiled_text(self) -> str:
        parts = [f"# {self.name}\n{self.description.strip()}\n\n{self.body.strip()}\n"]
        for rel, text in self.files:
            parts.append(f"\n## File: {rel}\n\n{text.strip()}\n")
        return "".join(parts)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.compiled_text.encode()).hexdigest()


@dataclass
class LoadResult:
    skills: list[Skill]
    problems: list[str]  # one line each: skills that were skipped
    warnings: list[str]  # one line each: skills loaded despite these

    def by_name(self) -> dict[str, Skill]:
        return {s.name: s for s in self.skills}


def split_frontmatter(text: str, where: str) -> tuple[dict, str]:
    """Return (frontmatter mapping, body). Raises SkillError if the frontmatter is absent or not YAML."""
    text = text.lstrip("\ufeff")
    m = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.S)
    if not m:
        raise SkillError(f"{where}: no YAML frontmatter (the file must start with a '---' block)")
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 2}" if mark is not None else ""
        raise SkillError(f"{where}:{line} frontmatter is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SkillError(f"{where}: frontmatter must be a YAML mapping of keys to values")
    return data, text[m.end():]


def parse_skill(folder: Path) -> Skill:
    """Parse `folder/SKILL.md`. Raises SkillError for a skill that must be skipped."""
    md = folder / "SKILL.md"
    where = str(md)
    try:
        text = md.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SkillError(f"{where}: cannot read ({e.__class__.__name__}: {e})") from None
    data, body = split_frontmatter(text, where)
    warnings: list[str] = []

    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SkillError(f"{where}: missing required key 'name'")
    name = name.strip()
    if len(name) > 64 or not NAME_RE.match(name):
        raise SkillError(f"{where}: invalid name {name!r} (1-64 lowercase letters, digits and single hyphens)")
    if name != folder.name:
        warnings.append(f"{where}: name {name!r} differs from its folder {folder.name!r}")

    desc = data.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise SkillError(f"{where}: missing required key 'description'")
    if len(desc) > 1024:
        warnings.append(f"{where}: description is {len(desc)} characters (the limit is 1024)")
    comp = data.get("compatibility")
    if isinstance(comp, str) and len(comp) > 500:
        warnings.append(f"{where}: compatibility is {len(comp)} characters (the limit is 500)")
    unknown = sorted((k for k in data if k not in KNOWN_KEYS), key=str)
    if unknown:
        warnings.append(f"{where}: unknown keys {', '.join(map(str, unknown))} kept as metadata")
    metadata = dict(data.get("metadata") or {}) if isinstance(data.get("metadata"), dict) else {}
    for k in unknown:
        metadata.setdefault(str(k), data[k])
    if not body.strip():
        warnings.append(f"{where}: the body is empty")

    files = []
    for sub in COMPILED_DIRS:
        for p in sorted((folder / sub).rglob("*")) if (folder / sub).is_dir() else []:
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith("."):
                try:
                    files.append((p.relative_to(folder).as_posix(), p.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError) as e:
                    warnings.append(f"{p}: not compiled ({e.__class__.__name__})")
    return Skill(name=name, description=desc.strip(), body=body, path=folder, files=tuple(files),
                 metadata=metadata, warnings=tuple(warnings))


def load_skills(root: Path | str) -> LoadResult:
    """Load every skill under `root` (each sub-folder holding a SKILL.md; `root` itself may be one skill).

    Raises SkillError if `root` is missing or holds no SKILL.md at all. Two skills with one name: the first (by
    folder order) wins, the other is a problem.
    """
    root = Path(root)
    if not root.exists():
        raise SkillError(f"skills folder {root} does not exist")
    if not root.is_dir():
        raise SkillError(f"{root} is not a folder")
    folders = [root] if (root / "SKILL.md").is_file() else sorted(
        p.parent for p in root.glob("*/SKILL.md") if p.is_file())
    if not folders:
        raise SkillError(f"skills folder {root} holds no skills (no <name>/SKILL.md inside)")
    result = LoadResult([], [], [])
    seen: dict[str, Path] = {}
    for folder in folders:
        try:
            skill = parse_skill(folder)
        except SkillError as e:
            result.problems.append(str(e))
            continue
        if skill.name in seen:
            result.problems.append(f"{folder / 'SKILL.md'}: name {skill.name!r} already used by {seen[skill.name]}")
            continue
        seen[skill.name] = folder
        result.skills.append(skill)
        result.warnings.extend(skill.warnings)
    return result
