"""The kernel checks' verdicts of this machine, kept in the store: `<store>/<model-tag>/kernels.json`.

engine/invariance.py checks, once per machine, which weight GEMM gives a row the same bits whatever the row count
(a few hundred milliseconds on a 2-core CPU for the default model). Every command that loads the model must use the
same GEMM, or a snapshot compiled by one would not be the bits another computes; so the verdict is kept next to
the snapshots it decides, and read back by the next command on the same machine (its key names the CPU model,
torch and BLAS builds and thread count, so a store copied to another machine checks again).

    verdicts = Verdicts.load(store.dir)     # a mapping: key -> {"mode", "block", "invariant", "note"}
    make_runner(..., verdicts=verdicts)      # the runner reads it, and adds what it had to check
    verdicts.save()                          # written atomically, only when something was added

A file that cannot be read or parsed counts as empty (the check runs again); one that cannot be written is left
as it was (the verdict stays in the process).
"""

from __future__ import annotations

import json
from collections import UserDict
from pathlib import Path

from skillkv.atomic import write_atomic

FILE = "kernels.json"


class Verdicts(UserDict):
    def __init__(self, folder: Path, data: dict | None = None):
        super().__init__(data or {})
        self.folder, self.changed = Path(folder), False

    @classmethod
    def load(cls, folder: Path) -> Verdicts:
        try:
            data = json.loads((Path(folder) / FILE).read_text())
        except (OSError, ValueError):
            data = {}
        ok = isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())
        return cls(folder, data if ok else {})

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / FILE, json.dumps(self.data, indent=1, sort_keys=True).encode(), ".kernels-")
            self.changed = False
        except OSError:
            pass
