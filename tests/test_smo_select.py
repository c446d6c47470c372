"""`moe2 select` end to end: real files in, report out, configuration written."""

from __future__ import annotations

import json
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import numpy as np
import pytest

from coordinator import cli
from coordinator.config import load_config
from coordinator.select import set_subset_text
from tests.test_smo_losstable import make_profile

N_EXPERTS = 4

CONFIG = """\
# Coordinator for the bench.
[[experts]]
name = "expert0"
endpoint = "tcp://127.0.0.1:5555"

[[experts]]
name = "expert1"
endpoint = "tcp://127.0.0.1:5556"

[[experts]]
name = "expert2"
endpoint = "tcp://127.0.0.1:5557"

[[experts]]
name = "expert3"
endpoint = "tcp://127.0.0.1:5558"

[selection]
# S is chosen by moe2 select.
subset = [
    "expert0",   # the science expert
    "expert1",
]
top_k = 2  # experts per prompt

[sampling]
temperature = 0.5
"""

APPLICATIONS = """\
[[applications]]
name = "chat"
prompt_lengths = [64, 256, 1024]
output_tokens = 16
t_max = {t_max}
"""


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    offsets = np.arange(0, 4 * 20 + 1, 4, dtype=np.int64)
    # Experts 0 and 2 are good on the first half of the examples, 1 and 3 on the second.
    quality = np.where(np.arange(20)[:, None] < 10, [0.6, 0.2, 0.5, 0.1], [0.1, 0.6, 0.2, 0.5])
    probs = np.repeat(quality, 4, axis=0) * rng.uniform(0.5, 1.0, (80, N_EXPERTS))
    np.savez(tmp_path / "scores.npz", logprobs=np.log(probs).astype(np.float32), offsets=offsets,
             experts=np.array([f"expert{i}" for i in range(N_EXPERTS)]),
             fingerprints=np.array(["sha"] * N_EXPERTS),
             example_ids=np.array([f"demo/{i}" for i in range(20)]), meta_json=np.array("{}"))
    gates = quality / quality.sum(axis=1, keepdims=True)
    np.save(tmp_path / "gates.npy", gates)
    (tmp_path / "profile.json").write_text(json.dumps(make_profile(n_experts=N_EXPERTS)))
    (tmp_path / "apps.toml").write_text(APPLICATIONS.format(t_max=100.0))
    (tmp_path / "coordinator.toml").write_text(CONFIG)
    return tmp_path


def select_args(path, *extra):
    return ["select", "--scores", str(path / "scores.npz"), "--gates", str(path / "gates.npy"),
            "--profile", str(path / "profile.json"), "--applications", str(path / "apps.toml"), *extra]


def run_json(capsys, argv):
    status = cli.main(argv + ["--json"])
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_select_dry_run_prints_without_writing(inputs, capsys):
    status, report = run_json(capsys, select_args(inputs, "--energy-max", "1e6", "--dry-run",
                                                    "--config", str(inputs / "coordinator.toml")))

    assert status == 0
    assert report["feasible"]
    assert report["subset"] == ["expert0", "expert1", "expert2", "expert3"]
    assert report["top_k"] == 2
    assert report["optimality_gap"] == pytest.approx(0.0, abs=1e-12)
    assert (inputs / "coordinator.toml").read_text() == CONFIG


def test_select_energy_budget_writes_config(inputs, capsys):
    status, report = run_json(capsys, select_args(inputs, "--energy-max", "1e6", "--dry-run", "--k", "4"))
    assert status == 0
    full_energy = report["constraints"]["energy[chat]"]

    status, report = run_json(capsys, select_args(inputs, "--energy-max", str(0.6 * full_energy), "--k", "4",
                                                    "--config", str(inputs / "coordinator.toml")))

    assert status == 0
    assert report["constraints"]["energy[chat]"] <= 0.6 * full_energy
    assert 1 <= len(report["subset"]) < N_EXPERTS
    assert report["monotonicity_violations"] >= 0
    assert report["optimality_gap"] >= -1e-12
    config = load_config(inputs / "coordinator.toml")
    assert config.subset == tuple(report["subset"])
    text = (inputs / "coordinator.toml").read_text()
    assert "# Coordinator for the bench." in text
    assert "# S is chosen by moe2 select." in text
    assert "temperature = 0.5" in text


