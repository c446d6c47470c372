"""Agent settings: flags, TOML file, validation before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import OPTIONS, AgentConfig, ConfigError, is_loopback_address, load_config


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(flags=None, config_file=None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(flags, config_file)
    return raised.value.problems


def test_defaults(tiny_model_path):
    config = load_config({"model": tiny_model_path})

    assert config == AgentConfig(model=tiny_model_path)
    assert config.bind == "tcp://127.0.0.1:5555"
    assert config.max_sessions >= 8
    assert config.is_loopback
    assert config.expert_name == tiny_model_path.name
    assert config.threads >= 1


def test_every_option_is_a_config_field():
    fields = set(AgentConfig.__dataclass_fields__)

    for option in OPTIONS:
        assert option.key in fields, option.key
        assert option.flag == "--" + option.key.replace("_", "-")


def test_flags_override_file(tiny_model_path, tmp_path):
    config_file = write_toml(tmp_path / "agent.toml", f'model = "{tiny_model_path}"\nn_ctx = 256\nmax_sessions = 4\n')

    config = load_config({"n_ctx": 512, "max_sessions": None}, config_file)

    assert config.n_ctx == 512
    assert config.max_sessions == 4


def test_file_paths_are_relative_to_file(tiny_model_path, tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(tiny_model_path.read_bytes())
    (folder / "domain.txt").write_text("medicine and anatomy", encoding="utf-8")
    config_file = write_toml(folder / "agent.toml", 'model = "model.gguf"\ndomain-prompt = "domain.txt"\n')

    config = load_config({}, config_file)

    assert config.model == folder / "model.gguf"
    assert config.domain_prompt == folder / "domain.txt"
    assert config.domain_prompt_text == "medicine and anatomy"


def test_unknown_file_key_is_an_error(tiny_model_path, tmp_path):
    config_file = write_toml(tmp_path / "agent.toml", f'model = "{tiny_model_path}"\nlora_path = "x.gguf"\n')

    problems = problems_of({}, config_file)

    assert len(problems) == 1
    assert "unknown key 'lora_path'" in problems[0]
    assert "lora" in problems[0]


def test_invalid_toml_is_reported(tmp_path):
    config_file = write_toml(tmp_path / "agent.toml", "model = \n")

    problems = problems_of({}, config_file)

    assert any("could not be read" in problem for problem in problems)


def test_missing_config_file_is_reported(tiny_model_path, tmp_path):
    problems = problems_of({"model": tiny_model_path}, tmp_path / "absent.toml")

    assert problems == [f"config file {tmp_path / 'absent.toml'} not found"]


def test_missing_model_is_reported():
    problems = problems_of({})

    assert problems == ["model is missing: pass --model PATH or set model in the config file"]


def test_model_must_exist_and_be_gguf(tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 zip file")

    assert "not found" in problems_of({"model": tmp_path / "absent.gguf"})[0]
    assert "is a folder" in problems_of({"model": tmp_path})[0]
    assert "is not a GGUF file (it starts with b'PK\\x03\\x04'" in problems_of({"model": not_gguf})[0]


def test_all_problems_are_reported_at_once(tiny_model_path, tmp_path):
    config_file = write_toml(tmp_path / "agent.toml", 'n_ctx = "big"\nmax_sessions = true\n')

    problems = problems_of({"model": tiny_model_path, "bind": "localhost:5555", "idle_timeout": 0.0,
                            "energy_meter": "powermeter", "flash_attn": "yes", "log_level": "LOUD"}, config_file)

    text = "\n".join(problems)
    assert f"n_ctx in {config_file} must be an integer, got 'big'" in text
    assert f"max_sessions in {config_file} must be an integer, got True" in text
    assert "--bind 'localhost:5555' is not a ZeroMQ address" in text
    assert "--idle-timeout must be positive" in text
    assert "--energy-meter 'powermeter' is not one of: auto, jtop, tegrastats" in text
    assert "--flash-attn 'yes' is not one of: auto, on, off" in text
    assert "--log-level 'LOUD' is not a logging level" in text
    assert len(problems) == 7


@pytest.mark.parametrize("key, value, message", [
    ("n_ctx", 4, "at least 8"),
    ("max_sessions", 0, "between 1 and 254"),
    ("max_sessions", 255, "between 1 and 254"),
    ("n_batch", 0, "at least 1"),
    ("n_threads", 0, "at least 1"),
    ("n_gpu_layers", -2, "-1 (all layers) or more"),
    ("max_frame_bytes", 100, "between 4096"),
    ("lora_scale", float("nan"), "finite number"),
])
def test_out_of_range_values_are_reported(tiny_model_path, tiny_lora_path, key, value, message):
    flags = {"model": tiny_model_path, key: value}
    if key == "lora_scale":
        flags["lora"] = tiny_lora_path

    problems = problems_of(flags)

    assert len(problems) == 1
    assert problems[0].startswith("--" + key.replace("_", "-"))
    assert message in problems[0]


def test_lora_scale_needs_lora(tiny_model_path):
    problems = problems_of({"model": tiny_model_path, "lora_scale": 0.5})

    assert problems == ["--lora-scale is set but no LoRA adapter is: add --lora PATH or remove it"]


def test_domain_prompt_must_be_utf8_text(tiny_model_path, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))

    assert "is empty" in problems_of({"model": tiny_model_path, "domain_prompt": empty})[0]
    assert "is not UTF-8 text" in problems_of({"model": tiny_model_path, "domain_prompt": latin1})[0]
    assert "not found" in problems_of({"model": tiny_model_path, "domain_prompt": tmp_path / "none.txt"})[0]


@pytest.mark.parametrize("address, valid, loopback", [
    ("tcp://127.0.0.1:5555", True, True),
    ("tcp://127.0.0.1:*", True, True),
    ("tcp://127.0.0.2:5555", True, True),
    ("tcp://localhost:5555", True, True),
    ("tcp://[::1]:5555", True, True),
    ("ipc:///run/moe2/agent.sock", True, True),
    ("tcp://0.0.0.0:5555", True, False),
    ("tcp://*:5555", True, False),
    ("tcp://192.168.1.20:5555", True, False),
    ("tcp://eth0:5555", True, False),
    ("tcp://127.0.0.1", False, False),
    ("udp://127.0.0.1:5555", False, False),
])
def test_bind_addresses(tiny_model_path, address, valid, loopback):
    if valid:
        assert load_config({"model": tiny_model_path, "bind": address}).bind == address
    else:
        assert "is not a ZeroMQ address" in problems_of({"model": tiny_model_path, "bind": address})[0]
    assert is_loopback_address(address) == loopback


@pytest.mark.parametrize("port", ["0", "70000", "99999"])
def test_bind_port_out_of_range(tiny_model_path, port):
    address = f"tcp://127.0.0.1:{port}"
    problems = problems_of({"model": tiny_model_path, "bind": address})

    assert len(problems) == 1
    assert f"--bind '{address}' has port {port}, which is out of range 1-65535" in problems[0]
    assert is_loopback_address(address)


def test_estimate_meter_needs_watts_per_core(tiny_model_path):
    problems = problems_of({"model": tiny_model_path, "energy_meter": "estimate"})

    assert len(problems) == 1
    assert "'estimate' needs --energy-watts-per-core (energy_watts_per_core in the config file)" in problems[0]


def test_energy_options_are_range_checked(tiny_model_path):
    problems = problems_of({"model": tiny_model_path, "energy_interval_ms": 0,
                            "energy_watts_per_core": -2.0, "energy_device_index": -1})

    text = "\n".join(problems)
    assert "--energy-interval-ms must be between 1 and 60000 ms, got 0" in text
    assert "--energy-watts-per-core must be positive watts, got -2.0" in text
    assert "--energy-device-index must be 0 or more, got -1" in text
