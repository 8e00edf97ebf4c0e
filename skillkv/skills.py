"""Agent Skills: load `SKILL.md` folders leniently, as the specification's client guidance asks.

Lenient loading: a skill is skipped with one problem line naming the file when its SKILL.md cannot be read (not a
file, not UTF-8, NUL bytes, over the size limit), its frontmatter does not parse even after the repairs of
frontmatter.py (each repair is one warning), or it has no usable `name` / `description` (a wrong type is named:
"'name' must be a string, got a number"). Unknown keys (`version`, `author`, `tags`, ...), a name that differs from
its folder, an over-long description or compatibility are warnings, and the skill still loads. Strict validation by
the spec's rules is `validate_skill` (validate.py). Every message is one line; text from the skill in it is passed
through `printable`, so a name or path cannot inject terminal escapes.

Folders (untrusted input, DESIGN §3): every non-hidden sub-folder of the skills root is a skill or is reported in
one line (no SKILL.md, empty, SKILL.md a directory, a FIFO or a dangling link). A skill folder that is a link
resolving outside the skills root, a SKILL.md or a file under `references/` whose link resolves outside its skill
folder, is refused with one line unless `follow_symlinks=True`; the check is on the resolved target, as is the text
suffix check. Files at the root and hidden entries ('.git') are not skills and are passed over.

The *compiled text* of a skill -- exactly what is prefilled and hashed -- is defined here and only here by
`Skill.compiled_text`: the name, the description, the Markdown body, then each text file under `references/` in
sorted order, at most MAX_REFERENCE_FILES files and MAX_REFERENCE_BYTES in all (the rest is reported and not
compiled). Files under `scripts/` and `assets/` are loaded on demand by agents, not compiled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from skillkv.errors import SkillError
from skillkv.frontmatter import MAX_SKILL_MD_BYTES, kind, parse_lenient, read_text
from skillkv.validate import (KNOWN_KEYS, MAX_COMPATIBILITY, MAX_DESCRIPTION, find_skill_md, name_problem,
                              normal_name, printable, validate_skill)

__all__ = ["Skill", "LoadResult", "parse_skill", "load_skills", "validate_skill", "printable", "KNOWN_KEYS"]

COMPILED_DIRS = ("references",)
TEXT_SUFFIXES = {".md", ".txt", ".rst", ".json", ".yaml", ".yml", ".csv"}
MAX_REFERENCE_FILES = 256
MAX_REFERENCE_BYTES = 4 << 20
MAX_SCAN_ENTRIES = 10_000  # directory entries looked at under references/ (a folder of thousands of files)


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
    problems: list[str]  # one line each: skills (folders) that were skipped
    warnings: list[str]  # one line each: skills loaded despite these
    problem_folders: list[Path] = field(default_factory=list)  # the folder of each problem, in the same order

    def by_name(self) -> dict[str, Skill]:
        return {s.name: s for s in self.skills}


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _string(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SkillError(f"{where}: missing required key {key!r}" if key not in data or value is None
                         else f"{where}: {key!r} is empty")
    if not isinstance(value, str):
        raise SkillError(f"{where}: {key!r} must be a string, got {kind(value)}")
    return value


def parse_skill(folder: Path, follow_symlinks: bool = False, root: Path | None = None) -> Skill:
    """Parse the skill in `folder`. Raises SkillError (one line) for a skill that must be skipped. With `root`, a
    folder resolving outside it is refused unless `follow_symlinks`."""
    folder = Path(folder)
    real = folder.resolve()
    if root is not None and not follow_symlinks and not _inside(real, Path(root).resolve()):
        raise SkillError(f"{printable(folder)}: links outside the skills folder (to {printable(real)}); refused "
                         "(follow symlinks to allow)")
    md = find_skill_md(folder) or folder / "SKILL.md"
    where = printable(md)
    warnings: list[str] = []
    if md.is_symlink() and not follow_symlinks and not _inside(md.resolve(), real):
        raise SkillError(f"{where}: links outside its skill folder (to {printable(md.resolve())}); refused "
                         "(follow symlinks to allow)")
    if md.name != "SKILL.md":
        warnings.append(f"{where}: named {md.name}; the spec's name is SKILL.md")
    data, body, repairs = parse_lenient(read_text(md, where, MAX_SKILL_MD_BYTES), where)
    warnings.extend(repairs)

    name = normal_name(_string(data, "name", where))
    why = name_problem(name)
    if why:
        raise SkillError(f"{where}: invalid name {printable(name)!r} ({why}; 1-64 lowercase letters, digits and "
                         "single hyphens)")
    if name != normal_name(folder.name):
        warnings.append(f"{where}: name {name!r} differs from its folder {printable(folder.name)!r}")
    desc = _string(data, "description", where)
    if len(desc) > MAX_DESCRIPTION:
        warnings.append(f"{where}: description is {len(desc)} characters (the limit is {MAX_DESCRIPTION})")
    for key in ("license", "compatibility", "allowed-tools"):
        if data.get(key) is not None and not isinstance(data[key], str):
            warnings.append(f"{where}: {key!r} must be a string, got {kind(data[key])}; ignored")
    comp = data.get("compatibility")
    if isinstance(comp, str) and len(comp) > MAX_COMPATIBILITY:
        warnings.append(f"{where}: compatibility is {len(comp)} characters (the limit is {MAX_COMPATIBILITY})")
    unknown = sorted((k for k in data if k not in KNOWN_KEYS), key=str)
    if unknown:
        warnings.append(f"{where}: unknown keys {printable(', '.join(map(str, unknown)))} kept as metadata")
    meta = data.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        warnings.append(f"{where}: 'metadata' must be a mapping, got {kind(meta)}; ignored")
    metadata = dict(meta) if isinstance(meta, dict) else {}
    for k in unknown:
        metadata.setdefault(str(k), data[k])
    if not body.strip():
        warnings.append(f"{where}: the body is empty")
    files = _reference_files(folder, real, follow_symlinks, warnings)
    return Skill(name=name, description=desc.strip(), body=body, path=folder, files=tuple(files),
                 metadata=metadata, warnings=tuple(warnings))


def _reference_files(folder: Path, real: Path, follow: bool, warnings: list[str]) -> list[tuple[str, str]]:
    """(relative path, text) of the compiled files, in sorted path order, within the bounds; warnings appended."""
    paths, seen = [], 0
    for sub in COMPILED_DIRS:
        top = folder / sub
        if top.is_symlink() and not follow and not _inside(top.resolve(), real):
            warnings.append(f"{printable(top)}: links outside its skill folder; refused (follow symlinks to allow)")
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=follow):
            seen += len(dirnames) + len(filenames)
            if seen > MAX_SCAN_ENTRIES:
                warnings.append(f"{printable(top)}: over {MAX_SCAN_ENTRIES:,} entries; the rest not looked at")
                break
            paths.extend(Path(dirpath) / n for n in filenames)
    files, total, dropped = [], 0, 0
    for p in sorted(paths):
        target = p.resolve()
        if p.name.startswith(".") or target.suffix.lower() not in TEXT_SUFFIXES:
            continue
        if p.is_symlink() and not follow and not _inside(target, real):
            warnings.append(f"{printable(p)}: links outside its skill folder (to {printable(target)}); refused "
                            "(follow symlinks to allow)")
            continue
        if len(files) >= MAX_REFERENCE_FILES or total >= MAX_REFERENCE_BYTES:
            dropped += 1
            continue
        try:
            text = read_text(p, printable(p), MAX_REFERENCE_BYTES - total)
        except SkillError as e:
            warnings.append(f"{e}; not compiled")
            continue
        total += len(text.encode())
        files.append((p.relative_to(folder).as_posix(), text))
    if dropped:
        warnings.append(f"{printable(folder)}: {dropped} more reference file(s) not compiled (at most "
                        f"{MAX_REFERENCE_FILES} files and {MAX_REFERENCE_BYTES:,} bytes are compiled)")
    return files


def _candidates(root: Path, follow: bool, result: LoadResult) -> list[Path]:
    """Sub-folders of `root` to load, in name order; links that cannot be followed reported in `result`."""
    real_root, out = root.resolve(), []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        p = root / e.name
        if e.is_symlink():
            target = p.resolve()
            if not target.exists():
                _problem(result, p, f"{printable(p)}: is a link to a missing folder ({printable(target)})")
            elif target.is_dir() and not follow and not _inside(target, real_root):
                _problem(result, p, f"{printable(p)}: links outside the skills folder (to {printable(target)}); "
                                    "refused (follow symlinks to allow)")
            elif target.is_dir():
                out.append(p)
        elif e.is_dir(follow_symlinks=False):
            out.append(p)
    return out


def _problem(result: LoadResult, folder: Path, line: str) -> None:
    result.problems.append(line)
    result.problem_folders.append(folder)


def load_skills(root: Path | str, follow_symlinks: bool = False) -> LoadResult:
    """Load every skill under `root` (each sub-folder holding a SKILL.md; `root` itself may be one skill).

    Never raises for one bad skill or folder: each is one line in `problems`. Raises SkillError if `root` is
    missing, not a folder, or holds no SKILL.md at all. Two skills with one name: the first (by folder order) wins,
    the other is a problem.
    """
    root = Path(root)
    if not root.exists():
        raise SkillError(f"skills folder {printable(root)} does not exist")
    if not root.is_dir():
        raise SkillError(f"{printable(root)} is not a folder")
    result = LoadResult([], [], [])
    folders = [root] if find_skill_md(root) else _candidates(root, follow_symlinks, result)
    seen: dict[str, Path] = {}
    tried = False
    for folder in folders:
        if find_skill_md(folder) is None:
            empty = next(os.scandir(folder), None) is None
            _problem(result, folder, f"{printable(folder)}: {'empty folder' if empty else 'no SKILL.md inside'}; "
                                     "not a skill")
            continue
        tried = True
        try:
            skill = parse_skill(folder, follow_symlinks, root if folder != root else None)
        except SkillError as e:
            _problem(result, folder, str(e))
            continue
        if skill.name in seen:
            _problem(result, folder, f"{printable(folder / 'SKILL.md')}: name {skill.name!r} already used by "
                                     f"{printable(seen[skill.name])}")
            continue
        seen[skill.name] = folder
        result.skills.append(skill)
        result.warnings.extend(skill.warnings)
    if not tried:
        detail = f"; {len(result.problems)} not a skill, e.g. {result.problems[0]}" if result.problems else ""
        raise SkillError(f"skills folder {printable(root)} holds no skills (no <name>/SKILL.md inside){detail}")
    return result
