"""`moe2 demo`: local demo agents and a coordinator answer one prompt, then shut down.

Every demo expert is the demo GGUF (Gemma 3 270M Q4_K_M) with its own domain prompt.
The domain prompts are `models/demo/prompts/*.txt` when the offline pipeline
(`moe2 cluster`) has written them, otherwise a few short built-in ones. The agents run
as `moe2-agent` processes on 127.0.0.1 with free ports. The trained gate
`models/demo/gate.onnx` is used when it and the exported embedder
(`models/cache/embedder/`) exist and the gate was trained on these experts. Otherwise the gate
values are uniform, and the demo prints why.

The demo prints its own progress lines on stderr, so it shows the coordinator's and
the agents' log records only from WARNING up, unless `moe2 --log-level DEBUG` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

import models
from coordinator.cmd_generate import format_summary
from coordinator.config import EMBEDDER_ONNX, EMBEDDER_TOKENIZER, Config, ConfigError, parse_config
from coordinator.embedding import EmbedderError
from coordinator.gating import Gate, GateError
from coordinator.generate import Coordinator, GenerationError
from coordinator.local_agents import AgentSpec, AgentStartError, LocalAgents
from coordinator.result import GenerationResult
from models.fetch import ModelError, cache_dir, model_path

HELP = "start local demo agents and a coordinator, answer a sample prompt"

log = logging.getLogger("moe2.coordinator.demo")

DEMO_DIR = Path(models.__file__).parent / "demo"
SAMPLE_PROMPT = "Question: Why does ice float on water?\nAnswer:"

# Few-shot domain prompts for when the pipeline has not written any. The demo model is
# a base model without a chat template, so prompts are plain question-answer text.
BUILTIN_DOMAIN_PROMPTS = {
    "science": ("The following are questions and answers about physics, chemistry and biology.\n\n"
                "Question: What gas do plants take from the air to make sugar?\nAnswer: Carbon dioxide.\n\n"
                "Question: What is the boiling point of water at sea level?\nAnswer: 100 degrees Celsius.\n\n"),
    "history": ("The following are questions and answers about world history.\n\n"
                "Question: In which year did the Second World War end?\nAnswer: 1945.\n\n"
                "Question: Which empire built the Colosseum?\nAnswer: The Roman Empire.\n\n"),
    "law": ("The following are questions and answers about law and government.\n\n"
            "Question: What is the highest court of the United States?\nAnswer: The Supreme Court.\n\n"
            "Question: What is a contract?\nAnswer: A legally binding agreement between parties.\n\n"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=SAMPLE_PROMPT, help="prompt to answer (default: a sample question)")
    parser.add_argument("--experts", type=int, default=None,
                        help="number of demo experts (default: one per domain prompt)")
    parser.add_argument("--top-k", type=int, default=2, help="experts fused per prompt (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=48, help="maximum generated tokens (default: 48)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--format", choices=("sparse", "dense_prob", "dense"), default="sparse",
                        help="distribution format sent by the agents (default: sparse top-256)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("moe2").setLevel(logging.WARNING)
    try:
        model = model_path("demo")
    except ModelError as exc:
        print(f"moe2 demo: {exc}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="moe2-demo-") as folder:
        prompts = domain_prompt_files(Path(folder), args.experts)
        if prompts is None:
            print(f"moe2 demo: --experts must be between 1 and {len(available_domain_prompts())}, got {args.experts}",
                  file=sys.stderr)
            return 2
        specs = [AgentSpec(name, model, domain_prompt=path) for name, path in prompts.items()]
        _say(f"starting {len(specs)} demo agents ({model.name} with domain prompts: {', '.join(prompts)}) on 127.0.0.1")
        try:
            with LocalAgents(specs, log_level="WARNING") as agents:
                for agent in agents.agents:
                    _say(f"  {agent.name}: {agent.endpoint} (pid {agent.process.pid})")
                config = demo_config({agent.name: agent.endpoint for agent in agents.agents}, args)
                gate = load_demo_gate(list(config.subset))
                result = asyncio.run(_answer(config, gate, args))
        except (AgentStartError, ConfigError, GenerationError) as exc:
            print(f"moe2 demo: {exc}", file=sys.stderr)
            return 1
        _say("agents stopped")

    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(format_summary(result))
    return 0


def available_domain_prompts() -> dict[str, Path | str]:
    """Return the pipeline's domain prompt files by expert name, or the built-in texts."""
    files = sorted((DEMO_DIR / "prompts").glob("*.txt"))
    if files:
        return {path.stem: path for path in files}
    return dict(BUILTIN_DOMAIN_PROMPTS)


def domain_prompt_files(folder: Path, count: int | None) -> dict[str, Path] | None:
    """Return a domain prompt file per demo expert, writing built-in texts into `folder`.

    Returns None when `count` is outside 1..number of available prompts.
    """
    prompts = available_domain_prompts()
    count = len(prompts) if count is None else count
    if not 1 <= count <= len(prompts):
        return None
    files = {}
    for name, source in list(prompts.items())[:count]:
        if isinstance(source, Path):
            files[name] = source
        else:
            path = folder / f"{name}.txt"
            path.write_text(source, encoding="utf-8")
            files[name] = path
    return files


def demo_config(endpoints: dict[str, str], args: argparse.Namespace) -> Config:
    data = {
        "experts": [{"name": name, "endpoint": endpoint} for name, endpoint in endpoints.items()],
        "selection": {"top_k": min(args.top_k, len(endpoints))},
        "distribution": {"format": args.format},
        "sampling": {"temperature": args.temperature, "max_tokens": args.max_tokens, "stop": ["\n\n", "\nQuestion:"]},
        # Several agents share the CPU cores here, so deadlines are generous.
        "timeouts": {"handshake_s": 30.0, "open_s": 120.0, "step_deadline_s": 10.0, "step_s": 60.0},
    }
    if args.seed is not None:
        data["sampling"]["seed"] = args.seed
    return parse_config(data)


def load_demo_gate(names: list[str]) -> Gate | None:
    """Return the trained demo gate for `names`, or None (uniform) with the reason printed."""
    gate_path = DEMO_DIR / "gate.onnx"
    embedder = cache_dir() / "embedder"
    if not gate_path.is_file():
        _say(f"gate: uniform weights, because no trained gate exists at {gate_path} (train one with `moe2 train-gate`)")
        return None
    if not (embedder / EMBEDDER_ONNX).is_file():
        _say(f"gate: uniform weights, because the embedder is missing at {embedder} (create it with `moe2 export-embedder`)")
        return None
    try:
        gate = Gate.load(gate_path, embedder_onnx=embedder / EMBEDDER_ONNX, tokenizer=embedder / EMBEDDER_TOKENIZER)
        gate = gate.for_experts(names)
    except (GateError, EmbedderError) as exc:
        _say(f"gate: uniform weights, because the trained gate cannot be used: {exc}")
        return None
    _say(f"gate: trained gate {gate_path}")
    return gate


async def _answer(config: Config, gate: Gate | None, args: argparse.Namespace) -> GenerationResult:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    async with Coordinator(config, gate) as coordinator:
        if not args.json:
            sys.stdout.write(f"\n{args.prompt}")
        result = await coordinator.generate(args.prompt, on_text=None if args.json else write)
        if not args.json:
            sys.stdout.write("\n\n")
        return result


def _say(message: str) -> None:
    """Print a progress line to stderr, so --json output on stdout stays one object."""
    print(message, file=sys.stderr, flush=True)
