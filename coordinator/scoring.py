"""`moe2 score`: teacher-forced target log-probabilities of every expert, cached on disk.

For every expert (an agent) and every (prompt, target) pair of a data set, the agents'
`score` operation returns log p(y_t | prompt, y_<t) for each target token. Multiple-choice
examples also get the log-probability of every answer letter. When every letter is a
single token, one `open` with a dense distribution at the answer position gives all of
them at once. Otherwise each letter is scored separately.

Targets are tokenized here with the experts' tokenizer, loaded vocabulary-only from a
GGUF file, and the agents' tokenizer fingerprints must match it. A target's tokens are
those that tokenizing prompt + target adds after the prompt's tokens, which is how the
model sees the target after the prompt.

Cache: one JSON-lines file per (data set hash, expert fingerprint) under the cache
folder, one line per finished example, flushed as it is written. A rerun scores only
the examples missing from the file, so an interrupted run resumes where it stopped. A
different model file, LoRA adapter or domain prompt changes the fingerprint, and with
it the file, so stale entries are never used. Agents are scored in parallel, one
thread and one connection each, with a progress bar per expert.

Known limits: an example that an agent rejects for a reason that a retry cannot fix
(such as a prompt longer than its context) is recorded as failed in the cache and
left out of the score table for all experts, with a warning that counts them.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from coordinator.datasets import LETTERS, DatasetError, Example, PromptFormat, dataset_hash, load_dataset
from coordinator.identity import IdentityError, expert_fingerprint
from coordinator.scoretable import ScoreTable, save_score_table

log = logging.getLogger("moe2.scoring")

HELP = "score every expert on a data set: teacher-forced target log-probabilities, cached and resumable"

CACHE_FORMAT = "moe2-score-cache/1"
# Error codes for which a retry gives the same answer: the example is recorded as failed.
PERMANENT_ERRORS = ("context_overflow", "bad_request", "token_out_of_range")


class ScoringError(RuntimeError):
    """Scoring cannot start or finish; the message names the expert or file."""


@dataclass
class Expert:
    name: str
    endpoint: str
    fingerprint: str = ""
    tokenizer_fingerprint: str = ""


# --- tokenization of targets ---------------------------------------------------------------------

class LocalTokenizer:
    """The experts' tokenizer, loaded vocabulary-only from a GGUF file with llama.cpp."""

    def __init__(self, gguf_path: Path):
        import llama_cpp

        from agent.vocabulary import Vocabulary

        if not Path(gguf_path).is_file():
            raise ScoringError(f"tokenizer model {gguf_path} not found; pass --tokenizer-model with the experts' GGUF file")
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode("utf-8"), params)
        if not self._model:
            raise ScoringError(f"llama.cpp could not load the vocabulary of {gguf_path}")
        self.vocabulary = Vocabulary(llama_cpp.llama_model_get_vocab(self._model))
        self.fingerprint = self.vocabulary.fingerprint

    def close(self) -> None:
        import llama_cpp
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def continuation(self, prompt: str, target: str) -> list[int]:
        """Return the token ids that `target` adds after `prompt`."""
        prompt_ids = self.vocabulary.tokenize(prompt, add_special=False).tolist()
        full = self.vocabulary.tokenize(prompt + target, add_special=False).tolist()
        if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full[len(prompt_ids):]
        # The target merged with the prompt's last token: tokenize it alone instead.
        return self.vocabulary.tokenize(target, add_special=False).tolist()


@dataclass
class Job:
    """One example with its target tokens (and choice tokens) to score on every expert."""

    example: Example
    target_ids: list[int]
    choice_ids: list[list[int]] = field(default_factory=list)   # per choice, for multiple choice

    @property
    def single_token_choices(self) -> bool:
        return bool(self.choice_ids) and all(len(ids) == 1 for ids in self.choice_ids)


def make_jobs(examples: list[Example], tokenizer: LocalTokenizer) -> list[Job]:
    jobs = []
    for e in examples:
        if e.is_multiple_choice:
            choice_ids = [tokenizer.continuation(e.prompt, f" {LETTERS[c]}") for c in range(len(e.choices))]
            jobs.append(Job(e, choice_ids[e.answer], choice_ids))
        else:
            jobs.append(Job(e, tokenizer.continuation(e.prompt, e.target)))
    return jobs


# --- the cache -----------------------------------------------------------------------------------

