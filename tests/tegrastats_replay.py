"""Replay recorded tegrastats lines like `tegrastats --interval MS` prints them.

Usage: python tests/tegrastats_replay.py FILE INTERVAL_MS [COUNT]

Prints the file's lines in a loop, one every INTERVAL_MS, flushing each. With COUNT it
exits with status 0 after COUNT lines, and without it runs until terminated.
"""

import sys
import time


def main() -> int:
    path, interval_ms = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else None
    with open(path) as file:
        lines = [line.rstrip("\n") for line in file if line.strip()]
    printed = 0
    while count is None or printed < count:
        print(lines[printed % len(lines)], flush=True)
        printed += 1
        time.sleep(interval_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
