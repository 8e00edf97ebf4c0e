"""The continuous-batching scheduler (sched/scheduler.py), torch-free: admission order and limits, the token
budget, prompts fed in pieces where the runner is chunk-invariant, failures and cancellation, reservations."""

from __future__ import annotations

from skillkv.engine.pages import PageTable
from skillkv.generate import SamplingParams
from skillkv.sched.request import Req
from skillkv.sched.scheduler import Scheduler


def req(n: int, max_new: int = 5) -> Req:
    return Req([1] * n, SamplingParams(), max_new)


def admit_all(r, reserved):
    r.seq = object()
    r.pending = list(r.ids)
    return True


def test_batches_decodes_with_new_prompts_and_respects_limits():
    s = Scheduler(max_batch=3, max_step_tokens=10)
    a, b, c, d = req(4), req(4), req(4), req(1)
    for r in (a, b, c, d):
        s.add(r)
    step = s.plan(admit_all, lambda r, e: None)
    assert step.reqs == [a, b] and step.inputs == [[1] * 4, [1] * 4]  # c would exceed 10 tokens this step
    for r in (a, b):
        r.pending = [7]
    step = s.plan(admit_all, lambda r, e: None)
    assert step.reqs == [a, b, c] and step.inputs == [[7], [7], [1] * 4]
    c.pending = [9]
    step = s.plan(admit_all, lambda r, e: None)
    assert len(s.running) == 3 and list(s.waiting) == [d] and step.reqs == [a, b, c]  # max_batch reached
    s.finish(a)
    step = s.plan(admit_all, lambda r, e: None)
    assert d in step.reqs


def test_a_long_prompt_runs_whole_in_an_idle_engine_or_in_pieces_when_split():
    whole = Scheduler(max_batch=4, max_step_tokens=8)
    big = req(50)
    whole.add(big)
    assert whole.plan(admit_all, lambda r, e: None).inputs == [[1] * 50]  # nothing starves
    split = Scheduler(max_batch=4, max_step_tokens=8, split=True)
    big2, small = req(20), req(3)
    split.add(big2)
    step = split.plan(admit_all, lambda r, e: None)
    assert step.inputs == [[1] * 8]
    big2.pending = big2.pending[8:]
    split.add(small)
    step = split.plan(admit_all, lambda r, e: None)
    assert step.reqs == [big2] and step.inputs == [[1] * 8]  # the budget is spent on big2's next piece first


def test_failures_and_cancellation():
    s = Scheduler(max_batch=4, max_step_tokens=8)
    big, bad, later = req(50), req(1), req(1)
    for r in (big, bad, later):
        s.add(r)
    failed = []

    def admit(r, reserved):
        if r is bad:
            raise ValueError("no")
        return admit_all(r, reserved)
    step = s.plan(admit, lambda r, e: failed.append((r, str(e))))
    assert step.reqs == [big]
    big.pending = [1]
    step = s.plan(admit, lambda r, e: failed.append((r, str(e))))
    assert failed == [(bad, "no")] and later in step.reqs and bad.state == "done"
    later.cancelled = True
    assert s.drop_cancelled() == [later] and s.running == [big]


def test_reserves_every_running_requests_worst_case():
    table = PageTable(num_pages=10, page_size=4)
    held = {}
    s = Scheduler(max_batch=8, max_step_tokens=100,
                  reserve=lambda r: max(0, r.worst_pages(4) - len(held[id(r)])))
    rs = [req(4, max_new=8) for _ in range(5)]  # 12 tokens worst case: 3 pages each
    for r in rs:
        s.add(r)

    def admit(r, reserved):
        if not table.can_alloc(reserved + r.worst_pages(4)):
            return False
        held[id(r)] = table.alloc(1)
        return admit_all(r, reserved)
    step = s.plan(admit, lambda r, e: None)
    assert len(step.reqs) == 3  # 3 x 3 pages fit in 10, a 4th would not
    assert s.reserved_pages() == 3 * 2


def test_worst_pages_counts_only_pages_of_its_own():
    r = Req([1] * 13, SamplingParams(), 5)  # 18 tokens -> 5 pages of 4
    assert r.worst_pages(4) == 5 and r.worst_pages(4, shared=2) == 3