class ScoreCache:
    """Finished examples of one expert on one data set, in a JSON-lines file."""

    def __init__(self, root: Path, data_hash: str, expert: Expert):
        self.path = root / data_hash[:16] / f"{expert.fingerprint[:16]}.jsonl"
        self.header = {"format": CACHE_FORMAT, "dataset_hash": data_hash, "fingerprint": expert.fingerprint,
                       "expert": expert.name}
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if not lines:
            return
        header = json.loads(lines[0])
        if any(header.get(k) != v for k, v in self.header.items() if k != "expert"):
            raise ScoringError(f"{self.path} belongs to another data set or expert ({header}); move it away")
        dropped = 0
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A line cut short when a run was killed while writing it.
                dropped += 1
                continue
            self.records[record["id"]] = record
        if dropped:
            log.warning("%s: ignored %d unreadable lines (an interrupted write); those examples are scored again",
                        self.path, dropped)
        # Rewrite without the broken lines, so later appends start on a fresh line.
        if dropped or not text.endswith("\n"):
            self._rewrite()

    def _rewrite(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.header) + "\n")
            for record in self.records.values():
                f.write(json.dumps(record) + "\n")
        partial.replace(self.path)

    def add(self, record: dict) -> None:
        with self._lock:
            if not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "w", encoding="utf-8") as f:
                    f.write(json.dumps(self.header) + "\n")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
            self.records[record["id"]] = record


# --- scoring one expert ----------------------------------------------------------------------------

def score_job(client, job: Job, session_prefix: str) -> dict:
    """Return the cache record of one example on one agent: target and choice log-probabilities."""
    from agent.protocol import DENSE

    e = job.example
    if job.single_token_choices:
        # One prefill returns the distribution at the answer position, which contains every letter.
        session = f"{session_prefix}-{e.id}"
        first = client.open(session, e.prompt, DENSE)
        client.close_session(session)
        dense = np.asarray(first.dist.logprobs, dtype=np.float64)
        choices = [float(dense[ids[0]]) for ids in job.choice_ids]
        return {"id": e.id, "logprobs": [choices[e.answer]], "choices": choices,
                "compute_s": first.compute_s}
    result = client.score(e.prompt, job.target_ids)
    record = {"id": e.id, "logprobs": [float(v) for v in result.logprobs], "choices": None,
              "compute_s": result.compute_s}
    if job.choice_ids:
        choices = []
        for c, ids in enumerate(job.choice_ids):
            if c == e.answer:
                choices.append(float(np.sum(result.logprobs)))
            else:
                choices.append(float(np.sum(client.score(e.prompt, ids).logprobs)))
        record["choices"] = choices
    return record


@dataclass
class ExpertRun:
    expert: Expert
    cache: ScoreCache
    cached: int = 0
    computed: int = 0
    failed: int = 0
    error: str | None = None


