"""`moe2-agent` as a real process: start-up, settings errors, SIGTERM and SIGINT."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.client import AgentClient
from agent.config import OPTIONS

REPOSITORY = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60
SERVING = re.compile(r"serving \S+ on (tcp://127\.0\.0\.1:\d+)")

pytestmark = pytest.mark.timeout(120)


class AgentProcess:
    """`python -m agent.cli ARGS` with its stderr collected line by line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *args], cwd=REPOSITORY,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        """Return the first stderr line matching `pattern`, or fail after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if match := pattern.search(line):
                return match
        pytest.fail(f"no line matching {pattern.pattern!r} in the agent's stderr:\n{''.join(self.lines)}")

    def finish(self, timeout_s: float = 30) -> tuple[int, str]:
        """Wait for exit and return (exit status, all of stderr)."""
        status = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return status, "".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process.stderr.close()


@pytest.fixture
def run_agent():
    """Return a factory: run_agent(*args) -> AgentProcess, killed at teardown if still running."""
    processes: list[AgentProcess] = []

    def run(*args: str) -> AgentProcess:
        process = AgentProcess(*args)
        processes.append(process)
        return process

    yield run
    for process in processes:
        process.kill()


def test_help_lists_every_option():
    help_text = build_parser().format_help()

    for option in OPTIONS:
        assert option.flag in help_text
    assert "--config" in help_text


def test_invalid_settings_exit_before_loading(run_agent, tmp_path):
    agent = run_agent("--model", str(tmp_path / "absent.gguf"), "--n-ctx", "2", "--bind", "nowhere")

    status, stderr = agent.finish()

    assert status == 2
    assert f"--model: file {tmp_path / 'absent.gguf'} not found" in stderr
    assert "--n-ctx must be at least 8 tokens, got 2" in stderr
    assert "--bind 'nowhere' is not a ZeroMQ address" in stderr
    assert "llama" not in stderr.lower(), "the model loader ran despite invalid settings"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_agent_serves_and_stops_on_signal(run_agent, tiny_model_path, stop_signal):
    agent = run_agent("--model", str(tiny_model_path), "--bind", "tcp://127.0.0.1:*", "--n-threads", "1",
                      "--n-ctx", "64")
    address = agent.wait_for(SERVING).group(1)
    with AgentClient(address, timeout_s=10) as client:
        assert client.info()["n_ctx"] == 64
        client.open("s", "the quick brown fox")

    agent.process.send_signal(stop_signal)
    status, stderr = agent.finish()

    assert status == 0
    assert f"received {stop_signal.name}, stopping" in stderr
    assert "agent stopped" in stderr
    assert "Traceback" not in stderr


def test_agent_reads_config_file(run_agent, tiny_model_path, tmp_path):
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'model = "{tiny_model_path}"\nbind = "tcp://127.0.0.1:*"\nn_threads = 1\n'
                           'name = "from-file"\nmax_sessions = 2\n', encoding="utf-8")
    agent = run_agent("--config", str(config_file), "--max-sessions", "3")
    address = agent.wait_for(SERVING).group(1)

    with AgentClient(address, timeout_s=10) as client:
        info = client.info()

    assert info["name"] == "from-file"
    assert info["max_sessions"] == 3
    agent.process.send_signal(signal.SIGTERM)
    assert agent.finish()[0] == 0


def test_taken_port_exits_with_error(run_agent, tiny_model_path):
    first = run_agent("--model", str(tiny_model_path), "--bind", "tcp://127.0.0.1:*", "--n-threads", "1")
    address = first.wait_for(SERVING).group(1)

    second = run_agent("--model", str(tiny_model_path), "--bind", address, "--n-threads", "1")
    status, stderr = second.finish()

    assert status == 1
    assert f"could not bind {address}" in stderr
    assert "loaded" not in stderr, "the model was loaded before the bind failed"
    first.process.send_signal(signal.SIGTERM)
    assert first.finish()[0] == 0


def test_estimate_meter_labels_reply_energy(run_agent, tiny_model_path):
    agent = run_agent("--model", str(tiny_model_path), "--bind", "tcp://127.0.0.1:*", "--n-threads", "1",
                      "--energy-meter", "estimate", "--energy-watts-per-core", "5")
    address = agent.wait_for(SERVING).group(1)

    with AgentClient(address, timeout_s=10) as client:
        result = client.open("s", "the quick brown fox")

    assert result.meter == "estimate"
    assert result.energy["method"] == "estimated"
    assert result.energy_j is not None and result.energy_j >= 0.0
    agent.process.send_signal(signal.SIGTERM)
    assert agent.finish()[0] == 0


@pytest.mark.skipif(shutil.which("tegrastats") is not None, reason="tegrastats is available on this machine")
def test_unavailable_meter_exits_with_reason(run_agent, tiny_model_path):
    agent = run_agent("--model", str(tiny_model_path), "--bind", "tcp://127.0.0.1:*", "--n-threads", "1",
                      "--energy-meter", "tegrastats")

    status, stderr = agent.finish()

    assert status == 1
    assert "energy meter 'tegrastats' is unavailable" in stderr
    assert ". Choose another with --energy-meter" in stderr
    assert "Traceback" not in stderr
