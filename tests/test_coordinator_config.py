"""Coordinator configuration: defaults, file loading, and rejection of every bad value."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_config, parse_config

MINIMAL = {"experts": [{"name": "a", "endpoint": "tcp://127.0.0.1:5555"},
                       {"name": "b", "endpoint": "tcp://127.0.0.1:5556"},
                       {"name": "c", "endpoint": "ipc:///tmp/moe2-c.sock"}]}


def with_value(path: str, value: object) -> dict:
    """Return MINIMAL with the dotted `path` set to `value` (creating tables)."""
    data = copy.deepcopy(MINIMAL)
    keys = path.split(".")
    table = data
    for key in keys[:-1]:
        if key.startswith("experts["):
            table = table["experts"][int(key[len("experts["):-1])]
        else:
            table = table.setdefault(key, {})
    table[keys[-1]] = value
    return data


def make_gating_files(directory: Path) -> None:
    """Create empty gate and embedder files where the configuration looks for them."""
    (directory / "gate").mkdir()
    (directory / "embedder").mkdir()
    for name in ("gate/gate.onnx", "gate/gate.json", "embedder/model.onnx", "embedder/tokenizer.json"):
        (directory / name).write_bytes(b"")


def test_config_minimal_defaults():
    config = parse_config(copy.deepcopy(MINIMAL))
    assert config.expert_names == ("a", "b", "c")
    assert config.subset == ("a", "b", "c")
    assert config.top_k == 3
    assert config.distribution_format == "sparse"
    assert config.top_m == 256
    assert not config.gating.enabled
    assert config.sampling.seed is None
    assert config.timeouts.step_deadline_s <= config.timeouts.step_s
    assert config.vocab_cache_dir is None


def test_config_subset_keeps_expert_order():
    config = parse_config(with_value("selection.subset", ["c", "a"]))
    assert config.subset == ("a", "c")
    assert config.top_k == 2


def test_config_file_resolves_relative_paths(tmp_path: Path):
    make_gating_files(tmp_path)
    path = tmp_path / "moe2.toml"
    path.write_text(
        '[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:5555"\n'
        '[gating]\ngate = "gate/gate.onnx"\nembedder = "embedder"\n'
        '[cache]\nvocab_dir = "vocab"\n'
        '[sampling]\ntemperature = 0\nseed = 7\nstop = ["\\n\\n"]\n', encoding="utf-8")
    config = load_config(path)
    assert config.gating.enabled
    assert config.gating.gate == tmp_path / "gate" / "gate.onnx"
    assert config.gating.embedder == tmp_path / "embedder"
    assert config.vocab_cache_dir == tmp_path / "vocab"
    assert config.sampling.temperature == 0.0
    assert config.sampling.seed == 7
    assert config.sampling.stop == ("\n\n",)
    assert config.source == path


def test_config_missing_file_names_path(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.key == "config"
    assert "absent.toml" in str(info.value)


def test_config_invalid_toml_rejected(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text("[[experts]\nname = ", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid TOML" in str(info.value)


BAD_VALUES = [
    # (dotted key to set, bad value, key named in the error)
    ("selection.top_k", 0, "selection.top_k"),
    ("selection.top_k", 4, "selection.top_k"),
    ("selection.top_k", True, "selection.top_k"),
    ("selection.top_k", "2", "selection.top_k"),
    ("selection.subset", [], "selection.subset"),
    ("selection.subset", ["a", "zzz"], "selection.subset[1]"),
    ("selection.subset", ["a", "a"], "selection.subset[1]"),
    ("selection.order", "gate", "selection.order"),
    ("distribution.format", "bitmap", "distribution.format"),
    ("distribution.format", "dense-prob", "distribution.format"),
    ("distribution.format", "probs", "distribution.format"),
    ("distribution.format", 1, "distribution.format"),
    ("distribution.top_m", 0, "distribution.top_m"),
    ("distribution.top_m", 2.5, "distribution.top_m"),
    ("sampling.temperature", -0.1, "sampling.temperature"),
    ("sampling.temperature", float("nan"), "sampling.temperature"),
    ("sampling.top_p", 0, "sampling.top_p"),
    ("sampling.top_p", 1.5, "sampling.top_p"),
    ("sampling.max_tokens", 0, "sampling.max_tokens"),
    ("sampling.seed", -1, "sampling.seed"),
    ("sampling.stop", "END", "sampling.stop"),
    ("sampling.stop", ["END", ""], "sampling.stop[1]"),
    ("timeouts.step_s", 0, "timeouts.step_s"),
    ("timeouts.open_s", float("inf"), "timeouts.open_s"),
    ("timeouts.step_deadline_s", 60.0, "timeouts.step_deadline_s"),
    ("timeouts.handshake_s", "10", "timeouts.handshake_s"),
    ("timeouts.retries", 3, "timeouts.retries"),
    ("gating.providers", [], "gating.providers"),
    ("gating.gate", "missing-gate.onnx", "gating.embedder"),
    ("gating.embedder", "no-such-dir", "gating.gate"),
    ("gating.model_dir", "models/demo", "gating.model_dir"),
    ("cache.vocab_dir", 5, "cache.vocab_dir"),
    ("experts[0].name", "", "experts[0].name"),
    ("experts[0].name", "has space", "experts[0].name"),
    ("experts[1].name", "a", "experts[1].name"),
    ("experts[0].endpoint", "127.0.0.1:5555", "experts[0].endpoint"),
    ("experts[0].endpoint", "tcp://127.0.0.1:70000", "experts[0].endpoint"),
    ("experts[0].endpoint", "tcp://127.0.0.1", "experts[0].endpoint"),
    ("experts[0].endpoint", "ipc://", "experts[0].endpoint"),
    ("experts[0].curve_server_key", "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", "experts[0].curve_server_key"),
    ("experts[0].weight", 2, "experts[0].weight"),
    ("server", {"port": 1}, "server"),
]


@pytest.mark.parametrize("path, value, key", BAD_VALUES, ids=[f"{case[0]}={case[1]!r}" for case in BAD_VALUES])
def test_config_bad_value_names_key(path: str, value: object, key: str):
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(path, value))
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize("dist", ["dense", "dense_prob"])
def test_config_dense_with_top_m_rejected(dist: str):
    data = with_value("distribution.format", dist)
    data["distribution"]["top_m"] = 64
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == "distribution.top_m"
    assert "distribution.top_m" in str(info.value)


@pytest.mark.parametrize("dist, wire", [
    ("sparse", {"kind": "sparse", "m": 256}),
    ("dense", {"kind": "dense"}),
    ("dense_prob", {"kind": "dense_prob"}),
])
def test_config_distribution_format_accepted(dist: str, wire: dict):
    config = parse_config(with_value("distribution.format", dist))
    assert config.distribution_format == dist
    assert config.wire_format.to_wire() == wire


@pytest.mark.parametrize("removed, key", [
    ("gate/gate.onnx", "gating.gate"),
    ("gate/gate.json", "gating.gate"),
    ("embedder/model.onnx", "gating.embedder"),
    ("embedder/tokenizer.json", "gating.embedder"),
])
def test_config_gating_file_not_found_named(tmp_path: Path, removed: str, key: str):
    make_gating_files(tmp_path)
    (tmp_path / removed).unlink()
    data = copy.deepcopy(MINIMAL)
    data["gating"] = {"gate": "gate/gate.onnx", "embedder": "embedder"}
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path)
    assert info.value.key == key
    assert Path(removed).name in str(info.value)


@pytest.mark.parametrize("data, key", [
    ({}, "experts"),
    ({"experts": []}, "experts"),
    ({"experts": ["a"]}, "experts[0]"),
    ({"experts": [{"name": "a"}]}, "experts[0].endpoint"),
    ({"experts": [{"endpoint": "tcp://127.0.0.1:1"}]}, "experts[0].name"),
    ({"experts": [{"name": "a", "endpoint": "tcp://127.0.0.1:1"}], "sampling": 3}, "sampling"),
])
def test_config_structure_errors_name_key(data: dict, key: str):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key


@pytest.mark.parametrize("override, value, key", [
    ("top_k", 0, "--top-k"),
    ("top_k", 9, "--top-k"),
    ("max_tokens", -3, "--max-tokens"),
    ("temperature", -1.0, "--temperature"),
    ("top_p", 0.0, "--top-p"),
    ("seed", -5, "--seed"),
    ("stop", [""], "--stop[0]"),
])
def test_config_override_bad_value_names_option(override: str, value: object, key: str):
    config = parse_config(copy.deepcopy(MINIMAL))
    with pytest.raises(ConfigError) as info:
        config.with_overrides(**{override: value})
    assert info.value.key == key


def test_config_overrides_applied():
    config = parse_config(copy.deepcopy(MINIMAL)).with_overrides(top_k=1, max_tokens=5, temperature=0.0, seed=3)
    assert config.top_k == 1
    assert config.sampling.max_tokens == 5
    assert config.sampling.temperature == 0.0
    assert config.sampling.seed == 3


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True),
    ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True),
    ("ipc:///run/moe2/agent.sock", True),
    ("tcp://10.0.0.12:5555", False),
    ("tcp://orin-3.local:5555", False),
])
def test_config_expert_loopback_detected(endpoint: str, loopback: bool):
    config = parse_config({"experts": [{"name": "a", "endpoint": endpoint}]})
    assert config.experts[0].is_loopback is loopback