def score_expert(run: ExpertRun, jobs: list[Job], timeout_s: float, stop: threading.Event, position: int) -> None:
    """Score every job missing from the expert's cache; stop early when `stop` is set."""
    from tqdm import tqdm

    from agent.client import AgentClient, AgentTimeout
    from agent.protocol import RemoteError

    todo = [job for job in jobs if job.example.id not in run.cache.records]
    run.cached = len(jobs) - len(todo)
    bar = tqdm(total=len(jobs), initial=run.cached, desc=run.expert.name, position=position, unit="ex",
               dynamic_ncols=True, leave=True)
    session_prefix = f"score-{int(time.time())}-{position}"
    try:
        with AgentClient(run.expert.endpoint, timeout_s=timeout_s) as client:
            for job in todo:
                if stop.is_set():
                    return
                try:
                    record = score_job(client, job, session_prefix)
                    run.computed += 1
                except RemoteError as exc:
                    if exc.code not in PERMANENT_ERRORS:
                        raise
                    log.warning("expert %s rejected example %s: %s", run.expert.name, job.example.id, exc)
                    record = {"id": job.example.id, "error": exc.code, "message": exc.message}
                    run.failed += 1
                run.cache.add(record)
                bar.update(1)
    except (AgentTimeout, RemoteError, OSError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log.error("expert %s stopped after %d new examples: %s", run.expert.name, run.computed, exc)
        stop.set()
    finally:
        bar.close()


def score_all(experts: list[Expert], jobs: list[Job], cache_root: Path, data_hash: str,
              timeout_s: float = 300.0) -> list[ExpertRun]:
    """Score every expert in parallel threads; return per-expert counts."""
    # Experts with one fingerprint (the same model served twice) share one cache object,
    # so its lock keeps their appends to the one file from interleaving.
    caches: dict[str, ScoreCache] = {}
    for expert in experts:
        caches.setdefault(expert.fingerprint, ScoreCache(cache_root, data_hash, expert))
    runs = [ExpertRun(expert, caches[expert.fingerprint]) for expert in experts]
    stop = threading.Event()
    threads = [threading.Thread(target=score_expert, args=(run, jobs, timeout_s, stop, i),
                                name=f"score {run.expert.name}", daemon=True)
               for i, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        log.warning("interrupted: finishing the examples in flight; rerun the same command to resume")
        stop.set()
        for thread in threads:
            thread.join(timeout=timeout_s)
        raise
    return runs


def build_table(runs: list[ExpertRun], jobs: list[Job], meta: dict) -> ScoreTable:
    """Assemble the score table from the caches, leaving out examples any expert failed on."""
    complete = []
    for job in jobs:
        records = [run.cache.records.get(job.example.id) for run in runs]
        if any(r is None for r in records):
            raise ScoringError(f"example {job.example.id} is missing from a cache; rerun the command to finish scoring")
        if any("error" in r for r in records):
            continue
        complete.append((job, records))
    left_out = len(jobs) - len(complete)
    if left_out:
        log.warning("left %d of %d examples out of the score table because an expert rejected them", left_out, len(jobs))
    if not complete:
        raise ScoringError("no example was scored by every expert")

    logprobs, offsets, choices = [], [0], []
    for job, records in complete:
        rows = np.array([r["logprobs"] for r in records], dtype=np.float32).T   # [T, N]
        logprobs.append(rows)
        offsets.append(offsets[-1] + len(rows))
        if job.choice_ids:
            choices.append([r["choices"] for r in records])
    multiple_choice = len(choices) == len(complete)
    if multiple_choice and len({len(job.choice_ids) for job, _ in complete}) != 1:
        # choice_logprobs is one array, so every example needs the same number of choices.
        log.warning("examples have different numbers of choices; the table has no choice_logprobs")
        multiple_choice = False
    examples = [job.example for job, _ in complete]
    return ScoreTable(
        logprobs=np.concatenate(logprobs), offsets=np.array(offsets, np.int64),
        experts=[run.expert.name for run in runs], fingerprints=[run.expert.fingerprint for run in runs],
        example_ids=[e.id for e in examples], meta=dict(meta, examples_left_out=left_out),
        subjects=[e.subject for e in examples], gate_texts=[e.gate_text or e.prompt for e in examples],
        choice_logprobs=np.array(choices, np.float32) if multiple_choice else None,
        answers=np.array([e.answer for e in examples], np.int64) if multiple_choice else None)


# --- connecting ----------------------------------------------------------------------------------

def identify(experts: list[Expert], tokenizer: LocalTokenizer, timeout_s: float) -> None:
    """Fill in each expert's fingerprints from `info`; all tokenizers must match the local one."""
    from agent.client import AgentClient, AgentTimeout

    for expert in experts:
        try:
            with AgentClient(expert.endpoint, timeout_s=timeout_s) as client:
                info = client.info()
        except AgentTimeout as exc:
            raise ScoringError(f"expert {expert.name}: {exc}") from None
        try:
            expert.fingerprint = expert_fingerprint(info)
        except IdentityError as exc:
            raise ScoringError(f"expert {expert.name} at {expert.endpoint}: {exc}") from None
        expert.tokenizer_fingerprint = str(info.get("tokenizer_fingerprint"))
        if expert.tokenizer_fingerprint != tokenizer.fingerprint:
            raise ScoringError(f"expert {expert.name} has tokenizer fingerprint {expert.tokenizer_fingerprint}, "
                               f"but the tokenizer model has {tokenizer.fingerprint}; pass the expert's GGUF "
                               "as --tokenizer-model")
        log.info("expert %s at %s: fingerprint %s", expert.name, expert.endpoint, expert.fingerprint[:16])


def parse_agents(values: list[str], config: Path | None) -> list[Expert]:
    experts = []
    for value in values:
        name, sep, endpoint = value.partition("=")
        if not sep or not name or not endpoint:
            raise ScoringError(f"--agent {value!r} is invalid; use NAME=ENDPOINT, like law=tcp://127.0.0.1:5555")
        experts.append(Expert(name, endpoint))
    if config is not None:
        from coordinator.config import ConfigError, load_config
        try:
            experts += [Expert(e.name, e.endpoint) for e in load_config(config).experts]
        except ConfigError as exc:
            raise ScoringError(str(exc)) from None
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ScoringError(f"expert names must be unique, got {names}")
    return experts


# --- command line ----------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="data set: an MMLU root folder, ARC JSONL, or {prompt, target} JSONL")
    parser.add_argument("--split", default="test", help="MMLU split to score (default: test)")
    parser.add_argument("--prompt-format", default="zero-shot",
                        help="multiple-choice prompts: zero-shot or K-shot from the MMLU dev split (default: zero-shot)")
    parser.add_argument("--per-subject", type=int, default=None,
                        help="score only the first N examples of each MMLU subject (default: all)")
    parser.add_argument("--agent", action="append", default=[], metavar="NAME=ENDPOINT",
                        help="an expert's agent, like law=tcp://127.0.0.1:5555; repeat for each expert")
    parser.add_argument("--config", type=Path, default=None, help="coordinator TOML whose [[experts]] are scored")
    parser.add_argument("--local", nargs="+", type=Path, default=None, metavar="PROMPT",
                        help="start one local agent per domain prompt file (named after the file) on loopback "
                             "with --model, score them, and stop them")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF of the experts: tokenizes targets, and is served by --local agents "
                             "(default: the demo model in the model cache)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per --local agent (default: 1)")
    parser.add_argument("--cache", type=Path, default=Path("cache/scores"),
                        help="score cache folder (default: cache/scores)")
    parser.add_argument("--output", type=Path, required=True, help="score table NPZ to write")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one agent reply (default: 300)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ScoringError, DatasetError) as exc:
        log.error("%s", exc)
        return 1