def test_select_exact_matches_smo(inputs, capsys):
    _, full = run_json(capsys, select_args(inputs, "--energy-max", "1e6", "--k", "4", "--dry-run"))
    budget = ["--energy-max", str(0.5 * full["constraints"]["energy[chat]"]), "--k", "4", "--dry-run"]

    status_smo, smo_report = run_json(capsys, select_args(inputs, *budget))
    status_exact, exact_report = run_json(capsys, select_args(inputs, *budget, "--exact"))

    assert status_smo == status_exact == 0
    assert exact_report["method"] == "exhaustive"
    assert smo_report["exact_loss"] == pytest.approx(exact_report["loss"])
    assert smo_report["loss"] - exact_report["loss"] == pytest.approx(smo_report["optimality_gap"])


def test_select_infeasible_names_constraint(inputs, capsys):
    (inputs / "apps.toml").write_text(APPLICATIONS.format(t_max=0.001))

    status = cli.main(select_args(inputs, "--dry-run"))

    output = capsys.readouterr().out
    assert status == 1
    assert "infeasible" in output
    assert "delay[chat]" in output


def test_select_text_report(inputs, capsys):
    status = cli.main(select_args(inputs, "--dry-run"))

    output = capsys.readouterr().out
    assert status == 0
    assert output.startswith("S = ")
    assert "monotonicity violations met" in output
    assert "optimality gap against exhaustive search" in output


def test_select_requires_config_or_dry_run(inputs, capsys, caplog):
    status = cli.main(select_args(inputs))

    assert status == 2
    assert "--dry-run" in caplog.text


def test_select_missing_profile_file(inputs, capsys, caplog):
    (inputs / "profile.json").unlink()

    status = cli.main(select_args(inputs, "--dry-run"))

    assert status == 2
    assert "profile not found" in caplog.text


def test_select_unknown_expert_in_config(inputs, capsys, caplog):
    # The configuration names its experts box0..box3, the score table expert0..expert3.
    renamed = CONFIG.replace('"expert', '"box')
    (inputs / "coordinator.toml").write_text(renamed)

    status = cli.main(select_args(inputs, "--k", "4", "--config", str(inputs / "coordinator.toml")))

    assert status == 2
    assert "selection.subset" in caplog.text
    assert (inputs / "coordinator.toml").read_text() == renamed


def test_set_subset_text_lowers_top_k():
    text = set_subset_text(CONFIG.replace("top_k = 2", "top_k = 3"), ("expert2",))

    data = tomllib.loads(text)
    assert data["selection"] == {"subset": ["expert2"], "top_k": 1}
    assert "top_k = 1  # experts per prompt" in text


def test_set_subset_text_adds_selection_table():
    text = set_subset_text('[[experts]]\nname = "a"\nendpoint = "tcp://127.0.0.1:1"', ("a",))

    assert tomllib.loads(text)["selection"] == {"subset": ["a"]}


def test_set_subset_text_inserts_missing_key():
    text = set_subset_text('[selection]\ntop_k = 1\n\n[sampling]\ntemperature = 0.1\n', ("a", "b"))

    data = tomllib.loads(text)
    assert data["selection"] == {"subset": ["a", "b"], "top_k": 1}
    assert data["sampling"] == {"temperature": 0.1}


def test_set_subset_text_keeps_trailing_comment():
    text = set_subset_text('[selection]\nsubset = ["a", "b"]  # chosen by hand\ntop_k = 1\n', ("b",))

    assert 'subset = ["b"]  # chosen by hand\n' in text
    assert tomllib.loads(text)["selection"] == {"subset": ["b"], "top_k": 1}


def test_set_subset_text_keeps_comment_after_multiline_array():
    config = CONFIG.replace('    "expert1",\n]\n', '    "expert1",\n]  # two experts\n')

    text = set_subset_text(config, ("expert3", "expert1"))

    assert 'subset = ["expert3", "expert1"]  # two experts\n' in text
    assert "# S is chosen by moe2 select.\n" in text
    assert "top_k = 2  # experts per prompt\n" in text
    assert tomllib.loads(text)["selection"] == {"subset": ["expert3", "expert1"], "top_k": 2}


def test_set_subset_text_changes_only_selection_lines():
    text = set_subset_text(CONFIG, ("expert2", "expert0"))

    added = [line for line in text.splitlines() if line not in CONFIG.splitlines()]
    removed = [line for line in CONFIG.splitlines() if line not in text.splitlines()]
    assert added == ['subset = ["expert2", "expert0"]']
    assert removed == ['subset = [', '    "expert0",   # the science expert', '    "expert1",', ']']


def test_select_help_names_application_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["select", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())

    for key in ("name", "prompt_lengths", "prompt_length_weights", "prompt_length_distribution",
                "output_tokens", "t_max"):
        assert key in help_text
    assert "t_max (budget on the expected delay per request, in seconds)" in help_text
    assert "Only the subset entry of its [selection] table is rewritten" in help_text
