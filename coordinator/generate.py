"""Fused generation: several agents generate one completion together, token by token.

For a prompt x the coordinator computes the gate values g(x), keeps the experts of the
subset S that completed their handshake, takes the k with the largest g (ties go to the
expert listed first in the configuration) and weights them w_n = g_n / sum of g over
the k. It opens a session on the k agents at once and fuses their next-token
distributions with those weights. It samples one token from the fused distribution
and sends it to every selected agent as the next step. The loop ends at an
end-of-generation token, a stop string or the token limit.

An expert that misses a step's deadline is left out of that step, and the weights are
renormalized over the experts that replied. An expert that fails is dropped for the
rest of the request (see coordinator.steps). The request fails only when no expert is
left.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zmq.asyncio

from agent.protocol import Distribution
from coordinator import fusion
from coordinator.client import (AgentClient, AgentError, AgentInfo, Vocabulary, VocabularyCache,
                                describe_handshake_error)
from coordinator.config import Config
from coordinator.gating import Gate
from coordinator.identity import IdentityError, expert_fingerprint
from coordinator.result import ExpertEvent, GenerationResult, StepTimings, StopMatcher
from coordinator.steps import NoExpertLeftError, Participant, StepExchange, StepReplies

log = logging.getLogger("moe2.coordinator.generate")


class GenerationError(RuntimeError):
    """A request could not be served; `events` lists what happened to each expert."""

    def __init__(self, message: str, events: Sequence[ExpertEvent] = ()):
        self.events = list(events)
        details = "; ".join(event.describe() for event in self.events)
        super().__init__(f"{message}: {details}" if details else message)


class TokenizerMismatchError(GenerationError):
    """Two experts of the subset have different tokenizer fingerprints."""


@dataclass
class _Expert:
    """A connected agent and what the coordinator learned in its handshake."""

    name: str
    client: AgentClient
    info: AgentInfo | None = None
    vocabulary: Vocabulary | None = None
    error: str | None = None          # why the handshake failed, when it did

    @property
    def ready(self) -> bool:
        return self.info is not None and self.vocabulary is not None


class Coordinator:
    """Connections to the configured agents and the fused generation loop.

    Use as `async with Coordinator(config) as coordinator:`. Entering connects and runs
    the handshake with every expert of the subset S. It raises TokenizerMismatchError
    before any generation when their tokenizers differ.
    """

    def __init__(self, config: Config, gate: Gate | None = None,
                 vocabulary_cache: VocabularyCache | None = None):
        self.config = config
        self.gate = gate
        self.vocabulary_cache = vocabulary_cache or VocabularyCache(config.vocab_cache_dir)
        self._context: zmq.asyncio.Context | None = None
        self._experts: dict[str, _Expert] = {}

    async def __aenter__(self) -> Coordinator:
        try:
            await self.connect()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # --- connections ------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to every expert of S and run the `info` and `vocab` handshake.

        An expert whose handshake fails stays unavailable (logged, and reported in each
        result). The others are checked for equal tokenizer fingerprints, and a warning
        is logged for an agent that reports another name or whose expert fingerprint
        differs from the one the trained gate has for its name.
        """
        self._context = zmq.asyncio.Context()
        for name in self.config.subset:
            expert = self.config.expert(name)
            if not expert.is_loopback:
                log.warning("expert %s: traffic to %s is neither authenticated nor encrypted "
                            "(ZeroMQ CURVE is not supported yet); use it only on a trusted network",
                            name, expert.endpoint)
            client = AgentClient(name, expert.endpoint, self._context)
            client.start()
            self._experts[name] = _Expert(name, client)
        await asyncio.gather(*(self._handshake(expert) for expert in self._experts.values()))

        ready = [expert for expert in self._experts.values() if expert.ready]
        if not ready:
            events = [ExpertEvent(None, e.name, "unavailable", e.error or "") for e in self._experts.values()]
            raise GenerationError("no expert of the subset completed its handshake", events)
        check_fingerprints([(expert.name, expert.info.tokenizer_fingerprint) for expert in ready])
        for expert in ready:
            self._check_identity(expert)

    def _check_identity(self, expert: _Expert) -> None:
        """Warn when the agent's own name, or its fingerprint in the gate, differs."""
        reported = expert.info.raw.get("name")
        if isinstance(reported, str) and reported and reported != expert.name:
            # An agent started without --name reports its model file name; that is no
            # sign of a wrong endpoint, so it is logged at INFO only.
            default_name = reported == expert.info.raw.get("model_file")
            log.log(logging.INFO if default_name else logging.WARNING,
                    "expert %s: the agent at %s reports the name %r. Check that the endpoint serves this "
                    "expert, or start the agent with --name %s so that both names match",
                    expert.name, expert.client.endpoint, reported, expert.name)

        gate = self.gate
        if gate is None or gate.uniform or expert.name not in gate.names:
            return
        trained = gate.fingerprints[gate.names.index(expert.name)]
        if trained is None:
            return
        try:
            served = expert_fingerprint(expert.info.raw)
        except IdentityError as exc:
            log.warning("expert %s: cannot compare it with the gate's fingerprint %s: %s", expert.name, trained, exc)
            return
        if served != trained:
            log.warning("expert %s: its fingerprint is %s, but the gate was trained on fingerprint %s under this "
                        "name, so a different model file, LoRA adapter or domain prompt was scored. The gate's "
                        "values for this expert may not fit it. Score it with `moe2 score` and train the gate "
                        "again with `moe2 train-gate`", expert.name, served, trained)

    async def _handshake(self, expert: _Expert) -> None:
        timeout_s = self.config.timeouts.handshake_s
        try:
            expert.info = await expert.client.info(timeout_s)
            expert.vocabulary = await self.vocabulary_cache.get(expert.client, expert.info, timeout_s)
        except AgentError as exc:
            expert.info = None
            expert.error = describe_handshake_error(exc)
            log.warning("expert %s: handshake failed, leaving it out: %s", expert.name, expert.error)
            return
        log.info("expert %s: ready at %s (model %s, %d tokens, tokenizer %s)", expert.name,
                 expert.client.endpoint, expert.info.model, expert.info.n_tokens, expert.info.tokenizer_fingerprint)

    def close(self) -> None:
        for expert in self._experts.values():
            expert.client.close()
        self._experts = {}
        if self._context is not None:
            # The clients closed their sockets above. destroy() closes any socket still
            # open before terminating, so a forgotten socket cannot block term().
            self._context.destroy(linger=0)
            self._context = None

    # --- generation -------------------------------------------------------------------

    async def generate(self, prompt: str, *, top_k: int | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       seed: int | None = None, stop: list[str] | None = None,
                       on_text: Callable[[str], None] | None = None,
                       on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate a completion of `prompt` with the top-k experts of S.

        Keyword arguments override the configuration for this request. `on_text` gets
        each new piece of text as soon as it is final, so text that might begin a stop
        string is held back. `on_token` gets (index, token id) for each sampled token.
        Raises GenerationError when no expert is left.
        """
        if not self._experts:
            raise RuntimeError("Coordinator is not connected; use `async with Coordinator(config)`")
        config = self.config.with_overrides(top_k=top_k, max_tokens=max_tokens, temperature=temperature,
                                            top_p=top_p, seed=seed, stop=stop)
        run = _Request(self, config, prompt, on_text, on_token)
        return await run.execute()

    def _gate_values(self, prompt: str) -> tuple[dict[str, float], bool, float]:
        """Return the gate value of each expert of S, whether they are uniform, and seconds.

        `self.gate` is called with the prompt and returns values (and a `uniform` flag)
        in the order of its `names`; see coordinator.gating.Gate.
        """
        start = time.perf_counter()
        subset = self.config.subset
        if self.gate is None:
            return {name: 1.0 / len(subset) for name in subset}, True, time.perf_counter() - start
        output = self.gate(prompt)
        values = dict(zip(self.gate.names, (float(v) for v in output.values)))
        missing = [name for name in subset if name not in values]
        if missing:
            raise GenerationError(f"the gate has no value for experts {', '.join(missing)}; "
                                  f"it covers {', '.join(self.gate.names)}")
        return {name: values[name] for name in subset}, bool(output.uniform), time.perf_counter() - start


def check_fingerprints(fingerprints: Sequence[tuple[str, str]]) -> None:
    """Raise TokenizerMismatchError naming two experts whose fingerprints differ."""
    first_name, first = fingerprints[0]
    for name, fingerprint in fingerprints[1:]:
        if fingerprint != first:
            raise TokenizerMismatchError(
                f"tokenizer fingerprints differ: expert {first_name} has {first}, expert {name} has {fingerprint}; "
                "experts are fused only when they share one tokenizer, so serve models of one family "
                "or remove one of them from selection.subset")


def select_top_k(names: Sequence[str], gates: Sequence[float], k: int) -> list[int]:
    """Return the indices of the k largest gate values; ties go to the earlier name."""
    order = sorted(range(len(names)), key=lambda index: (-gates[index], index))
    return order[:k]


class _Request:
    """State of one generation request."""

    def __init__(self, coordinator: Coordinator, config: Config, prompt: str,
                 on_text: Callable[[str], None] | None, on_token: Callable[[int, int], None] | None):
        self.coordinator = coordinator
        self.config = config
        self.prompt = prompt
        self.on_text = on_text
        self.on_token = on_token
        self.request_id = uuid.uuid4().hex[:12]
        self.events: list[ExpertEvent] = []
        self.participants: list[Participant] = []
        self.format = config.wire_format

    async def execute(self) -> GenerationResult:
        started = time.monotonic()
        gates, uniform, gate_s = self.coordinator._gate_values(self.prompt)
        if uniform:
            log.info("request %s: no trained gate configured, using uniform gate values", self.request_id)
        first = self._select(gates)
        exchange = StepExchange(self.request_id, self.participants, self.format, self.config.timeouts,
                                first.info.n_tokens, self.events)

        seed = self.config.sampling.seed
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        rng = np.random.default_rng(seed)
        eos_ids = set(first.info.eos_ids)
        detokenizer = first.vocabulary.detokenizer()
        stops = StopMatcher(self.config.sampling.stop)

        tokens: list[int] = []
        token_times: list[float] = []
        timings = StepTimings()
        stop_reason = "max_tokens"
        try:
            sent_at = time.monotonic()
            exchange.send_open(self.prompt)
            step = 0
            while True:
                deadline_s = self.config.timeouts.open_s if step == 0 else self.config.timeouts.step_deadline_s
                replies = await exchange.collect(step, sent_at, deadline_s)
                token = self._fuse_and_sample(exchange, step, replies, rng)
                now = time.monotonic()
                if step > 0:
                    timings.add(replies, sent_at, now)
                timings.add_wait(replies)
                tokens.append(token)
                token_times.append(now)
                if self.on_token is not None:
                    self.on_token(len(tokens) - 1, token)

                if token in eos_ids:
                    stop_reason = "eos"
                    break
                if stops.feed(detokenizer.feed(token), self._emit):
                    stop_reason = "stop"
                    break
                if len(tokens) >= self.config.sampling.max_tokens:
                    break

                step += 1
                sent_at = time.monotonic()
                exchange.send_step(step, token)
            if stop_reason != "stop":
                stops.finish(detokenizer.flush(), self._emit)
        except NoExpertLeftError as exc:
            raise GenerationError(str(exc), self.events) from None
        finally:
            await exchange.close_sessions()

        finished = time.monotonic()
        return GenerationResult.build(
            request_id=self.request_id, text=stops.text, tokens=tokens, stop_reason=stop_reason,
            stop_text=stops.matched, max_tokens=self.config.sampling.max_tokens,
            experts=[p.report() for p in self.participants], events=self.events,
            started=started, token_times=token_times, finished=finished, timings=timings,
            gate_s=gate_s, gate_uniform=uniform, seed=seed, top_k=self.config.top_k,
            distribution=self.format.to_wire())

    def _emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)

    def _select(self, gates: dict[str, float]) -> _Expert:
        """Choose the top-k available experts of S, set their weights, and return the first."""
        experts = self.coordinator._experts
        for name in self.config.subset:
            if not experts[name].ready:
                self._record_unavailable(name, experts[name].error or "handshake did not complete")
        candidates = [name for name in self.config.subset if experts[name].ready]
        if not candidates:
            raise GenerationError(f"request {self.request_id}: no expert of the subset is available", self.events)

        candidate_gates = [gates[name] for name in candidates]
        chosen = select_top_k(candidates, candidate_gates, min(self.config.top_k, len(candidates)))
        total = sum(candidate_gates[index] for index in chosen)
        for index in chosen:
            # A float32 softmax can underflow to 0, so fall back to equal weights if the
            # chosen gate values sum to zero, and the fusion never divides by zero.
            weight = candidate_gates[index] / total if total > 0 else 1.0 / len(chosen)
            expert = experts[candidates[index]]
            self.participants.append(Participant(expert.name, expert.client, candidate_gates[index], weight,
                                                 meter=expert.info.meter))
        log.info("request %s: selected %s", self.request_id,
                 ", ".join(f"{p.name} (gate {p.gate:.4f}, weight {p.weight:.4f})" for p in self.participants))
        return experts[self.participants[0].name]

    def _record_unavailable(self, name: str, detail: str) -> None:
        event = ExpertEvent(None, name, "unavailable", detail)
        self.events.append(event)
        log.warning("request %s: %s", self.request_id, event.describe())

    def _fuse_and_sample(self, exchange: StepExchange, step: int, replies: StepReplies,
                         rng: np.random.Generator) -> int:
        """Fuse the step's replies with renormalized weights and sample the next token.

        A distribution that the fusion kernel rejects (NaN, a duplicate id) drops its
        expert, and the step is fused again without it.
        """
        served = [p for p in self.participants if p.name in replies.distributions]
        while True:
            total = sum(p.weight for p in served)
            if total > 0:
                weights = np.array([p.weight / total for p in served])
            else:
                # The gate value of every expert that replied underflowed to 0 while the
                # others were late or dropped, so weight the ones that replied equally.
                weights = np.full(len(served), 1.0 / len(served))
            distributions = [replies.distributions[p.name] for p in served]
            try:
                token = fuse_and_sample(distributions, weights, exchange.n_tokens, self.config.sampling.temperature,
                                        self.config.sampling.top_p, rng)
            except fusion.FusionInputError as exc:
                if exc.expert is None or not 0 <= exc.expert < len(served):
                    raise
                rejected = served.pop(exc.expert)
                exchange.drop(rejected, step, "invalid", f"distribution rejected by the fusion kernel: {exc}")
                if not served:
                    raise GenerationError(f"request {self.request_id}: every selected expert was dropped",
                                          self.events) from None
                continue
            for participant in served:
                participant.served += 1
            return token


def fuse_and_sample(distributions: Sequence[Distribution], weights: np.ndarray, n_tokens: int,
                    temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Fuse the experts' distributions with `weights` (summing to 1) and sample a token.

    Every format goes to the C kernel. Temperature and top-p apply to the fused
    distribution, not to each expert's. Dense rows cover the real tokens only, so the
    token is below `n_tokens` and padded ids of a GGUF vocabulary are never sampled.
    """
    kind = distributions[0].kind
    if kind == "dense_prob":
        fused = fusion.fuse_dense_probs([d.probs for d in distributions], weights)
    elif kind == "dense":
        fused = fusion.fuse_dense([d.logprobs for d in distributions], weights)
    else:
        fused = fusion.fuse_sparse([d.ids for d in distributions], [d.logprobs for d in distributions],
                                   np.array([d.tail for d in distributions]), weights, n_tokens)
    return int(fusion.sample(fused, temperature=temperature, top_p=top_p, u=float(rng.random())))
