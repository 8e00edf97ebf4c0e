"""Batch invariance established on the machine: which weight GEMM gives a row the same bits whatever the row count.

Exact mode equals full mode under batching, and the server's "an answer does not depend on its neighbours", rest on
one property of the weight GEMM y = x @ W^T: **a row's bits do not depend on how many rows the call has, nor on
where the row sits among them** (engine/llama.py pads steps to whole blocks of `ROWS` rows, so the counts that
occur are multiples of it). That is a property of a BLAS kernel on a CPU, not of the math: MKL's sgemm holds it on
AMD EPYC (Zen 4) and not on Intel Xeon (family 6 model 207: rows at M = 16 differ from M = 8), where oneDNN's holds
it. So it is checked, not assumed:

    choice = choose_gemm("auto", device, dtype, probe_weights, verdicts)
    choice.linear      # the Linear to use (mode, row block)
    choice.invariant   # whether the property holds for it
    choice.note        # one line: what was checked and what was chosen, or why nothing holds

Candidates, in order, the first that holds wins: the requested mode (auto: oneDNN for float32 on the CPU, else
F.linear: MKL / cuBLAS); on the CPU in float32 the other library; then, on the CPU, the first candidate in fixed
blocks of `ROWS` rows (every call exactly that many rows, so only a row's place in the block can matter, and that
is checked too). When none holds, the first candidate is used and `invariant` is False: callers refuse an explicit
batch-invariant request with `note` as the reason.

The check (`rows_hold`): per weight (the runner passes one of each shape it uses: qkv, o, gate_up, down, lm_head),
random rows computed in calls of every count in `ROW_COUNTS` and at two offsets must equal the same rows computed
in calls of `ROWS` rows, bit for bit. It costs a few hundred milliseconds on a 2-core CPU for the default model
(the lm_head is 49,152 x 576), so verdicts are cached: in the process, and in `verdicts` (a mapping the caller
persists; SkillKV keeps it in the store: skillkv/probes.py), keyed by `machine_key` (CPU model, torch and BLAS
versions, threads, device) with the mode, dtype and shapes.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from typing import Callable, MutableMapping

import torch

from skillkv.engine.gemm import Linear

ROWS = 8  # steps are padded to multiples of this many rows (engine/llama.py)
ROW_COUNTS = (8, 16, 24, 40, 64, 104)  # row counts checked for the layer GEMMs (multiples of ROWS)
LOGIT_ROW_COUNTS = (8, 16, 24, 64)  # for the lm_head (one row per sequence of a step, padded)
OFFSETS = (0, 3)  # a row checked at these places in the call

_PROCESS: dict[str, dict] = {}


@dataclass(frozen=True)
class GemmChoice:
    linear: Linear
    invariant: bool
    note: str

    @property
    def label(self) -> str:
        """'onednn', 'cublas', 'onednn in 8-row blocks', ..."""
        lin = self.linear
        return lin.mode + (f" in {lin.block}-row blocks" if lin.block else "")


def cpu_name() -> str:
    """Vendor, family, model and name of this CPU (Linux /proc/cpuinfo; elsewhere the platform's processor)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
        info = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return (f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
                f" ({info.get('model name', '?')})")
    except OSError:
        return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> str:
    """What a GEMM's bits may depend on besides its inputs: the device (CPU model, or GPU name and capability),
    torch and its BLAS builds, the CPU capability torch dispatches to, and the thread count."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
        libs = f"cuda {torch.version.cuda}"
    else:
        where = f"{cpu_name()} {torch.backends.cpu.get_cpu_capability()} threads {torch.get_num_threads()}"
        libs = hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:12]
    return f"{where} | torch {torch.__version__} {libs}"


def rows_hold(lin: Linear, weights: list[torch.Tensor], counts_for: Callable[[torch.Tensor], tuple]) -> str | None:
    """None when every weight's rows are independent of the row count and place (module docstring), else where
    they are not ("960x576 at 16 rows")."""
    g = torch.Generator().manual_seed(0)
    for w in weights:
        n, k = w.shape
        counts = counts_for(w)
        need = max(counts) + max(OFFSETS)
        x = torch.randn(-(-need // ROWS) * ROWS, k, generator=g).to(device=w.device, dtype=w.dtype)
        prepared = lin.prepare(w)
        ref = torch.cat([lin(x[i:i + ROWS], prepared) for i in range(0, x.shape[0], ROWS)])
        for m in counts:
            for off in OFFSETS:
                if not torch.equal(lin(x[off:off + m], prepared), ref[off:off + m]):
                    return f"{n}x{k} at {m} rows (offset {off})"
    return None


def candidates(mode: str, device: torch.device, dtype: torch.dtype) -> list[Linear]:
    first = Linear(mode, device, dtype)
    out = [first]
    if device.type == "cpu" and dtype == torch.float32 and first.mode in ("onednn", "cublas"):
        other = "cublas" if first.mode == "onednn" else "onednn"
        try:
            out.append(Linear(other, device, dtype))
        except ValueError:  # torch without oneDNN
            pass
    if device.type == "cpu":  # on a GPU, thousands of 8-row launches per prefill: reported as not invariant instead
        out.append(Linear(first.mode, device, dtype, block=ROWS))
    return out


def choose_gemm(mode: str, device: torch.device, dtype: torch.dtype, weights: list[torch.Tensor],
                lm_head: torch.Tensor | None = None, verdicts: MutableMapping | None = None) -> GemmChoice:
    """The GEMM to use (module docstring). `weights`: one [N, K] weight of each layer shape; `lm_head` checked
    at LOGIT_ROW_COUNTS; `verdicts`: a persistent cache (read and updated; optional)."""
    shapes = [tuple(w.shape) for w in weights] + ([tuple(lm_head.shape)] if lm_head is not None else [])
    key = f"{machine_key(device)} | {mode} {str(dtype).replace('torch.', '')} | {shapes}"
    known = _PROCESS.get(key) or (verdicts.get(key) if verdicts is not None else None)
    cands = candidates(mode, device, dtype)
    if known is None:
        known = _probe(cands, weights, lm_head)
        if verdicts is not None:
            verdicts[key] = known
    _PROCESS[key] = known
    pick = next((c for c in cands if (c.mode, c.block) == (known["mode"], known["block"])), cands[0])
    return GemmChoice(pick, bool(known["invariant"]), str(known["note"]))


def _probe(cands: list[Linear], weights: list[torch.Tensor], lm_head: torch.Tensor | None) -> dict:
    everything = weights + ([lm_head] if lm_head is not None else [])
    where_run = cpu_name() if everything[0].device.type == "cpu" else torch.cuda.get_device_name(everything[0].device)
    failed = []
    for lin in cands:
        where = rows_hold(lin, everything, lambda w: LOGIT_ROW_COUNTS if w is lm_head else ROW_COUNTS)
        label = GemmChoice(lin, True, "").label
        if where is None:
            tried = f"; {', '.join(failed)}" if failed else ""
            return {"mode": lin.mode, "block": lin.block, "invariant": True,
                    "note": f"{label}: rows independent of the row count, checked at {ROW_COUNTS[0]}-"
                            f"{ROW_COUNTS[-1]} rows on {where_run}{tried}"}
        failed.append(f"{label}: rows differ at {where}")
    return {"mode": cands[0].mode, "block": cands[0].block, "invariant": False,
            "note": "no GEMM here gives rows independent of the row count: " + "; ".join(failed)}
