"""Plain aligned tables (as `ollama ls`, `docker ps`, `hf cache scan` print them) that fit the terminal.

Width: $COLUMNS when set, the terminal's when stdout is one, else 80 (a pipe, a log). No column but the one text
column (`flex`, e.g. a description) is ever cut: when a row does not fit, that column is cut with '…', or, when
less than 16 characters would be left of it, printed on its own indented line below its row; when even the other
columns do not fit, the columns marked `drop` are left out, highest first (--json has everything). Cells are made
printable (skillkv.cli.common.printable): text from a skill cannot move or recolour the terminal.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from rich.cells import cell_len
from rich.text import Text

from skillkv.cli.common import out, printable

GAP = "  "
MIN_FLEX = 16


@dataclass
class Col:
    header: str
    right: bool = False  # numbers align right
    flex: bool = False  # the text column: cut (or moved below its row) to fit
    drop: int = 0  # > 0: left out when the table is too wide, highest first


def width() -> int:
    try:
        n = int(os.environ.get("COLUMNS", ""))
        if n > 0:
            return n
    except ValueError:
        pass
    return shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80


def _cut(text: str, n: int) -> str:
    if cell_len(text) <= n:
        return text
    while text and cell_len(text) > n - 1:
        text = text[:-1]
    return text + "…"


def render(cols: list[Col], rows: list[list], total: int | None = None) -> list[Text]:
    """The table's lines. A cell is a string or (string, rich style)."""
    total = total or width()
    cells = [[(printable(c[0]), c[1]) if isinstance(c, tuple) else (printable(str(c)), "") for c in r] for r in rows]
    keep = list(range(len(cols)))
    natural = [max([cell_len(cols[i].header)] + [cell_len(r[i][0]) for r in cells]) for i in range(len(cols))]
    flex = next((i for i, c in enumerate(cols) if c.flex), None)
    below = False
    room = 0
    while True:
        fixed = [i for i in keep if i != flex]
        used = sum(natural[i] for i in fixed) + len(GAP) * (len(fixed) - 1)
        if flex is not None:
            room = total - used - len(GAP)
            if room >= min(natural[flex], MIN_FLEX):
                break  # the text column fits on the row, cut if need be
        if used <= total:
            below = flex is not None  # the other columns fit: the text goes on its own line
            break
        droppable = [i for i in keep if cols[i].drop]
        if not droppable:
            below = flex is not None
            break
        keep.remove(max(droppable, key=lambda i: cols[i].drop))
    widths = {i: natural[i] for i in keep}
    if flex is not None and not below:
        widths[flex] = min(natural[flex], room)
    shown = [i for i in keep if not (below and i == flex)]

    def line(values: list[tuple[str, str]], header: bool = False) -> Text:
        t = Text(style="bold" if header else "")
        for n, i in enumerate(shown):
            text, style = values[i]
            text = _cut(text, widths[i]) if i == flex else text
            pad = " " * (widths[i] - cell_len(text)) if n < len(shown) - 1 or cols[i].right else ""
            if n:
                t.append(GAP)
            t.append(pad + text if cols[i].right else text, style=style)
            if not cols[i].right:
                t.append(pad)
        t.rstrip()
        return t

    lines = [line([(c.header, "") for c in cols], header=True)]
    for r in cells:
        lines.append(line(r))
        if below and r[flex][0]:
            lines.append(Text("    " + _cut(r[flex][0], max(MIN_FLEX, total - 4)), style=r[flex][1]))
    return lines


def print_table(cols: list[Col], rows: list[list], console=None) -> None:
    for t in render(cols, rows):
        (console or out).print(t, soft_wrap=True, no_wrap=True, overflow="ignore", crop=False)
