"""SKILL.md text and YAML frontmatter: bounded reading, lenient parsing with repairs, and the strict YAML subset.

Reading (`read_text`): a SKILL.md is opened without following a FIFO's blocking open, must be a regular file of
at most MAX_SKILL_MD_BYTES, hold no NUL byte and be UTF-8; line ends are read as universal newlines (CRLF and CR
become LF, exactly as `Path.read_text` always did, so compiled text and content hashes are unchanged) -- valid YAML,
so no repair and no warning. Every failure is a SkillError of one line naming the file.

Lenient parsing (`parse_lenient`), as the Agent Skills client guidance asks: the frontmatter is parsed with PyYAML's
safe loader after bounds that no input can get past -- at most MAX_FRONTMATTER_BYTES, nesting at most MAX_DEPTH,
at most MAX_ALIASES aliases (alias bombs), checked on the parser's event stream before anything is built, so deep
nesting can never reach a RecursionError. When the text does not parse, it retries once with these repairs, each
recorded as one warning: a leading UTF-8 byte-order mark removed; tabs in indentation read as two spaces; plain
values containing ': ' (`description: Use this when: ...`, the most common real-world mistake) read as quoted
strings. A BOM alone is also a repair (the spec's validator refuses it).

Strict parsing (`parse_strict`) reads the YAML subset of the spec's reference validator (`skills-ref`, strictyaml):
every scalar is a string, and flow collections ({...}, [...]), anchors, aliases, tags and duplicate keys are errors.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import yaml

from skillkv.errors import SkillError

MAX_SKILL_MD_BYTES = 16 << 20
MAX_FRONTMATTER_BYTES = 64 << 10
MAX_DEPTH = 32
MAX_ALIASES = 16
BOM = "\ufeff"
_FRONT = re.compile(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.S)
_COLON_VALUE = re.compile(r"^([ ]*)([A-Za-z0-9_][A-Za-z0-9_.-]*):[ \t]+(?![|>'\"\[{&*!#%@`])(.*?:[ \t].*?)[ \t]*$")
_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "a mapping",
          type(None): "empty"}


def kind(value) -> str:
    """'a number', 'a list', ... for messages such as "'name' must be a string, got a number"."""
    for t, word in _KINDS.items():
        if type(value) is t:
            return word
    return "a date" if hasattr(value, "isoformat") else f"a {type(value).__name__}"


def read_text(md: Path, where: str, limit: int = MAX_SKILL_MD_BYTES) -> str:
    """The text of a file (universal newlines) of at most `limit` bytes. Raises SkillError (one line) for anything
    but a readable UTF-8 text file: a directory, a FIFO (never blocked on), a dangling link, NUL bytes, ..."""
    try:
        fd = os.open(md, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SkillError(f"{where}: is a link to a missing file" if md.is_symlink() else f"{where}: missing") from None
    except OSError as e:
        raise SkillError(f"{where}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) \
                else "not a regular file"
            raise SkillError(f"{where}: is {what}, not a file")
        if st.st_size > limit:
            raise SkillError(f"{where}: is {st.st_size:,} bytes (the limit is {limit:,})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SkillError(f"{where}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SkillError(f"{where}: is over {limit:,} bytes")
    return decode_text(data, where)


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text with universal newlines, or SkillError (NUL bytes, not UTF-8)."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise SkillError(f"{where}: holds NUL bytes (the first at offset {nul}; a binary file, not text)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkillError(f"{where}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split(text: str, where: str) -> tuple[str, str]:
    """(frontmatter text, body) of SKILL.md text without its BOM. Raises SkillError if there is no frontmatter."""
    m = _FRONT.match(text)
    if not m:
        raise SkillError(f"{where}: no YAML frontmatter (the file must start with a '---' block)")
    if len(m.group(1).encode()) > MAX_FRONTMATTER_BYTES:
        raise SkillError(f"{where}: frontmatter is {len(m.group(1).encode()):,} bytes "
                         f"(the limit is {MAX_FRONTMATTER_BYTES:,})")
    return m.group(1), text[m.end():]


def check_bounds(fm: str, where: str, strict: bool = False) -> None:
    """Walk the YAML event stream (iterative, builds nothing): nesting, aliases (no alias into a collection still
    open: no recursive structures) and, when `strict`, the strictyaml subset. Raises SkillError, or yaml.YAMLError
    for text that does not parse."""
    aliases, open_anchors = 0, []
    for ev in yaml.parse(fm, Loader=yaml.SafeLoader):
        if strict and isinstance(ev, yaml.NodeEvent) and (ev.anchor or getattr(ev, "tag", None)):
            raise SkillError(f"{where}: frontmatter uses a YAML anchor, alias or tag (not allowed by the spec's "
                             "strict YAML)")
        if isinstance(ev, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise SkillError(f"{where}: frontmatter has over {MAX_ALIASES} YAML aliases (an alias bomb?)")
            if ev.anchor in open_anchors:
                raise SkillError(f"{where}: frontmatter has a recursive YAML alias (*{ev.anchor})")
        elif isinstance(ev, yaml.CollectionStartEvent):
            open_anchors.append(ev.anchor)
            if len(open_anchors) > MAX_DEPTH:
                raise SkillError(f"{where}: frontmatter nests deeper than {MAX_DEPTH} levels")
            if strict and ev.flow_style:
                raise SkillError(f"{where}: frontmatter uses a flow collection ({{...}} or [...]; not allowed "
                                 "by the spec's strict YAML)")
        elif isinstance(ev, yaml.CollectionEndEvent):
            open_anchors.pop()


def _load(fm: str, where: str):
    check_bounds(fm, where)
    return yaml.load(fm, Loader=yaml.SafeLoader)  # noqa: S506 - the safe loader


def _problem(e: Exception, where: str) -> SkillError:
    mark = getattr(e, "problem_mark", None)
    line = f" line {mark.line + 2}" if mark is not None else ""
    why = getattr(e, "problem", None) or type(e).__name__
    return SkillError(f"{where}:{line} frontmatter is not valid YAML ({why})")


_BLOCK = re.compile(r"^([ ]*)[^#\s][^:]*:[ \t]*[|>][-+0-9]*[ \t]*(#.*)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _repair(fm: str, where: str) -> tuple[str, list[str]]:
    """The frontmatter with tabs in indentation and unquoted ': ' values repaired, and one warning per repair.
    Lines of block scalars (`key: |`) are left as they are; a repaired plain value takes its continuation lines
    (indented deeper, up to a blank line), folded with spaces as YAML folds a plain scalar."""
    lines, notes = fm.split("\n"), []
    for i, line in enumerate(lines):
        lead = len(line) - len(line.lstrip(" \t"))
        if "\t" in line[:lead]:
            lines[i] = line[:lead].replace("\t", "  ") + line[lead:]
            notes.append(f"{where}: line {i + 2}: tabs in indentation read as spaces")
    out, block, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if block is not None and (not line.strip() or _indent(line) > block):
            out.append(line)
            continue
        block = None
        if _BLOCK.match(line):
            block = _indent(line)
        m = _COLON_VALUE.match(line)
        if m and block is None:
            value, start = m.group(3), i
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(m.group(1)):
                value += " " + lines[i].strip()
                i += 1
            line = f"{m.group(1)}{m.group(2)}: {json.dumps(value)}"
            notes.append(f"{where}: line {start + 1}: the unquoted value of {m.group(2)!r} contains ': '; read as "
                         "a quoted string")
        out.append(line)
    return "\n".join(out), notes


def parse_lenient(text: str, where: str) -> tuple[dict, str, list[str]]:
    """(frontmatter mapping, body, repair warnings). Raises SkillError (one line) for a skill to skip."""
    warnings: list[str] = []
    if text.startswith(BOM):
        text = text.lstrip(BOM)
        warnings.append(f"{where}: a UTF-8 byte-order mark before the frontmatter was removed")
    fm, body = split(text, where)
    try:
        data = _load(fm, where)
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as first:
        fixed, notes = _repair(fm, where)
        if not notes:
            raise _problem(first, where) from None
        try:
            data = _load(fixed, where)
        except (yaml.YAMLError, RecursionError, ValueError, TypeError):
            raise _problem(first, where) from None
        warnings.extend(notes)
    if not isinstance(data, dict):
        raise SkillError(f"{where}: frontmatter must be a YAML mapping of keys to values, got {kind(data)}")
    return data, body, warnings


def parse_strict(text: str, where: str) -> dict:
    """The frontmatter as the spec's reference validator reads it (strings only). Raises SkillError."""
    if not text.startswith("---"):
        raise SkillError(f"{where}: SKILL.md must start with YAML frontmatter (---)")
    parts = text.split("---", 2)
    if len(parts) < 3:
        raise SkillError(f"{where}: frontmatter not properly closed with ---")
    if len(parts[1].encode()) > MAX_FRONTMATTER_BYTES:
        raise SkillError(f"{where}: frontmatter is over {MAX_FRONTMATTER_BYTES:,} bytes")
    try:
        check_bounds(parts[1], where, strict=True)
        node = yaml.compose(parts[1], Loader=yaml.BaseLoader)
        data = yaml.load(parts[1], Loader=yaml.BaseLoader)  # noqa: S506 - every scalar a string
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as e:
        raise _problem(e, where) from None
    if not isinstance(data, dict):
        raise SkillError(f"{where}: frontmatter must be a YAML mapping")
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, yaml.MappingNode):
            keys = [k.value for k, _ in n.value]
            if len(keys) != len(set(map(str, keys))):
                raise SkillError(f"{where}: frontmatter repeats a key")
            todo.extend(v for _, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)
    return data
