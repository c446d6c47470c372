"""`moe2 energy-log`: write timestamped power and cumulative energy rows from a meter.

Meant for long runs and for the systemd energy-logging service: every row is flushed
as it is written, an existing output file is appended to, and SIGTERM or SIGINT ends
the run after a last row. Each row covers the window since the previous row:

    timestamp          UTC end of the window, ISO 8601
    elapsed_s          seconds since the log started
    interval_s         window length in seconds
    watts              mean power over the window (joules / interval_s), or empty
    joules             energy of the window, or empty when the meter could not tell
    cumulative_joules  sum of the known window energies so far, or empty until the
                       first window with known energy (unknown energy is never 0)
    unknown_s          total seconds whose energy was unknown so far
    meter, method      the meter's name and how it got joules (counter, integrated, ...)
    rails              rails the total covers, separated by ';', or empty when none
    below_resolution   window shorter than the meter's update interval
    rail_watts         the latest power in watts of every rail the meter reads, as a
                       JSON object (a JSON-encoded string in CSV), or empty when the
                       meter reads no rails

Empty values are null in JSONL. CSV rows also carry the rails of the first row as
`rail_NAME_w` columns after `rail_watts`; a rail that appears later is only in
`rail_watts`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from agent.energy import METER_NAMES, MeterUnavailable, create_meter

HELP = "log power and energy from a meter to CSV or JSONL"

log = logging.getLogger("moe2.energy_log")

BASE_COLUMNS = ["timestamp", "elapsed_s", "interval_s", "watts", "joules", "cumulative_joules",
                "unknown_s", "meter", "method", "rails", "below_resolution"]
RAIL_WATTS_COLUMN = "rail_watts"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meter", choices=METER_NAMES, default="auto",
                        help="energy meter (default: auto, the first of jtop, tegrastats, nvml, rapl that reads)")
    parser.add_argument("--interval", type=int, default=1000, metavar="MS",
                        help="milliseconds between rows, also the sampling interval of tegrastats, jtop "
                             "and NVML power (default: 1000)")
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                        help="output format (default: csv). Both have the columns timestamp, elapsed_s, "
                             "interval_s, watts, joules, cumulative_joules, unknown_s, meter, method, rails, "
                             "below_resolution and rail_watts (watts per rail, a JSON object; in CSV a "
                             "JSON-encoded string). CSV adds a rail_NAME_w column for each rail of the first "
                             "row. Unknown values are null in JSONL and empty in CSV")
    parser.add_argument("--output", type=Path, help="file to append rows to (default: standard output)")
    parser.add_argument("--duration", type=float, metavar="S",
                        help="stop after this many seconds (default: run until SIGTERM or SIGINT)")
    parser.add_argument("--watts-per-core", type=float,
                        help="with --meter estimate: the user's figure for one busy CPU core, in watts")
    parser.add_argument("--device-index", type=int, help="with --meter nvml: GPU index (default: 0)")


class RowWriter:
    """Writes rows as CSV or JSONL and flushes after each one."""

    def __init__(self, stream: IO[str], fmt: str, write_header: bool):
        self.stream = stream
        self.format = fmt
        self.write_header = write_header
        self.rail_columns: list[str] | None = None
        self._csv: Any = None

    def write(self, row: dict[str, Any], rail_watts: dict[str, float] | None) -> None:
        if self.format == "jsonl":
            self.stream.write(json.dumps({**row, "rail_watts": rail_watts}) + "\n")
        else:
            if self._csv is None:
                self.rail_columns = sorted(rail_watts or {})
                self._csv = csv.writer(self.stream)
                if self.write_header:
                    self._csv.writerow(BASE_COLUMNS + [RAIL_WATTS_COLUMN]
                                       + [f"rail_{name}_w" for name in self.rail_columns])
            values = ["" if row[column] is None else row[column] for column in BASE_COLUMNS]
            values.append(json.dumps(rail_watts, sort_keys=True) if rail_watts else "")
            rails = rail_watts or {}
            values += [_format_number(rails.get(name)) for name in self.rail_columns or []]
            self._csv.writerow(values)
        self.stream.flush()


def _format_number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _open_output(path: Path | None) -> tuple[IO[str], bool]:
    """Return the stream and whether it is empty (so a CSV header belongs at its top)."""
    # NOTE: rows appended to an existing CSV follow this run's columns, which differ
    # from the file's header when the first row's rails differ or the file predates
    # the rail_watts column.
    if path is None:
        return sys.stdout, True
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = not path.exists() or path.stat().st_size == 0
    return path.open("a", encoding="utf-8", newline=""), empty


def run_log(meter: Any, writer: RowWriter, interval_s: float, duration_s: float | None,
            stop_event: threading.Event) -> dict[str, float]:
    """Write one row per interval until `stop_event` is set or `duration_s` has passed."""
    started = time.monotonic()
    cumulative: float | None = None     # None until a window's energy is known
    unknown_s = 0.0
    rows = 0
    mark = meter.start()
    next_row = started + interval_s
    while True:
        deadline = next_row if duration_s is None else min(next_row, started + duration_s)
        stop_event.wait(max(0.0, deadline - time.monotonic()))
        record, mark = meter.split(mark)
        now = time.monotonic()
        if record.joules is None:
            unknown_s += record.seconds
        else:
            cumulative = (cumulative or 0.0) + record.joules
        row = {
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "elapsed_s": round(now - started, 6),
            "interval_s": round(record.seconds, 6),
            "watts": (round(record.joules / record.seconds, 6)
                      if record.joules is not None and record.seconds > 0 else None),
            "joules": None if record.joules is None else round(record.joules, 6),
            "cumulative_joules": None if cumulative is None else round(cumulative, 6),
            "unknown_s": round(unknown_s, 6),
            "meter": record.meter,
            "method": record.method,
            "rails": ";".join(record.rails) or None,
            "below_resolution": record.below_resolution,
        }
        writer.write(row, meter.rail_power())
        rows += 1
        if record.note and rows == 1:
            log.warning("first row has no energy: %s", record.note)
        if stop_event.is_set() or (duration_s is not None and now - started >= duration_s):
            break
        # Skip rows missed while the process was suspended, instead of writing a burst.
        next_row += interval_s * max(1, math.ceil((now - next_row) / interval_s))
    return {"rows": rows, "cumulative_joules": cumulative, "unknown_s": unknown_s,
            "seconds": time.monotonic() - started}


def describe_summary(summary: dict[str, Any]) -> str:
    """Return the closing log line's figures: rows, joules (or unknown), seconds."""
    rows = summary["rows"]
    joules = summary["cumulative_joules"]
    energy = "energy unknown" if joules is None else f"{joules:.3f} J"
    return (f"{rows} row{'' if rows == 1 else 's'}, {energy} over {summary['seconds']:.1f} s, "
            f"{summary['unknown_s']:.1f} s with unknown energy")


