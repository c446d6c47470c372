"""`moe2 profile` against real agents on a tiny GGUF, and the profile feeding `moe2 select`."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from agent.config import load_config as load_agent_config
from agent.energy.estimate import EstimateMeter
from agent.model import ExpertModel
from agent.server import AgentServer
from coordinator import cli
from coordinator.costmodel import CostModel, load_profile, parse_applications

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def metered_agent(tiny_model_path):
    """An agent whose meter is the labelled CPU-time estimate, served from a thread."""
    config = load_agent_config({"model": tiny_model_path, "bind": "tcp://127.0.0.1:*", "n_threads": 1,
                                "n_ctx": 128, "name": "metered"})
    model = ExpertModel(config, meter=EstimateMeter(watts_per_core=12.0))
    server = AgentServer(config, model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=10)
    server.close()
    model.close()


@pytest.mark.timeout(120)
def test_profile_two_agents_end_to_end(tmp_path, start_agent, tiny_model_path, metered_agent, caplog):
    plain = start_agent(tiny_model_path, n_ctx=128)
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'[[experts]]\nname = "plain"\nendpoint = "{plain.address}"\n\n'
        f'[[experts]]\nname = "metered"\nendpoint = "{metered_agent.endpoint}"\n')
    output = tmp_path / "profile.json"

    with caplog.at_level(logging.INFO, logger="moe2"):
        status = cli.main(["profile", "--config", str(config), "--output", str(output),
                           "--lengths", "8,16,32,500", "--steps", "3", "--repeats", "2", "--warmup", "1"])

    assert status == 0, caplog.text
    assert "2 repeats of 1 prefill + 3 steps" in caplog.text
    profile = json.loads(output.read_text())
    assert profile["format"] == "moe2-profile"
    assert profile["settings"]["steps"] == 3
    assert profile["gate"] is None
    assert [e["name"] for e in profile["experts"]] == ["plain", "metered"]
    for expert in profile["experts"]:
        # 500 does not fit n_ctx 128, so the largest length that fits replaces it:
        # 128 - 3 steps - 1.
        assert expert["prefill"]["lengths"] == [8, 16, 32, 124]
        assert expert["step"]["lengths"] == [8, 16, 32, 124]
        assert expert["prefill"]["samples"] == [2, 2, 2, 2]
        assert expert["step"]["samples"] == [6, 6, 6, 6]
        for phase in ("prefill", "step"):
            seconds = expert[phase]["seconds"]
            assert all(s > 0 for s in seconds["median"])
            assert all(m <= p for m, p in zip(seconds["median"], seconds["p95"]))
        assert expert["model"]["model_sha256"]
        assert expert["machine"]["device"] == "cpu"

    plain_entry, metered_entry = profile["experts"]
    assert plain_entry["meter"]["name"] == "none"
    assert plain_entry["prefill"]["joules"]["median"] is None
    assert metered_entry["meter"]["method"] == "estimated"
    assert all(j >= 0 for j in metered_entry["prefill"]["joules"]["median"])
    assert metered_entry["step"]["energy_samples"] == [6, 6, 6, 6]

    png = tmp_path / "profile.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE

    # The profile is what `moe2 select` reads: delay is known for both experts, and
    # energy only for the metered one.
    loaded = load_profile(output)
    applications = parse_applications({"applications": [
        {"name": "chat", "prompt_lengths": [10, 60], "output_tokens": 4, "t_max": 10.0}]})
    costs = CostModel(loaded, ["plain", "metered"], applications)
    assert costs.delay("chat", 0b11) >= max(costs.delay("chat", 0b01), costs.delay("chat", 0b10))
    assert costs.unmetered == ["plain"]
    metered_only = CostModel(loaded, ["metered"], applications)
    assert np.isfinite(metered_only.energy("chat", 0b1))


def test_profile_unknown_expert(tmp_path, caplog):
    config = tmp_path / "coordinator.toml"
    config.write_text('[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:5555"\n')

    status = cli.main(["profile", "--config", str(config), "--output", str(tmp_path / "p.json"),
                       "--experts", "b"])

    assert status == 2
    assert "not configured" in caplog.text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option", ["--output", "--plot"])
def test_profile_output_under_file_rejected_first(tmp_path, caplog, option):
    config = tmp_path / "coordinator.toml"
    # Port 9 (discard) has no listener on loopback: profiling would time out, so
    # status 2 shows that the path was checked before any expert was contacted.
    config.write_text('[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:9"\n')
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder\n")
    paths = {"--output": str(tmp_path / "p.json"), "--plot": str(tmp_path / "p.png")}
    paths[option] = str(blocker / "sub" / "p.out")

    status = cli.main(["profile", "--config", str(config), "--output", paths["--output"], "--plot", paths["--plot"]])

    assert status == 2
    assert f"{option} {blocker / 'sub' / 'p.out'} cannot be created: {blocker} is a file, not a folder" in caplog.text
    assert "Traceback" not in caplog.text


def test_profile_output_folder_rejected(tmp_path, caplog):
    config = tmp_path / "coordinator.toml"
    config.write_text('[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:9"\n')

    status = cli.main(["profile", "--config", str(config), "--output", str(tmp_path)])

    assert status == 2
    assert f"--output {tmp_path} is a folder; give a file path" in caplog.text


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--steps", "0", "--steps 0 is invalid: give at least 1 decoding step per run"),
    ("--repeats", "0", "--repeats 0 is invalid: give at least 1 recorded run per length"),
    ("--warmup", "-1", "--warmup -1 is invalid: give 0 or more unrecorded runs"),
])
def test_profile_bad_count_names_only_it(tmp_path, caplog, option, value, message):
    config = tmp_path / "coordinator.toml"
    config.write_text('[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:9"\n')

    status = cli.main(["profile", "--config", str(config), "--output", str(tmp_path / "p.json"), option, value])

    assert status == 2
    assert message in caplog.text
    others = {"--steps", "--repeats", "--warmup"} - {option}
    for other in others:
        assert other not in caplog.text


def test_profile_rejects_bad_lengths(tmp_path, caplog):
    config = tmp_path / "coordinator.toml"
    config.write_text('[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:5555"\n')

    status = cli.main(["profile", "--config", str(config), "--output", str(tmp_path / "p.json"),
                       "--lengths", "32,abc"])

    assert status == 2
    assert "--lengths" in caplog.text
