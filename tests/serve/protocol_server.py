"""Fixtures of the protocol tests (tool calls, constrained answers, the Anthropic API), imported by their modules:
a tiny-model server that records its access log, and a way to make its model say a given text."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import write_skill

    from skillkv.serve.server import ServeConfig, Server

    root = tmp_path_factory.mktemp("serve-calls")
    write_skill(root / "skills", "beta-codes", "Use for beta error codes.", "Code B-17 means the disk is full.\n")
    srv = Server(ServeConfig(port=0, model="dummy:tiny", skills=root / "skills", store=root / "store", device="cpu",
                             watch=False), log=lambda s: None, access=lambda e: srv.entries.append(e))
    srv.entries = []
    yield srv.start_background()
    srv.close()


@pytest.fixture
def scripted(server, monkeypatch):
    """The model answers `script[0]` (a text, then its end-of-turn token) whatever the prompt: every sampled
    position's logits are replaced by a one-hot of the script's next token."""
    from skillkv.sched.loop import Loop

    tok, script = server.kv.handle.tokenizer, [""]
    stop = min(server.kv.handle.stop_ids)
    real = Loop._postprocess

    def forced(self, step, logits):
        ids = tok.encode(script[0], add_special_tokens=False) + [stop]
        logits = logits.clone().fill_(-1e4)
        for i, r in enumerate(step.reqs):
            logits[i, ids[min(len(r.output), len(ids) - 1)]] = 0.0
        return real(self, step, logits)

    monkeypatch.setattr(Loop, "_postprocess", forced)
    return script



def logged(server, send) -> tuple[object, dict]:
    """(what `send()` returns, the access-log entry of the request it made): the log line is written once the response
    has been sent, so it may land just after the client has read it."""
    import time

    before = -1
    while before != len(server.entries):  # the lines of earlier requests landed: none for 0.3 s
        before = len(server.entries)
        time.sleep(0.3)
    out = send()
    deadline = time.monotonic() + 10
    while len(server.entries) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.entries) == before + 1, server.entries[before:]
    return out, server.entries[-1]
