"""Sending tokens to the selected experts and gathering their replies under deadlines.

The first distribution (prompt prefill) waits for every expert up to
`timeouts.open_s`, because prefill time grows with the prompt length. A later step
waits up to `timeouts.step_deadline_s` after its token was sent. Experts whose reply is
missing then are left out of that step. If none replied by then, the step takes the
first reply that arrives.

A late expert still receives every token. Agents handle requests in order, so its
owed replies arrive later, and while it owes a reply to an earlier step it cannot
reply to the current one in time. Such an expert is not waited for: the step is fused
as soon as the other experts have replied. Its owed replies are matched by request id
and step number, counted (compute time, energy) and discarded. Once it has caught up,
the deadline applies to it again, and it serves from the first step whose reply
arrives in time. So an expert that stalls for good costs one deadline wait, not one at
every step, until `timeouts.step_s` drops it.

An expert that replies with an error, loses its connection, sends an invalid reply, or
owes a reply for longer than `timeouts.open_s` or `timeouts.step_s` is dropped for the
rest of the request. Every such event is logged with the request id and expert name.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from agent import protocol
from agent.protocol import Distribution, DistributionFormat
from coordinator.client import AgentClient, AgentError, AgentProtocolError, PendingReply
from coordinator.config import TimeoutConfig
from coordinator.result import ExpertEvent, ExpertReport

log = logging.getLogger("moe2.coordinator.generate")

# Late steps of one expert logged at WARNING per request; later ones go to DEBUG, so a
# consistently slow expert cannot flood the log. The result lists every one.
LATE_WARNINGS = 3


class NoExpertLeftError(RuntimeError):
    """Every selected expert of a request was dropped."""


@dataclass
class OwedReply:
    """A sent `open` (step 0) or `step` request whose reply is not consumed yet."""

    step: int
    pending: PendingReply
    timeout_s: float

    def describe(self) -> str:
        return "open" if self.pending.op == "open" else f"step {self.step}"


@dataclass
class Participant:
    """One selected expert during one request, and its accounting."""

    name: str
    client: AgentClient
    gate: float
    weight: float
    owed: deque[OwedReply] = field(default_factory=deque)
    alive: bool = True
    served: int = 0
    late: int = 0
    dropped_at_step: int | None = None
    dropped_kind: str | None = None   # AgentError.kind, or "invalid" for a rejected distribution
    drop_reason: str | None = None
    compute_s: float = 0.0
    energy_j: float = 0.0
    energy_known: bool = True
    replies: int = 0
    meter: str | None = None          # from the agent's info, then from each reply

    def report(self) -> ExpertReport:
        return ExpertReport(
            name=self.name, gate=self.gate, weight=self.weight, served_steps=self.served,
            late_steps=self.late, dropped_at_step=self.dropped_at_step, drop_reason=self.drop_reason,
            compute_s=self.compute_s, replies=self.replies,
            energy_j=self.energy_j if self.energy_known and self.replies else None, meter=self.meter)


@dataclass
class StepReplies:
    """Replies gathered for one step, by expert: distribution, reported compute time,
    arrival time and transport time (round trip minus compute), in seconds.

    `deadline_expired` is set when the step waited until its deadline for an expert
    that did not reply, and `waited_s` is the time from the last reply that arrived to
    the deadline.
    """

    distributions: dict[str, Distribution] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)
    arrived_at: dict[str, float] = field(default_factory=dict)
    transport_s: dict[str, float] = field(default_factory=dict)
    deadline_expired: bool = False
    waited_s: float = 0.0


class StepExchange:
    """The open, step and close requests of one generation request to its experts."""

    def __init__(self, request_id: str, participants: list[Participant], fmt: DistributionFormat,
                 timeouts: TimeoutConfig, n_tokens: int, events: list[ExpertEvent]):
        self.request_id = request_id
        self.participants = participants
        self.format = fmt
        self.timeouts = timeouts
        self.n_tokens = n_tokens
        self.events = events

    def alive(self) -> list[Participant]:
        return [participant for participant in self.participants if participant.alive]

    def send_open(self, prompt: str) -> None:
        for participant in self.participants:
            self._send(participant, "open", 0, {"prompt": prompt}, self.timeouts.open_s)

    def send_step(self, step: int, token: int) -> None:
        for participant in self.alive():
            self._send(participant, "step", step, {"step": step, "token": token}, self.timeouts.step_s)

    def _send(self, participant: Participant, op: str, step: int, fields: dict, timeout_s: float) -> None:
        pending = participant.client.submit(op, session=self.request_id, format=self.format.to_wire(), **fields)
        participant.owed.append(OwedReply(step, pending, timeout_s))

    async def collect(self, step: int, sent_at: float, deadline_s: float) -> StepReplies:
        """Wait for the step's replies until the deadline, consuming owed older replies.

        An expert that still owes a reply to an earlier step is not waited for, because
        it serves requests in order and so cannot reply to this step before that one.
        """
        deadline_at = sent_at + deadline_s
        replies = StepReplies()
        while True:
            for participant in self.alive():
                self._consume_done(participant, step, replies)
            now = time.monotonic()
            for participant in self.alive():
                if participant.name in replies.distributions:
                    continue
                oldest = participant.owed[0]
                if now - oldest.pending.sent_at >= oldest.timeout_s:
                    self.drop(participant, step, "timeout",
                               f"no reply to {oldest.describe()} within {oldest.timeout_s:g} s")
            if not self.alive():
                raise NoExpertLeftError(f"request {self.request_id}: every selected expert was dropped")

            missing = [p for p in self.alive() if p.name not in replies.distributions]
            waiting = [p for p in missing if not self._behind(p, step)]
            if replies.distributions and not waiting:
                break
            if replies.distributions and now >= deadline_at:
                replies.waited_s = now - max(replies.arrived_at.values())
                replies.deadline_expired = True
                break
            # Wake at the deadline or the earliest timeout. Before any reply has come
            # in, the deadline is ignored: the step takes the first reply to arrive,
            # from whichever expert sends it.
            wake_at = min(p.owed[0].pending.sent_at + p.owed[0].timeout_s for p in missing)
            if replies.distributions:
                wake_at = min(wake_at, deadline_at)
            futures = [owed.pending.future for p in missing for owed in p.owed]
            await asyncio.wait(futures, timeout=max(0.0, wake_at - now), return_when=asyncio.FIRST_COMPLETED)

        for participant in self.alive():
            if participant.name not in replies.distributions:
                self._record_late(participant, step, deadline_s)
        return replies

    @staticmethod
    def _behind(participant: Participant, step: int) -> bool:
        """Return whether the participant still owes a reply to a step before `step`."""
        return bool(participant.owed) and participant.owed[0].step < step

    def _record_late(self, participant: Participant, step: int, deadline_s: float) -> None:
        participant.late += 1
        if self._behind(participant, step):
            detail = (f"still owes its reply to {participant.owed[0].describe()}, so it cannot reply to this step "
                      "in time; left out of this step without waiting")
        else:
            detail = f"no reply within the deadline of {deadline_s:g} s; left out of this step"
        if participant.late == LATE_WARNINGS:
            detail += "; its further late steps in this request are logged at DEBUG"
        level = logging.WARNING if participant.late <= LATE_WARNINGS else logging.DEBUG
        self.event(step, participant.name, "late", detail, level)

    def _consume_done(self, participant: Participant, step: int, replies: StepReplies) -> None:
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
                self.drop(participant, step, kind, f"{owed.describe()}: {detail}")
                return
            try:
                distribution, compute_s = self._read_distribution(participant, owed, future.result())
            except AgentProtocolError as exc:
                self.drop(participant, step, exc.kind, exc.detail)
                return
            if owed.step == step:
                received_at = owed.pending.received_at or time.monotonic()
                replies.distributions[participant.name] = distribution
                replies.compute_s[participant.name] = compute_s
                replies.arrived_at[participant.name] = received_at
                replies.transport_s[participant.name] = received_at - owed.pending.sent_at - compute_s
            else:
                log.debug("request %s: expert %s: consumed late reply for step %d at step %d",
                          self.request_id, participant.name, owed.step, step)

    def _read_distribution(self, participant: Participant, owed: OwedReply, reply: dict) -> tuple[Distribution, float]:
        """Validate a distribution reply and account its compute time and energy."""
        name = participant.name
        n_tokens = self.n_tokens
        if reply.get("step") != owed.step:
            raise AgentProtocolError(name, f"reply to {owed.describe()} carries step {reply.get('step')!r}")
        compute_s = reply.get("compute_s")
        if not isinstance(compute_s, (int, float)) or isinstance(compute_s, bool) or not compute_s >= 0:
            raise AgentProtocolError(name, f"reply to {owed.describe()} has compute_s {compute_s!r}")
        try:
            distribution = protocol.decode_distribution(reply.get("dist"))
        except protocol.ProtocolError as exc:
            raise AgentProtocolError(name, f"reply to {owed.describe()}: {exc.message}") from None
        if distribution.kind != self.format.kind:
            raise AgentProtocolError(name, f"reply to {owed.describe()} is {distribution.kind}, requested {self.format.kind}")
        dense = distribution.dense_values
        if dense is not None and dense.size != n_tokens:
            raise AgentProtocolError(name, f"{distribution.kind} reply to {owed.describe()} has {dense.size} entries, "
                                           f"expected n_tokens = {n_tokens}")
        if distribution.kind == "sparse" and distribution.ids.size == 0:
            # A top-m reply with m >= 1 always lists a token; an empty one cannot be sampled from.
            raise AgentProtocolError(name, f"sparse reply to {owed.describe()} lists no token ids")
        if distribution.kind == "sparse" and distribution.ids.size and (
                int(distribution.ids.min()) < 0 or int(distribution.ids.max()) >= n_tokens):
            raise AgentProtocolError(name, f"sparse reply to {owed.describe()} has token ids outside 0..{n_tokens - 1}")

        participant.replies += 1
        participant.compute_s += float(compute_s)
        meter = reply.get("meter")
        if isinstance(meter, str) and meter:
            participant.meter = meter
        energy = reply.get("energy_j")
        if isinstance(energy, (int, float)) and not isinstance(energy, bool) and math.isfinite(energy):
            participant.energy_j += float(energy)
        else:
            participant.energy_known = False
        return distribution, float(compute_s)

    def drop(self, participant: Participant, step: int, kind: str, reason: str) -> None:
        participant.alive = False
        participant.dropped_at_step = step
        participant.dropped_kind = kind
        participant.drop_reason = f"{kind}: {reason}"
        for owed in participant.owed:
            participant.client.forget(owed.pending)
        participant.owed.clear()
        self.event(step, participant.name, "dropped", participant.drop_reason)

    def event(self, step: int | None, expert: str, kind: str, detail: str, level: int = logging.WARNING) -> None:
        """Record an event in the result and log it with the request id."""
        event = ExpertEvent(step, expert, kind, detail)
        self.events.append(event)
        log.log(level, "request %s: %s", self.request_id, event.describe())

    async def close_sessions(self) -> None:
        """Close the session on every selected agent that is still connected.

        Owed step replies of late experts arrive before the close reply (agents handle
        requests in order) and are consumed for their compute time and energy. Each
        wait is bounded by `timeouts.close_s`.
        """
        timeout_s = self.timeouts.close_s
        closes = []
        for participant in self.participants:
            if participant.dropped_kind == "disconnected":
                continue
            closes.append((participant, participant.client.submit("close", session=self.request_id)))

        futures = [pending.future for _, pending in closes]
        futures += [owed.pending.future for p in self.alive() for owed in p.owed]
        if futures:
            await asyncio.wait(futures, timeout=timeout_s)
        for participant in self.alive():
            self._consume_owed_at_end(participant)
        for participant, pending in closes:
            if not pending.future.done():
                participant.client.forget(pending)
                log.info("request %s: expert %s: close timed out after %g s", self.request_id, participant.name, timeout_s)
            elif pending.future.exception() is not None:
                log.info("request %s: expert %s: close failed: %s", self.request_id, participant.name,
                         pending.future.exception())

    def _consume_owed_at_end(self, participant: Participant) -> None:
        """Account the owed replies that arrived before the close; forget the rest."""
        while participant.owed:
            owed = participant.owed.popleft()
            future = owed.pending.future
            if not future.done():
                participant.client.forget(owed.pending)
                continue
            if future.cancelled():
                continue
            if future.exception() is not None:
                log.info("request %s: expert %s: owed reply to step %d failed after the last token: %s",
                         self.request_id, participant.name, owed.step, future.exception())
                continue
            try:
                self._read_distribution(participant, owed, future.result())
            except AgentProtocolError as exc:
                log.info("request %s: expert %s: invalid owed reply after the last token: %s",
                         self.request_id, participant.name, exc.detail)
