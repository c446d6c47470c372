"""Jetson power from `tegrastats`: one parser for every output format, and a meter that
integrates the board's total power over time.

Rail fields come in three forms, all in milliwatts:

    VDD_IN 12479mW/12479mW                 JetPack 5 and 6: current/average
    VDD_GPU_SOC 5139mW/5139mW/5139mW       JetPack 7: current/average/max
    POM_5V_IN 2746/2911                    JetPack 4: unitless current/average

and a line may start with a `MM-DD-YYYY HH:MM:SS` timestamp. Rails that are not known
are kept in the parsed sample. The board total depends on the board, because some rails
already contain others (`board_total`).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from agent.energy.base import MeterUnavailable
from agent.energy.trace import DEFAULT_HORIZON_S, SampledMeter

log = logging.getLogger(__name__)

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAIL_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_NUMBER = r"(\d+(?:\.\d+)?)"
_RAIL_VALUE = re.compile(rf"^{_NUMBER}(mW)?/{_NUMBER}(mW)?(?:/{_NUMBER}(mW)?)?$")


@dataclass(frozen=True)
class RailReading:
    """One rail's power in watts."""

    current_w: float
    average_w: float
    max_w: float | None = None


@dataclass(frozen=True)
class TegrastatsSample:
    """One parsed tegrastats line."""

    timestamp: dt.datetime | None
    rails: dict[str, RailReading]


@dataclass(frozen=True)
class BoardTotal:
    """The board's total power and the rails it is computed from.

    `watts` is None when the line has no rail set known to give the total.
    """

    watts: float | None
    rails: tuple[str, ...]
    scope: str


# Total-power rules, tried in order. Each is (rails summed, what the sum covers).
# Sources: NVIDIA Jetson Linux Developer Guide power-monitor tables and the boards'
# device trees, as summarized by the energymon project's JetsonPowerRails notes.
TOTAL_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    # Jetson Nano, TX1 with JetPack 4 names: 5V input of the module. POM_5V_GPU and
    # POM_5V_CPU are parts of it and must not be added.
    (("POM_5V_IN",), "module input"),
    # Orin NX, Orin Nano, Xavier NX, TX2, TX2 NX, TX1: module input. The CPU/GPU/SOC
    # rails (VDD_CPU_GPU_CV, VDD_SOC, VDD_SYS_*) are parts of it.
    (("VDD_IN",), "module input"),
    # AGX Orin: no input rail, so the module's three supplies are summed. NVIDIA's rail
    # description puts VDDQ_VDD2_1V8AO inside VIN_SYS_5V0, so it is not added.
    (("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"), "sum of module rails"),
    # AGX Xavier: six separate supplies and no parent rail.
    (("GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"), "sum of module rails"),
)


def parse_line(line: str) -> TegrastatsSample:
    """Parse one tegrastats line into its timestamp (or None) and rail readings.

    Fields other than rails (RAM, CPU, temperatures, ...) are skipped. A line with no
    rail fields gives a sample with no rails.
    """
    timestamp = None
    match = _TIMESTAMP.match(line)
    if match:
        try:
            timestamp = dt.datetime.strptime(match.group(1), "%m-%d-%Y %H:%M:%S")
        except ValueError:
            timestamp = None
        line = line[match.end():]

    tokens = line.split()
    rails: dict[str, RailReading] = {}
    for name, value in zip(tokens, tokens[1:]):
        if not _RAIL_NAME.match(name):
            continue
        reading = _RAIL_VALUE.match(value)
        if reading is None:
            continue
        current, _, average, _, maximum, _ = reading.groups()
        rails[name] = RailReading(
            current_w=float(current) / 1000.0,
            average_w=float(average) / 1000.0,
            max_w=float(maximum) / 1000.0 if maximum is not None else None,
        )
    return TegrastatsSample(timestamp=timestamp, rails=rails)


def board_total(rails: dict[str, RailReading] | dict[str, float]) -> BoardTotal:
    """Return the board's total current power from the first rule whose rails are all present."""
    for names, scope in TOTAL_RULES:
        if all(name in rails for name in names):
            watts = 0.0
            for name in names:
                value = rails[name]
                watts += value.current_w if isinstance(value, RailReading) else float(value)
            return BoardTotal(watts=watts, rails=names, scope=scope)
    return BoardTotal(watts=None, rails=(), scope="unavailable")


