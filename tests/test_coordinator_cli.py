"""`moe2 generate` and `moe2 experts` run in-process against real agents on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import main
from gguf_factory import OTHER_WORDS


def write_config(path: Path, endpoints: dict[str, str], extra: str = "", handshake_s: float = 2.0) -> Path:
    lines = []
    for name, endpoint in endpoints.items():
        lines += ["[[experts]]", f'name = "{name}"', f'endpoint = "{endpoint}"']
    lines += ["[timeouts]", f"handshake_s = {handshake_s}", "step_deadline_s = 5.0", "step_s = 20.0"]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


@pytest.mark.timeout(60)
def test_cli_generate_json_reports_result(start_agent, tiny_model_path, tmp_path, capsys):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    config = write_config(tmp_path / "moe2.toml", {"a": first.address, "b": second.address})

    status = main(["generate", "the quick brown fox", "--config", str(config), "--json",
                   "--top-k", "2", "--max-tokens", "6", "--temperature", "0.7", "--seed", "11"])

    assert status == 0
    output = capsys.readouterr().out
    assert len(output.strip().splitlines()) == 1
    result = json.loads(output)
    assert len(result["tokens"]) == 6
    assert result["seed"] == 11
    assert result["top_k"] == 2
    assert result["gate_uniform"] is True
    assert [e["name"] for e in result["experts"]] == ["a", "b"]
    assert [e["served_steps"] for e in result["experts"]] == [6, 6]
    assert result["energy_j"] is None
    assert [e["meter"] for e in result["experts"]] == ["none", "none"]
    assert result["distribution"] == {"kind": "sparse", "m": 256}
    for key in ("time_to_first_token_s", "token_latency_mean_s", "token_latency_p95_s", "tokens_per_s", "gate_s"):
        assert isinstance(result[key], float), key


@pytest.mark.timeout(60)
def test_cli_generate_streams_text_then_summary(start_agent, tiny_model_path, tmp_path, capsys):
    agent = start_agent(tiny_model_path)
    config = write_config(tmp_path / "moe2.toml", {"a": agent.address})

    status = main(["generate", "hello world", "--config", str(config), "--max-tokens", "5", "--temperature", "0"])

    assert status == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    assert "a: gate 1.0000, weight 1.0000, served 5/5 steps" in captured.err
    assert "tokens: 5, stopped at the token limit (5);" in captured.err
    assert "energy: unknown (no meter on a)" in captured.err
    assert "gate: uniform (no trained gate configured)" in captured.err


@pytest.mark.timeout(60)
def test_cli_generate_summary_lists_unavailable_expert(start_agent, tiny_model_path, tmp_path, capsys):
    agent = start_agent(tiny_model_path)
    # Port 9 (discard) has no listener on loopback, so the handshake times out.
    config = write_config(tmp_path / "moe2.toml", {"a": agent.address, "gone": "tcp://127.0.0.1:9"},
                          handshake_s=0.5)

    status = main(["generate", "hello world", "--config", str(config), "--max-tokens", "3", "--top-k", "2"])

    assert status == 0
    summary = capsys.readouterr().err
    assert "  gone: left out, handshake failed: info timed out after 0.5 s (agent at tcp://127.0.0.1:9)" in summary
    assert "Is moe2-agent running there?" in summary
    assert "a: gate 0.5000, weight 1.0000, served 3/3 steps" in summary


@pytest.mark.timeout(30)
def test_cli_generate_bad_config_exits_2(tmp_path, capsys):
    config = write_config(tmp_path / "moe2.toml", {"a": "tcp://127.0.0.1:5555"}, "[selection]\ntop_k = 3\n")
    assert main(["generate", "hi", "--config", str(config)]) == 2
    assert "selection.top_k = 3" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_cli_generate_bad_option_names_flag(tmp_path, capsys):
    config = write_config(tmp_path / "moe2.toml", {"a": "tcp://127.0.0.1:5555"})
    assert main(["generate", "hi", "--config", str(config), "--temperature", "-1"]) == 2
    assert "--temperature = -1.0" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_generate_tokenizer_mismatch_exits_1(start_agent, tiny_model_path, tiny_gguf, tmp_path, capsys):
    same = start_agent(tiny_model_path)
    other = start_agent(tiny_gguf(words=OTHER_WORDS))
    config = write_config(tmp_path / "moe2.toml", {"a": same.address, "x": other.address})

    assert main(["generate", "hi", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert same.model.vocab.fingerprint in captured.err
    assert other.model.vocab.fingerprint in captured.err


@pytest.mark.timeout(60)
def test_cli_experts_table_marks_unreachable(start_agent, tiny_model_path, tmp_path, capsys):
    agent = start_agent(tiny_model_path)
    config = write_config(tmp_path / "moe2.toml", {"a": agent.address, "gone": "tcp://127.0.0.1:9"})

    assert main(["experts", "--config", str(config)]) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["EXPERT", "S", "STATUS"]
    assert table[1].split()[:3] == ["a", "yes", "ok"]
    assert "tiny-llama" in table[1]
    assert table[2].split()[:3] == ["gone", "yes", "error"]
    assert "gone: info timed out after 2 s" in table[3]
    assert "Is moe2-agent running there?" in table[3]


@pytest.mark.timeout(60)
def test_cli_experts_json_healthy(start_agent, tiny_model_path, tmp_path, capsys):
    agent = start_agent(tiny_model_path)
    config = write_config(tmp_path / "moe2.toml", {"a": agent.address})

    assert main(["experts", "--config", str(config), "--json"]) == 0
    (expert,) = json.loads(capsys.readouterr().out)["experts"]
    assert expert["healthy"] is True
    assert expert["ping_ms"] > 0
    assert expert["info"]["tokenizer_fingerprint"] == agent.model.vocab.fingerprint
