"""The `moe2` command line.

Each subcommand lives in its own module, which defines:

    HELP: str                                   one-line description
    def configure(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int    exit status

Modules are imported only when their command runs, so `moe2 generate` never imports
the training code (and never PyTorch).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> (module, one-line help shown before the module is imported)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("coordinator.cmd_generate", "generate an answer with the selected experts, streaming it"),
    "experts": ("coordinator.cmd_experts", "list the configured agents with their info and health"),
    "demo": ("coordinator.demo", "start local demo agents and a coordinator, answer a sample prompt"),
    "export-embedder": ("coordinator.embedder_export", "export a sentence-embedding model to ONNX"),
    "cluster": ("coordinator.cluster", "cluster a prompt corpus into domains, one per expert"),
    "score": ("coordinator.scoring", "cache teacher-forced target log-probabilities of every expert"),
    "train-gate": ("coordinator.train_gate", "train the gating network and export it to ONNX"),
    "energy-log": ("coordinator.energy_log", "log power and energy from a meter to CSV or JSONL"),
    "profile": ("coordinator.profile", "measure delay and energy profiles of every expert"),
    "select": ("coordinator.select", "choose the expert subset S under delay and energy budgets (SMO)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="moe2", description="MoE²: Mixture-of-Edge-Experts coordinator.")
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    # Import only the module of the command being run; list the others by help text.
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.configure(sub)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