class RailPowerMeter(SampledMeter):
    """A Jetson meter fed with per-rail power readings, integrating the board total.

    Shared by tegrastats and jetson-stats: both report the same rails, so the board
    total follows the same rules (`board_total`), and the latest rails are kept for
    `rail_power()`.
    """

    def __init__(self, update_interval_s: float, horizon_s: float = DEFAULT_HORIZON_S):
        super().__init__(update_interval_s=update_interval_s, horizon_s=horizon_s)
        self.scope = "unavailable"
        self._latest_rails: dict[str, float] = {}
        self._rails_lock = threading.Lock()

    def _add_reading(self, timestamp: float, rails: dict[str, float]) -> None:
        """Record one reading of every rail, in watts, taken at `timestamp` (monotonic)."""
        total = board_total(rails)
        if total.watts is not None:
            self.rails = total.rails
            self.scope = total.scope
        with self._rails_lock:
            self._latest_rails = rails
        self.trace.add(timestamp, total.watts)

    def _rails_seen(self) -> str:
        with self._rails_lock:
            return ", ".join(sorted(self._latest_rails)) or "none"

    def rail_power(self) -> dict[str, float] | None:
        with self._rails_lock:
            return dict(self._latest_rails)

    def describe(self) -> dict:
        description = super().describe()
        description["scope"] = self.scope
        return description


class TegrastatsMeter(RailPowerMeter):
    """Runs `tegrastats --interval MS` and integrates the board total over each window.

    The constructor waits for the first line and raises MeterUnavailable when tegrastats
    cannot run or its output has no known total rail. `command` replaces the tegrastats
    command line (its output must be tegrastats lines).
    """

    name = "tegrastats"

    def __init__(self, interval_ms: int = 100, command: Sequence[str] | None = None,
                 first_line_timeout_s: float | None = None, horizon_s: float = DEFAULT_HORIZON_S):
        if interval_ms < 1:
            raise ValueError(f"tegrastats interval must be >= 1 ms, got {interval_ms}")
        super().__init__(update_interval_s=interval_ms / 1000.0, horizon_s=horizon_s)
        self.command = list(command) if command is not None else ["tegrastats", "--interval", str(interval_ms)]
        self.lines_read = 0
        self.unparsed_lines = 0
        self._first_line = threading.Event()
        self._exit_lock = threading.Lock()
        self._exit_message: str | None = None

        try:
            self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL, text=True, bufsize=1)
        except FileNotFoundError:
            raise MeterUnavailable(f"{self.command[0]} not found: tegrastats ships only with Jetson Linux "
                                   "(L4T)") from None
        except PermissionError as exc:
            raise MeterUnavailable(f"cannot run {self.command[0]}: {exc}") from None

        self._thread = threading.Thread(target=self._read_lines, name="tegrastats-reader", daemon=True)
        self._thread.start()

        timeout = first_line_timeout_s if first_line_timeout_s is not None else max(3.0, 5 * self.update_interval_s)
        # The reader sets the event on the first line, or when the output ends first.
        self._first_line.wait(timeout)
        if self.lines_read == 0:
            try:
                self._process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            reason = self._exit_reason() or f"no output within {timeout:g} s"
            self.close()
            raise MeterUnavailable(f"tegrastats gave no reading: {reason}")
        if not self.rails:
            seen = self._rails_seen()
            self.close()
            raise MeterUnavailable(f"tegrastats output has no known total-power rail (rails seen: {seen}), "
                                   "so energy would be unknown")

    def _read_lines(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            now = time.monotonic()
            sample = parse_line(line)
            self.lines_read += 1
            if not sample.rails:
                self.unparsed_lines += 1
                if self.unparsed_lines in (1, 10, 100) or self.unparsed_lines % 1000 == 0:
                    log.warning("tegrastats line without power rails (%d so far): %.200s",
                                self.unparsed_lines, line.strip())
            self._add_reading(now, {name: reading.current_w for name, reading in sample.rails.items()})
            self._first_line.set()
        self._first_line.set()
        if not self._stop_event.is_set():
            try:
                self._process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            reason = self._exit_reason() or "end of output"
            self.unavailable_note = f"tegrastats exited ({reason})"
            log.error("tegrastats exited (%s), so energy is unknown from now on", reason)

    def _exit_reason(self) -> str | None:
        """Return the exit status and the start of stderr once tegrastats has exited."""
        with self._exit_lock:
            if self._exit_message is not None:
                return self._exit_message
            code = self._process.poll()
            if code is None:
                return None
            stderr = ""
            if self._process.stderr is not None:
                try:
                    stderr = self._process.stderr.read(2000).strip()
                except (OSError, ValueError):
                    stderr = ""
            self._exit_message = f"exit status {code}" + (f": {stderr}" if stderr else "")
            return self._exit_message

    def close(self) -> None:
        self._stop_event.set()
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=2.0)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        for stream in (getattr(process, "stdout", None), getattr(process, "stderr", None)):
            if stream is not None:
                stream.close()
