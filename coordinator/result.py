"""Result of a fused generation: text, tokens, per-expert accounting and timing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class ExpertEvent:
    """Something that happened to one expert during a request.

    `kind` is "unavailable" (handshake failed before the request), "late" (left out of
    one step's fusion) or "dropped" (left out for the rest of the request). `step` is
    the index of the generated token whose distribution was being gathered (0 is the
    first token), or None before generation.
    """

    step: int | None
    expert: str
    kind: str
    detail: str

    def describe(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"expert {self.expert} {self.kind}{where}: {self.detail}"


@dataclass(frozen=True)
class ExpertReport:
    """One selected expert's part in a request."""

    name: str
    gate: float
    weight: float                     # renormalized over the selected k
    served_steps: int                 # steps whose fusion included this expert
    late_steps: int
    dropped_at_step: int | None
    drop_reason: str | None
    compute_s: float                  # sum of the compute seconds the agent reported
    replies: int                      # distribution replies received, late ones included
    energy_j: float | None            # None unless the agent reported energy in every reply
    meter: str | None                 # name of the agent's energy meter; "none" when it has none


@dataclass
class StepTimings:
    """Timing samples in seconds of the steps after the first token.

    overhead: step latency (token sent to next token sampled) minus the compute time
        of the slowest expert that served the step, and minus `waits` of the step.
    local: from the arrival of the last reply that was fused to the sampled token,
        without `waits`: the coordinator's own work (decoding, fusion, sampling).
    transport: per reply, round trip minus the agent's compute time: encoding,
        ZeroMQ, and waiting in the agent's and the coordinator's queues.
    waits: per step that waited until its deadline for a late expert, every step
        including the first token: the time from the last reply that arrived to the
        deadline.
    """

    overhead: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    transport: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)

    def add(self, replies, sent_at: float, sampled_at: float) -> None:
        """Record one step after the first token from its gathered replies (see steps.StepReplies)."""
        served = list(replies.distributions)
        self.overhead.append(sampled_at - sent_at - max(replies.compute_s[name] for name in served)
                             - replies.waited_s)
        self.local.append(sampled_at - max(replies.arrived_at[name] for name in served) - replies.waited_s)
        self.transport.extend(replies.transport_s[name] for name in served)

    def add_wait(self, replies) -> None:
        """Record the deadline wait of any step, the first token's included."""
        if replies.deadline_expired:
            self.waits.append(replies.waited_s)


def _mean_ms(values: Sequence[float]) -> float | None:
    return float(np.mean(values) * 1000) if len(values) else None


def _p95_ms(values: Sequence[float]) -> float | None:
    return float(np.percentile(values, 95) * 1000) if len(values) else None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    tokens: list[int]
    stop_reason: str                  # "eos", "stop" (a stop string) or "max_tokens"
    stop_text: str | None             # the stop string that ended the text, when stop_reason is "stop"
    max_tokens: int                   # the token limit of the request
    experts: list[ExpertReport]
    events: list[ExpertEvent]
    time_to_first_token_s: float | None
    token_latency_mean_s: float | None    # between consecutive tokens, first token excluded
    token_latency_p95_s: float | None
    tokens_per_s: float | None            # tokens / total_s
    total_s: float                        # from the request's start (gate included) to its end
    overhead_mean_ms: float | None        # per step: latency minus the slowest served expert's compute and the wait
    overhead_p95_ms: float | None
    local_mean_ms: float | None           # per step: last fused reply's arrival to the sampled token
    transport_mean_ms: float | None       # per reply: round trip minus the agent's compute
    late_wait_steps: int                  # steps that waited until their deadline for a late expert
    late_wait_s: float                    # total time those steps waited after their last reply
    energy_j: float | None                # sum over experts; None if any expert's energy is unknown
    gate_s: float
    gate_uniform: bool
    seed: int
    top_k: int
    distribution: dict

    @property
    def served_counts(self) -> dict[str, int]:
        return {expert.name: expert.served_steps for expert in self.experts}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def build(cls, *, request_id: str, text: str, tokens: list[int], stop_reason: str,
              stop_text: str | None = None, max_tokens: int, experts: list[ExpertReport], events: list[ExpertEvent], started: float,
              token_times: Sequence[float], finished: float, timings: StepTimings,
              gate_s: float, gate_uniform: bool, seed: int, top_k: int, distribution: dict) -> GenerationResult:
        """Derive the timing figures from monotonic timestamps in seconds."""
        latencies = np.diff(np.asarray(token_times, dtype=np.float64))
        energies = [expert.energy_j for expert in experts]
        total_s = finished - started
        return cls(
            request_id=request_id, text=text, tokens=list(tokens), stop_reason=stop_reason,
            stop_text=stop_text, max_tokens=max_tokens, experts=experts, events=list(events),
            time_to_first_token_s=token_times[0] - started if token_times else None,
            token_latency_mean_s=float(latencies.mean()) if latencies.size else None,
            token_latency_p95_s=float(np.percentile(latencies, 95)) if latencies.size else None,
            tokens_per_s=len(tokens) / total_s if tokens and total_s > 0 else None,
            total_s=total_s,
            overhead_mean_ms=_mean_ms(timings.overhead),
            overhead_p95_ms=_p95_ms(timings.overhead),
            local_mean_ms=_mean_ms(timings.local),
            transport_mean_ms=_mean_ms(timings.transport),
            late_wait_steps=len(timings.waits),
            late_wait_s=float(sum(timings.waits)),
            energy_j=None if any(e is None for e in energies) else float(sum(energies)),
            gate_s=gate_s, gate_uniform=gate_uniform, seed=seed, top_k=top_k, distribution=distribution)


class StopMatcher:
    """Accumulate generated text, hold back what may start a stop string, cut at a match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""
        self.matched: str | None = None   # the stop string found, once feed() returned True
        self._emitted = 0

    def feed(self, piece: str, emit: Callable[[str], None]) -> bool:
        """Add `piece`; emit the text that is now final; return True at a stop string."""
        search_from = max(0, self._emitted - max((len(s) for s in self.stops), default=0))
        self.text += piece
        matches = [(index, stop) for stop in self.stops if (index := self.text.find(stop, search_from)) >= 0]
        if matches:
            index, self.matched = min(matches, key=lambda match: match[0])
            self.text = self.text[:index]
            self._emit_until(len(self.text), emit)
            return True
        self._emit_until(len(self.text) - self._held_back(), emit)
        return False

    def finish(self, piece: str, emit: Callable[[str], None]) -> None:
        """Add the last piece and emit everything held back."""
        self.text += piece
        self._emit_until(len(self.text), emit)

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _emit_until(self, end: int, emit: Callable[[str], None]) -> None:
        if end > self._emitted:
            emit(self.text[self._emitted:end])
            self._emitted = end
