"""`moe2 select`: choose the expert subset S under delay and energy budgets.

Inputs are a score table (NPZ written by `moe2 score`), gate values for its examples
(NPY [n_examples, N], or uniform), a profile (JSON written by `moe2 profile`) and an
applications file (TOML):

    [[applications]]
    name = "chat"
    prompt_lengths = [120, 340, 800]     # tokens of sample prompts, equally likely
    # prompt_length_weights = [0.5, 0.3, 0.2]
    # or: prompt_length_distribution = { kind = "lognormal", median = 300, sigma = 0.8, max = 4096 }
    #     (kinds: uniform with min/max, normal with mean/std, lognormal with median/sigma)
    output_tokens = 128
    t_max = 2.0                          # seconds, budget on the expected delay

SMO finds S; `--exact` searches all subsets instead. The result goes into the
coordinator configuration's `selection.subset`, or is printed with `--dry-run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import tempfile
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.costmodel import STATISTICS, CostModel, load_profile, parse_applications
from coordinator.losstable import LossTable, load_gates, load_score_table
from coordinator.smo import SearchResult, exhaustive, mask_members, smo

HELP = "choose the expert subset S under delay and energy budgets (SMO)"

log = logging.getLogger("moe2.select")

# Exhaustive search above this many experts is refused: 2^30 subsets do not fit a run.
EXACT_MAX_EXPERTS = 30
DEFAULT_GAP_MAX_EXPERTS = 12


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, type=Path, help="score table NPZ written by `moe2 score`")
    parser.add_argument("--gates", type=Path,
                        help="gate values, an NPY array [n_examples, N] of softmax outputs (default: uniform)")
    parser.add_argument("--profile", required=True, type=Path, help="profile JSON written by `moe2 profile`")
    parser.add_argument("--applications", required=True, type=Path,
                        help="TOML file with one [[applications]] table per application, with the keys: name; "
                             "prompt_lengths (a list of prompt lengths in tokens) and optionally "
                             "prompt_length_weights (one weight per length, default equal), or instead "
                             "prompt_length_distribution (a table: kind = \"uniform\" with min and max, "
                             "\"normal\" with mean and std, or \"lognormal\" with median and sigma, in tokens, "
                             "optionally min and max); output_tokens (tokens generated per request); and "
                             "t_max (budget on the expected delay per request, in seconds)")
    parser.add_argument("--energy-max", type=float, metavar="JOULES",
                        help="energy budget per request in joules (default: no energy budget)")
    parser.add_argument("--k", type=int, help="top-k experts of S used per prompt, as at inference "
                        "(default: selection.top_k of --config when set there, else all of S)")
    parser.add_argument("--epsilon", type=float, default=0.0,
                        help="loss tolerance in nats per example: S is within epsilon of the optimum (default: 0)")
    parser.add_argument("--exact", action="store_true",
                        help=f"search all 2^N - 1 subsets instead of SMO (N <= {EXACT_MAX_EXPERTS}; slow above about 20)")
    parser.add_argument("--gap-max-experts", type=int, default=DEFAULT_GAP_MAX_EXPERTS,
                        help="also run exhaustive search to report SMO's optimality gap when N is at most this "
                             f"(default: {DEFAULT_GAP_MAX_EXPERTS}; 0 turns it off)")
    parser.add_argument("--max-expansions", type=int,
                        help="stop SMO after branching this many sets and report the best subset found so far")
    parser.add_argument("--statistic", choices=STATISTICS, default="median",
                        help="profile statistic for delay and energy (default: median)")
    parser.add_argument("--gate-seconds", type=float,
                        help="gate time added to every request's delay (default: the profile's gate time, or 0)")
    parser.add_argument("--config", type=Path,
                        help="coordinator configuration TOML to write S into. Only the subset entry of its "
                             "[selection] table is rewritten (added when missing), and selection.top_k is "
                             "lowered when it exceeds the size of S. Other lines and comments stay as they are, "
                             "and so does a comment after the old subset value, but comments inside a "
                             "multi-line subset value are dropped. Also read for selection.top_k when --k is "
                             "not given")
    parser.add_argument("--dry-run", action="store_true", help="print S without writing the configuration")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


@dataclass
class Selection:
    """A finished selection: the chosen subset and the search that found it."""

    experts: tuple[str, ...]
    method: str
    result: SearchResult
    seconds: float
    top_k: int | None
    epsilon: float
    exact: SearchResult | None = None
    gap: float | None = None

    @property
    def subset(self) -> tuple[str, ...] | None:
        if self.result.subset is None:
            return None
        return tuple(self.experts[i] for i in mask_members(self.result.subset))

    def to_json(self) -> dict[str, Any]:
        result = self.result
        report: dict[str, Any] = {
            "feasible": result.feasible,
            "subset": list(self.subset) if self.subset else None,
            "loss": result.loss,
            "constraints": result.constraint_values,
            "method": self.method,
            "top_k": self.top_k,
            "epsilon": self.epsilon,
            "loss_evaluations": result.loss_evaluations,
            "sets_branched": result.vertices_expanded,
            "monotonicity_violations": result.monotonicity_violations if self.method == "smo" else None,
            "complete": result.complete,
            "seconds": self.seconds,
            "excluded_experts": [self.experts[i] for i in result.excluded_experts],
            "optimality_gap": self.gap,
        }
        if self.exact is not None and self.exact.subset is not None:
            report["exact_subset"] = [self.experts[i] for i in mask_members(self.exact.subset)]
            report["exact_loss"] = self.exact.loss
            report["exact_loss_evaluations"] = self.exact.loss_evaluations
        if result.infeasibility is not None:
            info = result.infeasibility
            report["tightest_constraint"] = {"name": info.constraint, "expert": self.experts[info.expert],
                                             "value": info.value, "budget": info.budget, "unit": info.unit}
        return report


def choose_subset(losses: LossTable, costs: CostModel, energy_max: float | None, epsilon: float = 0.0,
                  exact: bool = False, gap_max_experts: int = DEFAULT_GAP_MAX_EXPERTS,
                  max_expansions: int | None = None) -> Selection:
    """Run SMO (or exhaustive search) and, for small N, the exhaustive reference for the gap."""
    n_experts = losses.n_experts
    constraints = costs.constraints(energy_max)
    started = time.perf_counter()
    if exact:
        if n_experts > EXACT_MAX_EXPERTS:
            raise ValueError(f"--exact needs 2^{n_experts} subsets; use SMO for more than {EXACT_MAX_EXPERTS} experts")
        result = exhaustive(n_experts, losses.loss, constraints, batch_loss=losses.losses)
        return Selection(costs.experts, "exhaustive", result, time.perf_counter() - started, losses.top_k, epsilon)

    result = smo(n_experts, losses.loss, constraints, epsilon=epsilon, max_expansions=max_expansions)
    seconds = time.perf_counter() - started
    selection = Selection(costs.experts, "smo", result, seconds, losses.top_k, epsilon)
    if n_experts <= min(gap_max_experts, EXACT_MAX_EXPERTS):
        reference = exhaustive(n_experts, losses.loss, constraints, batch_loss=losses.losses)
        selection.exact = reference
        if result.loss is not None and reference.loss is not None:
            selection.gap = result.loss - reference.loss
    return selection


def _format_report(selection: Selection) -> str:
    result = selection.result
    lines = []
    if not result.feasible:
        if result.infeasibility is not None:
            info = result.infeasibility
            lines.append(f"infeasible: no subset meets the budgets. Tightest constraint: {info.constraint} is "
                         f"{info.value:.4g} {info.unit} even for {selection.experts[info.expert]} alone, "
                         f"above its budget {info.budget:.4g} {info.unit}; raise that budget or profile faster experts")
        else:
            lines.append(f"no feasible subset found within --max-expansions ({result.vertices_expanded} sets branched)")
        return "\n".join(lines)

    subset = selection.subset or ()
    lines.append(f"S = {', '.join(subset)} ({len(subset)} of {len(selection.experts)} experts)")
    lines.append(f"predicted loss: {result.loss:.6f} nats per example"
                 + (f" with top-{selection.top_k} of S per prompt" if selection.top_k else ""))
    for name, value in result.constraint_values.items():
        unit = "s" if name.startswith("delay") else "J"
        lines.append(f"  {name}: {value:.4g} {unit}")
    search = (f"search: {selection.method}, {result.loss_evaluations} loss evaluations, "
              f"{selection.seconds:.3f} s")
    if selection.method == "smo":
        search += (f", {result.vertices_expanded} sets branched, "
                   f"{result.monotonicity_violations} monotonicity violations met, epsilon {selection.epsilon:g}")
    lines.append(search)
    if result.excluded_experts:
        names = ", ".join(selection.experts[i] for i in result.excluded_experts)
        lines.append(f"excluded (miss a budget on their own): {names}")
    if not result.complete:
        lines.append(f"incomplete: stopped by --max-expansions; the optimum is at least {result.lower_bound:.6f}")
    if selection.gap is not None and selection.exact is not None:
        lines.append(f"optimality gap against exhaustive search: {selection.gap:.6g} nats per example "
                     f"(exhaustive: {selection.exact.loss_evaluations} loss evaluations)")
    return "\n".join(lines)


def _array_end(lines: list[str], start: int) -> tuple[int, int]:
    """Return the line index and the column just after the `]` that closes the value
    starting on `lines[start]`."""
    depth = 0
    quote = None
    for index in range(start, len(lines)):
        line = lines[index]
        offset = line.index("=") + 1 if index == start else 0
        column = len(line)
        for column in range(offset, len(line)):
            char = line[column]
            if quote:
                if char == quote:
                    quote = None
            elif char in "\"'":
                quote = char
            elif char == "#":
                break
            elif char == "[":
                depth += 1
            elif char == "]":
                depth -= 1
                if depth == 0:
                    return index, column + 1
        if depth <= 0:
            return index, column
    raise ValueError("unterminated array")


def set_subset_text(text: str, subset: tuple[str, ...]) -> str:
    """Return the TOML text with `selection.subset` set to `subset`, keeping the rest.

    The old `subset` value is replaced by one line, which keeps the comment after the
    value's closing bracket. Comments inside a multi-line old value are dropped. An
    explicit `selection.top_k` larger than the new subset is lowered to its size.
    """
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    value = "subset = [" + ", ".join(json.dumps(name) for name in subset) + "]\n"
    header = re.compile(r"^\s*\[\s*selection\s*\]\s*(#.*)?$")
    any_header = re.compile(r"^\s*\[")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return "".join(lines) + ("\n" if lines else "") + "[selection]\n" + value
    end = next((i for i in range(start + 1, len(lines)) if any_header.match(lines[i])), len(lines))
    for index in range(start + 1, end):
        if re.match(r"^\s*subset\s*=", lines[index]):
            last, column = _array_end(lines, index)
            comment = lines[last][column:].strip()
            line = value if not comment.startswith("#") else f"{value.rstrip()}  {comment}\n"
            lines[index:last + 1] = [line]
            break
    else:
        lines.insert(start + 1, value)
        end += 1
    for index in range(start + 1, len(lines)):
        if any_header.match(lines[index]):
            break
        match = re.match(r"^(\s*top_k\s*=\s*)(\d+)(.*)$", lines[index], re.DOTALL)
        if match and int(match.group(2)) > len(subset):
            log.warning("lowering selection.top_k from %s to %d, the size of the new subset",
                        match.group(2), len(subset))
            lines[index] = f"{match.group(1)}{len(subset)}{match.group(3)}"
    return "".join(lines)


def write_subset(path: Path, subset: tuple[str, ...]) -> None:
    """Write `subset` into the configuration file after checking the result parses and
    validates; the file is replaced atomically."""
    from coordinator.config import parse_config

    text = path.read_text()
    updated = set_subset_text(text, subset)
    data = tomllib.loads(updated)
    parse_config(data, base_dir=path.parent, source=path)
    mode = path.stat().st_mode & 0o777
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(updated)
    os.chmod(tmp.name, mode)
    os.replace(tmp.name, path)


def _configured_top_k(path: Path | None) -> int | None:
    if path is None:
        return None
    with path.open("rb") as file:
        data = tomllib.load(file)
    top_k = (data.get("selection") or {}).get("top_k")
    return top_k if isinstance(top_k, int) else None


def run(args: argparse.Namespace) -> int:
    if not args.dry_run and args.config is None:
        log.error("give --config FILE to write S into the coordinator configuration, or --dry-run to print it")
        return 2
    if args.epsilon < 0 or not math.isfinite(args.epsilon):
        log.error("--epsilon %s is invalid: give a loss tolerance >= 0", args.epsilon)
        return 2
    if args.energy_max is not None and not (args.energy_max > 0 and math.isfinite(args.energy_max)):
        log.error("--energy-max %s is invalid: give joules per request > 0", args.energy_max)
        return 2
    try:
        table = load_score_table(args.scores)
        gates = load_gates(args.gates, table.n_examples, table.n_experts) if args.gates else None
        top_k = args.k if args.k is not None else _configured_top_k(args.config)
        if top_k is not None and top_k >= table.n_experts:
            top_k = None
        losses = LossTable(table, gates, top_k=top_k)
        profile = load_profile(args.profile, args.statistic)
        with args.applications.open("rb") as file:
            applications = parse_applications(tomllib.load(file), str(args.applications))
        costs = CostModel(profile, table.experts, applications, top_k=top_k, gate_seconds=args.gate_seconds)
        selection = choose_subset(losses, costs, args.energy_max, epsilon=args.epsilon, exact=args.exact,
                                  gap_max_experts=args.gap_max_experts, max_expansions=args.max_expansions)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        log.error("%s", exc)
        return 2

    if args.json:
        print(json.dumps(selection.to_json()))
    else:
        print(_format_report(selection))
    if selection.subset is None:
        return 1
    if args.dry_run:
        return 0
    try:
        write_subset(args.config, selection.subset)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        log.error("could not write selection.subset into %s: %s", args.config, exc)
        return 2
    log.info("wrote selection.subset = %s into %s", list(selection.subset), args.config)
    return 0

