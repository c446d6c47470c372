"""The coordinator on the Gemma 3 270M demo model (vocabulary 262,144)."""

from __future__ import annotations

import json

import pytest

from coordinator.cli import main
from test_coordinator_generate import generate, llama_greedy, make_config

PROMPT = "The capital of France is"
N_TOKENS = 8


@pytest.mark.demo_model
@pytest.mark.timeout(300)
def test_demo_model_two_experts_match_llama_greedy(start_agent, demo_model_path):
    reference = llama_greedy(demo_model_path, PROMPT, N_TOKENS)
    first = start_agent(demo_model_path, n_ctx=512, max_sessions=2)
    second = start_agent(demo_model_path, n_ctx=512, max_sessions=2)
    endpoints = {"a": first.address, "b": second.address}

    for dist in ("dense", "sparse"):
        result = generate(make_config(endpoints, dist=dist, max_tokens=N_TOKENS), PROMPT)
        assert result.tokens == reference, dist
        assert result.served_counts == {"a": len(reference), "b": len(reference)}


@pytest.mark.demo_model
@pytest.mark.timeout(300)
def test_demo_command_answers_and_stops_agents(demo_model_path, capsys):
    status = main(["demo", "--experts", "2", "--max-tokens", "8", "--json"])

    assert status == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result["experts"]) == 2
    assert 1 <= len(result["tokens"]) <= 8
    assert result["text"]
    assert "agents stopped" in captured.err
    expected = "gate: uniform weights, because" if result["gate_uniform"] else "gate: trained gate"
    assert expected in captured.err