def run(args: argparse.Namespace) -> int:
    if args.interval < 1:
        log.error("--interval %d is invalid: give milliseconds >= 1", args.interval)
        return 2
    if args.duration is not None and not (args.duration > 0 and math.isfinite(args.duration)):
        log.error("--duration %s is invalid: give seconds > 0", args.duration)
        return 2
    options: dict[str, Any] = {}
    if args.meter in ("auto", "tegrastats", "jtop", "nvml"):
        options["interval_ms"] = args.interval
    if args.meter in ("auto", "nvml") and args.device_index is not None:
        options["device_index"] = args.device_index
    if args.meter == "estimate":
        if args.watts_per_core is None:
            log.error("--meter estimate needs --watts-per-core: the watts of one busy CPU core, for example 4.5")
            return 2
        options["watts_per_core"] = args.watts_per_core
    try:
        meter = create_meter(args.meter, **options)
    except MeterUnavailable as exc:
        log.error("energy meter %s is unavailable: %s. Choose another with --meter "
                  "(auto falls back to none)", args.meter, exc)
        return 1
    except ValueError as exc:
        log.error("invalid option for --meter %s: %s", args.meter, exc)
        return 2

    stop_event = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        log.info("received %s, writing the last row", signal.Signals(signum).name)
        stop_event.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stream, empty = _open_output(args.output)
    except OSError as exc:
        log.error("cannot open output %s: %s", args.output, exc)
        meter.close()
        return 1
    try:
        log.info("energy log started: meter %s (%s), every %d ms, to %s", meter.name, meter.method,
                 args.interval, args.output or "standard output")
        summary = run_log(meter, RowWriter(stream, args.format, write_header=empty),
                          args.interval / 1000.0, args.duration, stop_event)
        log.info("energy log stopped: %s", describe_summary(summary))
    except BrokenPipeError:
        log.info("energy log stopped: the output pipe closed")
    finally:
        meter.close()
        if stream is not sys.stdout:
            stream.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
