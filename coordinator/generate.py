"""Fused generation: several agents answer one prompt together, token by token.

For a prompt x the coordinator computes the gate values g(x), keeps the experts of the
subset S that completed their handshake, takes the k with the largest g (ties go to the
expert listed first in the configuration) and weights them w_n = g_n / sum of g over
the k. It opens a session on the k agents at once, fuses their next-token
distributions with those weights, samples one token, sends it to every selected agent
as the next step, and repeats until an end-of-generation token, a stop string or the
token limit.

Stragglers and failures:
- The first distribution (prompt prefill) waits for every expert up to
  `timeouts.open_s`, because prefill time grows with the prompt length.
- A later step waits up to `timeouts.step_deadline_s` after the token was sent.
  Experts whose reply is missing then are left out of that step, and the weights are
  renormalized over the experts that replied. If none replied by then, the step takes
  the first reply that arrives.
- A late expert still receives every token. The agent handles requests in order, so
  its owed replies arrive later, are matched by request id and step number, counted
  (compute time, energy) and discarded. It serves again from the first step whose
  reply arrives in time.
- An expert that replies with an error, loses its connection, sends an invalid reply,
  or owes a reply for longer than `timeouts.open_s` or `timeouts.step_s` is dropped for
  the rest of the request. The request fails only when no expert is left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import zmq.asyncio

from agent import protocol
from agent.protocol import Distribution, DistributionFormat
from coordinator import fusion
from coordinator.client import (AgentClient, AgentError, AgentInfo, AgentProtocolError, PendingReply,
                                Vocabulary, VocabularyCache)
from coordinator.config import Config
from coordinator.gating import Gate
from coordinator.result import ExpertEvent, ExpertReport, GenerationResult, StopMatcher

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


@dataclass
class _OwedReply:
    step: int
    pending: PendingReply
    timeout_s: float


@dataclass
class _Participant:
    """One selected expert during one request."""

    expert: _Expert
    gate: float
    weight: float
    owed: deque[_OwedReply] = field(default_factory=deque)
    alive: bool = True
    served: int = 0
    late: int = 0
    dropped_at_step: int | None = None
    drop_reason: str | None = None
    compute_s: float = 0.0
    energy_j: float = 0.0
    energy_known: bool = True
    replies: int = 0
    meter: str | None = None

    @property
    def name(self) -> str:
        return self.expert.name


@dataclass
class _Step:
    """Replies gathered for one step: distribution and reported compute time by expert."""

    distributions: dict[str, Distribution] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)


class Coordinator:
    """Connections to the configured agents and the fused generation loop.

    Use as `async with Coordinator(config) as coordinator:`; entering connects and runs
    the handshake with every expert of the subset S, and raises TokenizerMismatchError
    before any generation if their tokenizers differ.
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
        result); the others are checked for equal tokenizer fingerprints.
        """
        self._context = zmq.asyncio.Context()
        for name in self.config.subset:
            client = AgentClient(name, self.config.expert(name).endpoint, self._context)
            client.start()
            self._experts[name] = _Expert(name, client)
        await asyncio.gather(*(self._handshake(expert) for expert in self._experts.values()))

        ready = [expert for expert in self._experts.values() if expert.ready]
        if not ready:
            events = [ExpertEvent(None, e.name, "unavailable", e.error or "") for e in self._experts.values()]
            raise GenerationError("no expert of the subset completed its handshake", events)
        check_fingerprints([(expert.name, expert.info.tokenizer_fingerprint) for expert in ready])

    async def _handshake(self, expert: _Expert) -> None:
        timeout_s = self.config.timeouts.handshake_s
        try:
            expert.info = await expert.client.info(timeout_s)
            expert.vocabulary = await self.vocabulary_cache.get(expert.client, expert.info, timeout_s)
        except AgentError as exc:
            expert.info = None
            expert.error = exc.detail
            log.warning("expert %s: handshake failed, leaving it out: %s", expert.name, exc.detail)
            return
        log.info("expert %s: ready at %s (model %s, %d tokens, tokenizer %s)", expert.name,
                 expert.client.endpoint, expert.info.model, expert.info.n_tokens, expert.info.tokenizer_fingerprint)

    def close(self) -> None:
        for expert in self._experts.values():
            expert.client.close()
        self._experts = {}
        if self._context is not None:
            # Every socket is closed above; destroy() also closes any left open, so
            # terminating the context can never block.
            self._context.destroy(linger=0)
            self._context = None

    # --- generation -------------------------------------------------------------------

    async def generate(self, prompt: str, *, top_k: int | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       seed: int | None = None, stop: list[str] | None = None,
                       on_text: Callable[[str], None] | None = None,
                       on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate an answer to `prompt` with the top-k experts of S.

        Keyword arguments override the configuration for this request. `on_text` gets
        each new piece of text as soon as it is final (text that might begin a stop
        string is held back); `on_token` gets (index, token id) for each sampled token.
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
        self.participants: list[_Participant] = []
        self.format = (DistributionFormat("dense") if config.distribution_format == "dense"
                       else DistributionFormat("sparse", config.top_m))

    # --- the loop ---------------------------------------------------------------------

    async def execute(self) -> GenerationResult:
        started = time.monotonic()
        gates, uniform, gate_s = self.coordinator._gate_values(self.prompt)
        if uniform:
            log.info("request %s: no trained gate configured, using uniform gate values", self.request_id)
        self._select(gates)

        seed = self.config.sampling.seed
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        rng = np.random.default_rng(seed)
        first = self.participants[0].expert
        n_tokens = first.info.n_tokens
        eos_ids = set(first.info.eos_ids)
        detokenizer = first.vocabulary.detokenizer()
        stops = StopMatcher(self.config.sampling.stop)

        tokens: list[int] = []
        token_times: list[float] = []
        overheads: list[float] = []
        stop_reason = "max_tokens"
        try:
            sent_at = time.monotonic()
            for participant in self.participants:
                self._send(participant, "open", 0, {"prompt": self.prompt}, self.config.timeouts.open_s)
            step = 0
            while True:
                deadline_s = self.config.timeouts.open_s if step == 0 else self.config.timeouts.step_deadline_s
                replies = await self._collect(step, sent_at, deadline_s, n_tokens)
                token = self._fuse_and_sample(step, replies, n_tokens, rng)
                now = time.monotonic()
                if step > 0:
                    overheads.append(now - sent_at - max(replies.compute_s.values()))
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
                for participant in self._alive():
                    self._send(participant, "step", step, {"step": step, "token": token}, self.config.timeouts.step_s)
            if stop_reason != "stop":
                stops.finish(detokenizer.flush(), self._emit)
        finally:
            await self._close_sessions()

        finished = time.monotonic()
        return GenerationResult.build(
            request_id=self.request_id, text=stops.text, tokens=tokens, stop_reason=stop_reason,
            experts=[self._report(p) for p in self.participants], events=self.events,
            started=started, token_times=token_times, finished=finished, overheads_s=overheads,
            gate_s=gate_s, gate_uniform=uniform, seed=seed, top_k=self.config.top_k,
            distribution=self.format.to_wire())

    def _emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)

    def _select(self, gates: dict[str, float]) -> None:
        experts = self.coordinator._experts
        for name in self.config.subset:
            if not experts[name].ready:
                self._event(None, name, "unavailable", experts[name].error or "handshake did not complete")
        candidates = [name for name in self.config.subset if experts[name].ready]
        if not candidates:
            raise GenerationError(f"request {self.request_id}: no expert of the subset is available", self.events)

        candidate_gates = [gates[name] for name in candidates]
        chosen = select_top_k(candidates, candidate_gates, min(self.config.top_k, len(candidates)))
        total = sum(candidate_gates[index] for index in chosen)
        for index in chosen:
            # Gate values are positive (softmax), but fall back to equal weights if the
            # chosen ones sum to zero, so the fusion never divides by zero.
            weight = candidate_gates[index] / total if total > 0 else 1.0 / len(chosen)
            self.participants.append(_Participant(experts[candidates[index]], candidate_gates[index], weight))
        log.info("request %s: selected %s", self.request_id,
                 ", ".join(f"{p.name} (gate {p.gate:.4f}, weight {p.weight:.4f})" for p in self.participants))

    def _alive(self) -> list[_Participant]:
        return [participant for participant in self.participants if participant.alive]

    def _send(self, participant: _Participant, op: str, step: int, fields: dict, timeout_s: float) -> None:
        """Send `open` (step 0) or `step`; the participant then owes the reply."""
        pending = participant.expert.client.submit(op, session=self.request_id, format=self.format.to_wire(), **fields)
        participant.owed.append(_OwedReply(step, pending, timeout_s))

    async def _collect(self, step: int, sent_at: float, deadline_s: float, n_tokens: int) -> _Step:
        """Wait for the step's replies until the deadline, consuming owed older replies."""
        deadline_at = sent_at + deadline_s
        replies = _Step()
        while True:
            for participant in self._alive():
                self._consume_done(participant, step, n_tokens, replies)
            now = time.monotonic()
            for participant in self._alive():
                if participant.name in replies.distributions:
                    continue
                oldest = participant.owed[0]
                if now - oldest.pending.sent_at >= oldest.timeout_s:
                    self._drop(participant, step, "timeout",
                               f"no reply to {oldest.pending.op} step {oldest.step} within {oldest.timeout_s:g} s")
            if not self._alive():
                raise GenerationError(f"request {self.request_id}: every selected expert was dropped", self.events)

            waiting = [p for p in self._alive() if p.name not in replies.distributions]
            if not waiting or (replies.distributions and now >= deadline_at):
                break
            # Wake at the deadline or the earliest timeout. Before any reply has come
            # in, the deadline is ignored: the step takes the first reply to arrive.
            wake_at = min(p.owed[0].pending.sent_at + p.owed[0].timeout_s for p in waiting)
            if replies.distributions:
                wake_at = min(wake_at, deadline_at)
            futures = [owed.pending.future for p in waiting for owed in p.owed]
            await asyncio.wait(futures, timeout=max(0.0, wake_at - now), return_when=asyncio.FIRST_COMPLETED)

        for participant in self._alive():
            if participant.name not in replies.distributions:
                participant.late += 1
                self._event(step, participant.name, "late",
                            f"no reply within the deadline of {deadline_s:g} s; left out of this step")
        return replies

    def _consume_done(self, participant: _Participant, step: int, n_tokens: int, replies: _Step) -> None:
        """Take the participant's finished replies in order; keep the one for `step`."""
        while participant.alive and participant.owed and participant.owed[0].pending.future.done():
            owed = participant.owed.popleft()
            future = owed.pending.future
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                kind = error.kind if isinstance(error, AgentError) else "error"
                detail = error.detail if isinstance(error, AgentError) else str(error)
                self._drop(participant, step, kind, f"{owed.pending.op} step {owed.step}: {detail}")
                return
            try:
                distribution, compute_s = self._read_distribution(participant, owed, future.result(), n_tokens)
            except AgentProtocolError as exc:
                self._drop(participant, step, exc.kind, exc.detail)
                return
            if owed.step == step:
                replies.distributions[participant.name] = distribution
                replies.compute_s[participant.name] = compute_s
            else:
                log.debug("request %s: expert %s: consumed late reply for step %d at step %d",
                          self.request_id, participant.name, owed.step, step)

    def _read_distribution(self, participant: _Participant, owed: _OwedReply, reply: dict,
                           n_tokens: int) -> tuple[Distribution, float]:
        """Validate a distribution reply and account its compute time and energy."""
        name = participant.name
        if reply.get("step") != owed.step:
            raise AgentProtocolError(name, f"reply to step {owed.step} carries step {reply.get('step')!r}")
        compute_s = reply.get("compute_s")
        if not isinstance(compute_s, (int, float)) or isinstance(compute_s, bool) or not compute_s >= 0:
            raise AgentProtocolError(name, f"reply to step {owed.step} has compute_s {compute_s!r}")
        try:
            distribution = protocol.decode_distribution(reply.get("dist"))
        except protocol.ProtocolError as exc:
            raise AgentProtocolError(name, f"reply to step {owed.step}: {exc.message}") from None
        if distribution.kind != self.format.kind:
            raise AgentProtocolError(name, f"reply to step {owed.step} is {distribution.kind}, requested {self.format.kind}")
        if distribution.kind == "dense" and distribution.logprobs.size != n_tokens:
            raise AgentProtocolError(name, f"dense reply to step {owed.step} has {distribution.logprobs.size} entries, expected {n_tokens}")
        if distribution.kind == "sparse" and distribution.ids.size and (
                int(distribution.ids.min()) < 0 or int(distribution.ids.max()) >= n_tokens):
            raise AgentProtocolError(name, f"sparse reply to step {owed.step} has token ids outside 0..{n_tokens - 1}")

        participant.replies += 1
        participant.compute_s += float(compute_s)
        participant.meter = str(reply.get("meter") or participant.meter or "")
        energy = reply.get("energy_j")
        if isinstance(energy, (int, float)) and not isinstance(energy, bool) and math.isfinite(energy):
            participant.energy_j += float(energy)
        else:
            participant.energy_known = False
        return distribution, float(compute_s)

    def _fuse_and_sample(self, step: int, replies: _Step, n_tokens: int, rng: np.random.Generator) -> int:
        """Fuse the step's replies with renormalized weights and sample the next token.

        A distribution that the fusion kernel rejects (NaN, a duplicate id) drops its
        expert, and the step is fused again without it.
        """
        served = [p for p in self.participants if p.name in replies.distributions]
        while True:
            total = sum(p.weight for p in served)
            weights = np.array([p.weight / total for p in served])
            distributions = [replies.distributions[p.name] for p in served]
            try:
                token = fuse_and_sample(distributions, weights, n_tokens, self.config.sampling.temperature,
                                        self.config.sampling.top_p, rng)
            except fusion.FusionInputError as exc:
                if exc.expert is None or not 0 <= exc.expert < len(served):
                    raise
                rejected = served.pop(exc.expert)
                self._drop(rejected, step, "invalid", f"distribution rejected by the fusion kernel: {exc}")
                if not served:
                    raise GenerationError(f"request {self.request_id}: every selected expert was dropped",
                                          self.events) from None
                continue
            for participant in served:
                participant.served += 1
            return token

    def _drop(self, participant: _Participant, step: int, kind: str, reason: str) -> None:
        participant.alive = False
        participant.dropped_at_step = step
        participant.drop_reason = f"{kind}: {reason}"
        for owed in participant.owed:
            participant.expert.client.forget(owed.pending)
        participant.owed.clear()
        self._event(step, participant.name, "dropped", participant.drop_reason)

    def _event(self, step: int | None, expert: str, kind: str, detail: str) -> None:
        event = ExpertEvent(step, expert, kind, detail)
        self.events.append(event)
        log.warning("request %s: %s", self.request_id, event.describe())

    async def _close_sessions(self) -> None:
        """Close the session on every selected agent that is still connected.

        Owed step replies of late experts arrive before the close reply (agents handle
        requests in order) and are consumed for their compute time and energy. Each
        wait is bounded by `timeouts.close_s`.
        """
        timeout_s = self.config.timeouts.close_s
        closes = []
        for participant in self.participants:
            client = participant.expert.client
            if participant.drop_reason and participant.drop_reason.startswith("disconnected"):
                continue
            closes.append((participant, client.submit("close", session=self.request_id)))

        futures = [pending.future for _, pending in closes]
        futures += [owed.pending.future for p in self._alive() for owed in p.owed]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)
        for participant in self._alive():
            self._consume_owed_at_end(participant)
        for participant, pending in closes:
            if not pending.future.done():
                participant.expert.client.forget(pending)
                log.info("request %s: expert %s: close timed out after %g s", self.request_id, participant.name, timeout_s)
            elif pending.future.exception() is not None:
                log.info("request %s: expert %s: close failed: %s", self.request_id, participant.name,
                         pending.future.exception())

    def _consume_owed_at_end(self, participant: _Participant) -> None:
        """Account the owed replies that arrived before the close; forget the rest."""
        n_tokens = participant.expert.info.n_tokens
        while participant.owed:
            owed = participant.owed.popleft()
            future = owed.pending.future
            if not future.done():
                participant.expert.client.forget(owed.pending)
                continue
            if future.cancelled():
                continue
            if future.exception() is not None:
                log.info("request %s: expert %s: owed reply to step %d failed after the last token: %s",
                         self.request_id, participant.name, owed.step, future.exception())
                continue
            try:
                self._read_distribution(participant, owed, future.result(), n_tokens)
            except AgentProtocolError as exc:
                log.info("request %s: expert %s: invalid owed reply after the last token: %s",
                         self.request_id, participant.name, exc.detail)

    def _report(self, participant: _Participant) -> ExpertReport:
        return ExpertReport(
            name=participant.name, gate=participant.gate, weight=participant.weight,
            served_steps=participant.served, late_steps=participant.late,
            dropped_at_step=participant.dropped_at_step, drop_reason=participant.drop_reason,
            compute_s=participant.compute_s, replies=participant.replies,
            energy_j=participant.energy_j if participant.energy_known and participant.replies else None,
            meter=participant.meter)


def fuse_and_sample(distributions: Sequence[Distribution], weights: np.ndarray, n_tokens: int,
                    temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Fuse the experts' distributions with `weights` (summing to 1) and sample a token.

    Dense and sparse inputs go to the C kernel. Temperature and top-p apply to the
    fused distribution, not to each expert's. The token is below `n_tokens`, so padded
    ids of a GGUF vocabulary are never sampled.
    """
    if distributions[0].kind == "dense":
        fused = fusion.fuse_dense([d.logprobs for d in distributions], weights)
    else:
        fused = fusion.fuse_sparse([d.ids for d in distributions], [d.logprobs for d in distributions],
                                   np.array([d.tail for d in distributions]), weights, n_tokens)
    return int(fusion.sample(fused, temperature=temperature, top_p=top_p, u=float(rng.random())))
