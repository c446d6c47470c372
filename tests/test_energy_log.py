"""`moe2 energy-log` as a real process: a `tegrastats` on PATH that replays recorded
lines, CSV and JSONL rows, appending, and SIGTERM."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import cli

ROOT = Path(__file__).resolve().parent.parent
REPLAY = Path(__file__).parent / "tegrastats_replay.py"
FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"


@pytest.fixture
def fake_tegrastats_path(tmp_path):
    """A folder with a `tegrastats` that replays the Orin NX line at the --interval given."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "tegrastats"
    script.write_text(f'#!/bin/sh\n# usage: tegrastats --interval MS\n'
                      f'exec "{sys.executable}" "{REPLAY}" "{FIXTURES / "orin-nx-8gb.txt"}" "$2"\n')
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def start_log(path_env: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": path_env}
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "energy-log", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(path: Path, count: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines within {timeout_s} s")


@pytest.mark.timeout(60)
def test_energy_log_jsonl_until_sigterm(fake_tegrastats_path, tmp_path):
    output = tmp_path / "power.jsonl"
    process = start_log(fake_tegrastats_path, "--meter", "tegrastats", "--interval", "50",
                        "--format", "jsonl", "--output", str(output))
    try:
        wait_for_rows(output, 4)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert "received SIGTERM" in stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) >= 5
    cumulative = 0.0
    for row in rows:
        assert row["meter"] == "tegrastats"
        assert row["method"] == "integrated"
        assert row["rails"] == "VDD_IN"
        assert row["watts"] == pytest.approx(17.946, rel=1e-4)
        assert row["rail_watts"]["VDD_SOC"] == pytest.approx(3.923)
        cumulative += row["joules"]
        assert row["cumulative_joules"] == pytest.approx(cumulative, abs=1e-5)
        assert row["unknown_s"] == 0


@pytest.mark.timeout(60)
def test_energy_log_csv_duration_appends(fake_tegrastats_path, tmp_path):
    output = tmp_path / "power.csv"
    for _ in range(2):
        process = start_log(fake_tegrastats_path, "--meter", "tegrastats", "--interval", "50",
                            "--duration", "0.3", "--output", str(output))
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr

    with output.open() as file:
        rows = list(csv.DictReader(file))
    header = output.read_text().splitlines()[0]
    assert header.count("timestamp") == 1
    assert output.read_text().count("timestamp,") == 1
    assert "rail_VDD_CPU_GPU_CV_w" in header
    assert len(rows) >= 4
    for row in rows:
        assert float(row["watts"]) == pytest.approx(17.946, rel=1e-4)
        assert float(row["rail_VDD_IN_w"]) == pytest.approx(17.946)
        rail_watts = json.loads(row["rail_watts"])
        assert rail_watts["VDD_IN"] == pytest.approx(17.946)
        assert rail_watts["VDD_SOC"] == pytest.approx(3.923)
    assert float(rows[-1]["elapsed_s"]) == pytest.approx(0.3, abs=0.2)


@pytest.mark.timeout(60)
def test_energy_log_estimate_meter(tmp_path, capsys):
    output = tmp_path / "estimate.jsonl"

    status = cli.main(["energy-log", "--meter", "estimate", "--watts-per-core", "10", "--interval", "20",
                       "--duration", "0.1", "--format", "jsonl", "--output", str(output)])

    assert status == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows
    assert all(row["method"] == "estimated" for row in rows)
    assert all(row["joules"] >= 0 for row in rows)


def test_energy_log_estimate_needs_watts(tmp_path, caplog):
    status = cli.main(["energy-log", "--meter", "estimate", "--output", str(tmp_path / "x.csv")])

    assert status == 2
    assert "--meter estimate needs --watts-per-core" in caplog.text
    assert not (tmp_path / "x.csv").exists()


def test_energy_log_unavailable_meter(tmp_path, monkeypatch, caplog):
    # With an empty PATH the tegrastats meter cannot find its program.
    monkeypatch.setenv("PATH", str(tmp_path))
    status = cli.main(["energy-log", "--meter", "tegrastats", "--output", str(tmp_path / "x.csv")])

    assert status == 1
    assert "energy meter tegrastats is unavailable: tegrastats not found" in caplog.text
    assert ". Choose another with --meter (auto falls back to none)" in caplog.text
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.timeout(60)
def test_energy_log_unknown_energy_is_null(tmp_path, caplog):
    output = tmp_path / "none.jsonl"

    with caplog.at_level(logging.INFO, logger="moe2"):
        status = cli.main(["energy-log", "--meter", "none", "--interval", "20", "--duration", "0.1",
                           "--format", "jsonl", "--output", str(output)])

    assert status == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) >= 2
    for row in rows:
        assert row["meter"] == "none"
        assert row["watts"] is None
        assert row["joules"] is None
        assert row["cumulative_joules"] is None
        assert row["rails"] is None
        assert row["rail_watts"] is None
    assert rows[-1]["unknown_s"] > 0
    stopped = [r.getMessage() for r in caplog.records if "energy log stopped" in r.getMessage()]
    assert len(stopped) == 1
    assert "energy unknown" in stopped[0]
    assert " J " not in stopped[0]


@pytest.mark.timeout(60)
def test_energy_log_csv_one_row_unknown_energy(tmp_path, caplog):
    output = tmp_path / "none.csv"

    with caplog.at_level(logging.INFO, logger="moe2"):
        status = cli.main(["energy-log", "--meter", "none", "--interval", "1000", "--duration", "0.05",
                           "--output", str(output)])

    assert status == 0
    with output.open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 1
    assert rows[0]["cumulative_joules"] == ""
    assert rows[0]["rails"] == ""
    assert rows[0]["rail_watts"] == ""
    assert "energy log stopped: 1 row, energy unknown" in caplog.text


def test_energy_log_rejects_bad_interval(caplog):
    status = cli.main(["energy-log", "--meter", "none", "--interval", "0"])

    assert status == 2
    assert "--interval 0 is invalid" in caplog.text