def _run(args: argparse.Namespace) -> int:
    prompt_format = PromptFormat.parse(args.prompt_format)
    examples = load_dataset(args.data, args.split, prompt_format, per_subject=args.per_subject)
    data_hash = dataset_hash(examples)
    meta = {"dataset": str(args.data), "dataset_hash": data_hash, "split": args.split,
            "prompt_format": prompt_format.name, "per_subject": args.per_subject,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    log.info("%d examples from %s (%s), data set hash %s", len(examples), args.data, prompt_format.name, data_hash[:16])

    model = args.model
    if model is None:
        from models.fetch import ModelError, model_path
        try:
            model = model_path("demo")
        except ModelError as exc:
            raise ScoringError(f"pass --model with the experts' GGUF file ({exc})") from None

    tokenizer = LocalTokenizer(model)
    try:
        jobs = make_jobs(examples, tokenizer)
        if args.local:
            return _score_local(args, model, tokenizer, jobs, data_hash, meta)
        experts = parse_agents(args.agent, args.config)
        if not experts:
            raise ScoringError("no experts to score; pass --agent NAME=ENDPOINT, --config FILE or --local PROMPT...")
        return _score(args, experts, tokenizer, jobs, data_hash, meta)
    finally:
        tokenizer.close()


def _score_local(args, model: Path, tokenizer: LocalTokenizer, jobs: list[Job], data_hash: str, meta: dict) -> int:
    from coordinator.local_agents import AgentSpec, AgentStartError, LocalAgents

    missing = [p for p in args.local if not p.is_file()]
    if missing:
        raise ScoringError(f"domain prompt files not found: {', '.join(map(str, missing))}")
    specs = [AgentSpec(name=p.stem, model=model, domain_prompt=p, n_threads=args.threads, max_sessions=2)
             for p in args.local]
    try:
        with LocalAgents(specs) as agents:
            experts = [Expert(a.name, a.endpoint) for a in agents.agents]
            return _score(args, experts, tokenizer, jobs, data_hash, meta)
    except AgentStartError as exc:
        raise ScoringError(str(exc)) from None


def _score(args, experts: list[Expert], tokenizer: LocalTokenizer, jobs: list[Job], data_hash: str, meta: dict) -> int:
    identify(experts, tokenizer, min(args.timeout, 30.0))
    started = time.monotonic()
    runs = score_all(experts, jobs, args.cache, data_hash, args.timeout)
    for r in runs:
        log.info("expert %s: %d examples from the cache, %d scored now, %d rejected",
                 r.expert.name, r.cached, r.computed, r.failed)
    failed = [r for r in runs if r.error]
    if failed:
        raise ScoringError("scoring stopped early (" + "; ".join(f"{r.expert.name}: {r.error}" for r in failed)
                           + "); rerun the same command to resume from the cache")
    table = build_table(runs, jobs, dict(meta, seconds=round(time.monotonic() - started, 1)))
    save_score_table(table, args.output)
    log.info("wrote %s: %d examples, %d target tokens, %d experts", args.output, table.n_examples,
             table.logprobs.shape[0], table.n_experts)
    return 0
