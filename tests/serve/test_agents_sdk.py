"""The OpenAI Agents SDK (`openai-agents`, a client nobody here wrote) runs an agent against skillkv serve through
its chat-completions model: a forced first call of a function tool that loads a skill's body, the tool run by the
SDK, its result sent back and answered, the run completing. On the tiny model (random weights: the grammar makes
its call valid) and, marked slow, on the real default model answering a fact from the skill it loaded."""

from __future__ import annotations

from typing import Literal

import pytest

from protocol_server import server  # noqa: F401 - fixture

pytest.importorskip("agents", reason="openai-agents: a dev dependency (make install), not on the GPU machine")


def _run(url: str, question: str, skills: dict[str, str], max_tokens: int) -> tuple[object, list[str]]:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    loaded: list[str] = []

    def load_skill(name: str) -> str:
        """Load the instructions of one skill by its name."""
        loaded.append(name)
        return skills.get(name, f"no skill named {name!r}")

    load_skill.__annotations__["name"] = Literal[tuple(skills)]  # an enum in the schema: a name the grammar keeps
    load_skill = function_tool(load_skill)

    model = OpenAIChatCompletionsModel(model="default", openai_client=AsyncOpenAI(base_url=url + "/v1",
                                                                                  api_key="unused", max_retries=0))
    agent = Agent(name="skills", model=model, tools=[load_skill],
                  instructions="Skills: " + ", ".join(skills) + ". Load the one the question needs, then answer.",
                  model_settings=ModelSettings(tool_choice="required", max_tokens=max_tokens, temperature=0.0))
    return Runner.run_sync(agent, question, max_turns=4), loaded


def test_an_agent_calls_a_tool_and_completes_on_the_tiny_model(server):
    import time

    before = len(server.entries)
    result, loaded = _run(server.url, "What does code B-17 mean?", {"beta-codes": "Code B-17 means the disk is full."},
                          200)  # the tiny model's tokens are bytes
    assert len(loaded) == 1 and isinstance(result.final_output, str)
    time.sleep(0.5)  # the access log's line is written once the response has been sent
    chats = [e for e in server.entries[before:] if e["path"] == "/v1/chat/completions"]
    assert len(chats) >= 2 and all(e["status"] == 200 for e in chats)
    assert chats[0]["constrained"] == "tool_choice" and chats[0]["tool_calls"] == 1
    assert chats[1]["cached_tokens"] >= 16  # the second request reuses the first one's prompt


@pytest.mark.slow
def test_an_agent_answers_from_the_skill_it_loaded_on_the_real_model(real_store, tmp_path):
    from conftest import REPO

    from skillkv.serve.server import ServeConfig, Server

    body = (REPO / "skills" / "gpu-performance" / "SKILL.md").read_text()
    srv = Server(ServeConfig(port=0, skills=REPO / "skills", store=real_store, device="cpu", watch=False),
                 log=lambda s: None, access=lambda e: None).start_background(timeout=600)
    try:
        result, loaded = _run(srv.url, "What is the memory bandwidth of an H100 SXM?",
                              {"gpu-performance": body, "git-commit-messages": "Subject lines of 50 characters."}, 64)
    finally:
        srv.close()
    assert loaded and loaded[0] in ("gpu-performance", "git-commit-messages")
    assert isinstance(result.final_output, str) and result.final_output.strip()
