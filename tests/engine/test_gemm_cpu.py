"""The CPU weight GEMM and its batch-invariance check (engine/gemm.py, engine/invariance.py).

Whether a row's bits depend on the row count is a property of a BLAS kernel on a CPU: MKL's sgemm holds it on AMD
EPYC and not on Intel Xeon. So the tests assert the property of the GEMM the check *chose on this machine*, that the
check's verdict on every candidate agrees with a direct measurement, and run the fallback branches on any CPU with
kernels made to fail (rows that depend on the row count, rows that depend on their place in the call)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import place_dependent_gemm

from skillkv.engine import invariance
from skillkv.engine.gemm import Linear, _has_onednn
from skillkv.engine.invariance import ROWS, candidates, choose_gemm, rows_hold

# the default model's shapes: qkv, o, gate_up, down ([N, K]) and the lm_head
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)
CPU = torch.device("cpu")


def _weights(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]


@pytest.fixture(scope="module")
def default_shapes():
    return _weights(SHAPES), _weights([LM_HEAD], 1)[0]


@pytest.fixture(autouse=True)
def _fresh_process_cache():
    invariance._PROCESS.clear()
    yield
    invariance._PROCESS.clear()


@pytest.mark.skipif(not _has_onednn(), reason="torch built without oneDNN")
def test_auto_is_onednn_on_the_cpu_for_float32():
    assert Linear("auto", CPU).mode == "onednn"
    assert Linear("auto", CPU, torch.bfloat16).mode == "cublas"
    with pytest.raises(ValueError):
        Linear("onednn", CPU, torch.bfloat16)


def test_the_chosen_gemm_has_rows_independent_of_the_row_count_on_this_machine(default_shapes):
    weights, lm_head = default_shapes
    choice = choose_gemm("auto", CPU, torch.float32, weights, lm_head)
    if not choice.invariant:  # a CPU where nothing holds: the verdict must say so, and every candidate fails
        assert "no GEMM" in choice.note
        assert all(rows_hold(c, weights, lambda w: invariance.ROW_COUNTS) for c in candidates("auto", CPU,
                                                                                               torch.float32))
        return
    lin = choice.linear
    g = torch.Generator().manual_seed(7)
    for w in weights:
        prepared = lin.prepare(w)
        x = torch.randn(1024, w.shape[1], generator=g)
        ref = lin(x[:ROWS], prepared)
        for m in (8, 16, 24, 32, 48, 104, 200, 512, 1024):  # more counts than the check itself uses
            assert torch.equal(lin(x[:m], prepared)[:ROWS], ref), (choice.label, w.shape, m)
        torch.testing.assert_close(lin(x[:24], prepared), F.linear(x[:24], w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["onednn", "cublas"])
def test_the_check_agrees_with_a_direct_measurement_for_each_library(mode, default_shapes):
    """On Intel MKL fails and the check must say so; on AMD both hold. Either way the verdict is the measurement."""
    if mode == "onednn" and not _has_onednn():
        pytest.skip("torch built without oneDNN")
    weights, _ = default_shapes
    lin = Linear(mode, CPU)
    g = torch.Generator().manual_seed(3)
    direct = True
    for w in weights:
        prepared = lin.prepare(w)
        x = torch.randn(104, w.shape[1], generator=g)
        ref = torch.cat([lin(x[i:i + 8], prepared) for i in range(0, 104, 8)])
        direct &= all(torch.equal(lin(x[:m], prepared), ref[:m]) for m in (8, 16, 24, 40, 64, 104))
    assert (rows_hold(lin, weights, lambda w: invariance.ROW_COUNTS) is None) == direct


def _count_dependent(monkeypatch, modes):
    """Make `modes` compute rows whose last bits depend on the row count (as MKL's do on Intel Xeon)."""
    plain = Linear._call

    def call(self, x, w, b=None):
        y = plain(self, x, w, b)
        return y * (1 + 2 ** -20) if self.mode in modes and x.shape[0] > ROWS else y
    monkeypatch.setattr(Linear, "_call", call)


def test_a_failing_library_falls_back_to_the_other(monkeypatch):
    if not _has_onednn():
        pytest.skip("torch built without oneDNN")
    _count_dependent(monkeypatch, {"onednn"})
    choice = choose_gemm("auto", CPU, torch.float32, _weights(SHAPES[:2]))
    assert choice.invariant and choice.label == "cublas" and "onednn: rows differ at" in choice.note


def test_when_both_libraries_fail_fixed_row_blocks_hold(monkeypatch):
    _count_dependent(monkeypatch, {"onednn", "cublas"})
    weights = _weights(SHAPES[:2])
    choice = choose_gemm("auto", CPU, torch.float32, weights)
    assert choice.invariant and choice.linear.block == ROWS and "8-row blocks" in choice.label
    lin, g = choice.linear, torch.Generator().manual_seed(5)
    x = torch.randn(64, 576, generator=g)
    ref = lin(x[:8], weights[0])
    assert all(torch.equal(lin(x[:m], weights[0])[:8], ref) for m in (8, 16, 24, 64))


def test_when_nothing_holds_the_verdict_says_so_and_batch_invariance_is_refused(monkeypatch, tmp_path):
    from skillkv.engine.weights import as_weights
    from skillkv.errors import SkillkvError
    from skillkv.model import resolve_model
    from skillkv.runners.paged import PagedRunner

    place_dependent_gemm(monkeypatch)
    choice = choose_gemm("auto", CPU, torch.float32, _weights(SHAPES[:1]))
    assert not choice.invariant and choice.note.startswith("no GEMM here gives rows independent of the row count")
    weights = as_weights(resolve_model("dummy:tiny", device="cpu").load())
    with pytest.raises(SkillkvError, match="^batch invariance cannot hold here: no GEMM") as e:
        PagedRunner(weights, 4 << 20, attention="torch", batch_invariant=True)
    assert "\n" not in str(e.value)
    r = PagedRunner(weights, 4 << 20, attention="torch", batch_invariant=None)  # serve's default: off, and says why
    use = r.usage()
    assert r.batch_invariant is False and use["batch_invariant"] is False and "no GEMM" in use["invariance"]
    assert r.engine.runner.row_block == 0


def test_verdicts_are_cached_and_persisted(monkeypatch, tmp_path):
    from skillkv.verdicts import Verdicts

    weights = _weights(SHAPES[:1])
    v = Verdicts.load(tmp_path)
    first = choose_gemm("auto", CPU, torch.float32, weights, verdicts=v)
    v.save()
    assert (tmp_path / "kernels.json").exists() and not v.changed
    invariance._PROCESS.clear()
    monkeypatch.setattr(invariance, "rows_hold", lambda *a: pytest.fail("checked again"))
    again = choose_gemm("auto", CPU, torch.float32, weights, verdicts=Verdicts.load(tmp_path))
    assert (again.label, again.invariant, again.note) == (first.label, first.invariant, first.note)
    (tmp_path / "kernels.json").write_text("{not json")
    assert dict(Verdicts.load(tmp_path)) == {}


def test_bfloat16_on_the_cpu_is_checked_too():
    """The CPU's bf16 GEMM (F.linear) is either invariant here or the verdict says it is not."""
    weights = [w.bfloat16() for w in _weights(SHAPES[:2])]
    choice = choose_gemm("auto", CPU, torch.bfloat16, weights)
    direct = rows_hold(choice.linear, weights, lambda w: invariance.ROW_COUNTS) is None
    assert choice.invariant == direct
