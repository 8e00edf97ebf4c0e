"""torch, imported on first use: `from skillkv.lazy import torch` gives a stand-in whose first attribute read imports
the real module (then every read is forwarded to it), and `inference_mode` decorates a function with
torch.inference_mode() entered at call time.

Why: the modules SkillKV is built from (the store, snapshots, tiers, compose, the runner contract) are imported by
every command, but only some commands compute: `skillkv ls`, `stats`, `gc` and an up-to-date `compile` never touch
a tensor and must not pay ~1 s of `import torch` (tests/cli/test_imports.py checks it). Hot compute modules
(engine/) import torch directly; they are only imported by code that runs the model.
"""

from __future__ import annotations

import functools
import importlib


class _Lazy:
    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        module = self.__dict__.get("_module") or importlib.import_module(self.__dict__["_name"])
        self.__dict__["_module"] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_name']}>"


torch = _Lazy("torch")


def inference_mode(fn):
    """`fn` run under torch.inference_mode(), torch imported at the first call, not at decoration."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch as real

        with real.inference_mode():
            return fn(*args, **kwargs)
    return run
