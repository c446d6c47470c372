"""Start and stop `moe2-agent` processes on loopback, for the demo, benchmarks and tests.

Each agent binds `tcp://127.0.0.1:*` (a free port). Readiness uses the systemd
notification protocol: the agent gets a private `NOTIFY_SOCKET` and sends
`READY=1` with a `STATUS=serving NAME on ENDPOINT` line once it serves, which gives
the bound endpoint without guessing ports. Agents write their logs to files in a
temporary folder; a failed start raises with the tail of the agent's log.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("moe2.coordinator.local_agents")

_ENDPOINT_IN_STATUS = re.compile(r"\b(tcp://\S+|ipc://\S+)")


class AgentStartError(RuntimeError):
    """An agent process exited or did not report READY in time."""


@dataclass(frozen=True)
class AgentSpec:
    """Settings of one local agent: expert name, GGUF file, optional domain prompt and options."""

    name: str
    model: Path
    domain_prompt: Path | None = None
    n_threads: int = 1
    n_ctx: int = 2048
    max_sessions: int = 4
    extra_args: tuple[str, ...] = ()


@dataclass
class LocalAgent:
    spec: AgentSpec
    process: subprocess.Popen
    log_path: Path
    endpoint: str = ""
    _notify: socket.socket | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        self.process.kill()
        self.process.wait(timeout=10)


class LocalAgents:
    """A group of agent processes; use as a context manager so every process is stopped."""

    def __init__(self, specs: list[AgentSpec], start_timeout_s: float = 120.0, log_level: str = "INFO"):
        self.specs = specs
        self.start_timeout_s = start_timeout_s
        self.log_level = log_level
        self.agents: list[LocalAgent] = []
        self._directory = tempfile.TemporaryDirectory(prefix="moe2-agents-")

    def __enter__(self) -> LocalAgents:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __getitem__(self, name: str) -> LocalAgent:
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise KeyError(name)

    def start(self) -> None:
        """Start every agent at once, then wait until each reports READY."""
        directory = Path(self._directory.name)
        for spec in self.specs:
            self.agents.append(self._launch(spec, directory))
        deadline = time.monotonic() + self.start_timeout_s
        for agent in self.agents:
            self._wait_ready(agent, deadline)
            log.info("agent %s ready on %s (pid %d)", agent.name, agent.endpoint, agent.process.pid)

    def _launch(self, spec: AgentSpec, directory: Path) -> LocalAgent:
        notify_path = directory / f"{spec.name}.notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(str(notify_path))
        command = [sys.executable, "-m", "agent.cli", "--model", str(spec.model), "--name", spec.name,
                   "--bind", "tcp://127.0.0.1:*", "--n-threads", str(spec.n_threads),
                   "--n-ctx", str(spec.n_ctx), "--max-sessions", str(spec.max_sessions),
                   "--log-level", self.log_level, *spec.extra_args]
        if spec.domain_prompt is not None:
            command += ["--domain-prompt", str(spec.domain_prompt)]
        environment = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        environment.pop("WATCHDOG_USEC", None)
        log_path = directory / f"{spec.name}.log"
        try:
            with open(log_path, "wb") as log_file:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT, env=environment)
        except OSError:
            notify.close()
            raise
        return LocalAgent(spec, process, log_path, _notify=notify)

    def _wait_ready(self, agent: LocalAgent, deadline: float) -> None:
        assert agent._notify is not None
        while True:
            remaining = deadline - time.monotonic()
            if agent.process.poll() is not None:
                raise AgentStartError(f"agent {agent.name} exited with status {agent.process.returncode} "
                                      f"before it was ready; its log ends with:\n{agent.log_tail()}")
            if remaining <= 0:
                raise AgentStartError(f"agent {agent.name} did not report READY within {self.start_timeout_s:g} s; "
                                      f"its log ends with:\n{agent.log_tail()}")
            agent._notify.settimeout(min(remaining, 0.5))
            try:
                message = agent._notify.recv(4096).decode("utf-8", errors="replace")
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
            if fields.get("READY") != "1":
                continue
            match = _ENDPOINT_IN_STATUS.search(fields.get("STATUS", ""))
            if not match:
                raise AgentStartError(f"agent {agent.name} reported READY without an endpoint in its status "
                                      f"({fields.get('STATUS')!r})")
            agent.endpoint = match.group(1)
            return

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send SIGTERM to every running agent, then SIGKILL any still running after `timeout_s`."""
        for agent in self.agents:
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for agent in self.agents:
            try:
                agent.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("agent %s did not stop within %g s of SIGTERM; killing it", agent.name, timeout_s)
                agent.process.kill()
                agent.process.wait(timeout=10)
            if agent._notify is not None:
                agent._notify.close()
                agent._notify = None
        self._directory.cleanup()
