"""Synchronous client for one MoE² agent.

One `AgentClient` owns one ZeroMQ DEALER socket connected to one agent and sends one
request at a time. Every call waits at most `timeout_s` seconds and raises
`AgentTimeout` when no reply arrives in time. Error replies raise
`protocol.RemoteError`, which carries the error code, the message and the field.

Each request gets a fresh id. A reply that arrives after its call timed out carries
the old id and is discarded, so a slow agent's reply never completes the wrong call. The client
is not thread-safe, like the ZeroMQ socket it owns: use one client per thread.

    with AgentClient("tcp://127.0.0.1:5555") as agent:
        info = agent.info()
        first = agent.open("s1", "The capital of France is", SPARSE_256)
        token = int(first.dist.ids[np.argmax(first.dist.logprobs)])
        second = agent.step("s1", 1, token, SPARSE_256)
        agent.close_session("s1")
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from agent import protocol
from agent.protocol import DENSE, Distribution, DistributionFormat, RemoteError

log = logging.getLogger("moe2.agent.client")

DEFAULT_TIMEOUT_S = 30.0
SPARSE_256 = DistributionFormat("sparse", 256)


class AgentTimeout(TimeoutError):
    """No reply from the agent within the call's timeout."""


@dataclass(frozen=True)
class StepResult:
    """Reply to `open` or `step`: the next-token distribution and what it cost."""

    step: int
    n_past: int                   # tokens in the session's KV cache after this call
    dist: Distribution
    compute_s: float              # seconds the agent spent computing
    energy_j: float | None        # None when the agent's meter cannot measure energy
    meter: str
    energy: dict | None           # the meter's full record (see agent.energy.EnergyRecord)


@dataclass(frozen=True)
class ScoreResult:
    """Reply to `score`: teacher-forced log-probabilities of the continuation tokens."""

    logprobs: np.ndarray          # float32, one per continuation token
    n_prompt: int                 # prompt tokens the agent evaluated, domain prompt included
    compute_s: float
    energy_j: float | None
    meter: str
    energy: dict | None


@dataclass(frozen=True)
class Vocab:
    """Token pieces of an agent's real tokens, for detokenizing on the client side."""

    pieces: list[bytes]           # bytes each token renders to, indexed by token id
    attrs: np.ndarray             # int32 llama.cpp token attributes (LLAMA_TOKEN_ATTR_*)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.pieces[t] for t in tokens)


class AgentClient:
    """A DEALER connection to one agent, with a timeout on every call."""

    def __init__(self, address: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.address = address
        self.timeout_s = float(timeout_s)
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._ids = itertools.count(1)

    # --- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket without waiting for unsent messages."""
        if not self._socket.closed:
            self._socket.close(linger=0)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- operations ------------------------------------------------------------------

    def info(self, *, timeout_s: float | None = None) -> dict:
        """Return the agent's info map (model, vocabulary, limits, meter, version)."""
        reply = self.call("info", timeout_s=timeout_s)
        return {key: value for key, value in reply.items() if key not in ("v", "op", "id", "ok")}

    def vocab(self, *, timeout_s: float | None = None) -> Vocab:
        reply = self.call("vocab", timeout_s=timeout_s)
        blob = bytes(reply["pieces"])
        offsets = protocol.decode_array(reply["offsets"], "offsets", "<u4")
        attrs = protocol.decode_array(reply["attrs"], "attrs", "<i4")
        pieces = [blob[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        return Vocab(pieces, attrs)

    def open(self, session: str, prompt: str | Sequence[int] | np.ndarray,
             fmt: DistributionFormat = DENSE, *, add_bos: bool = True,
             timeout_s: float | None = None) -> StepResult:
        """Open a session on `prompt` and return the distribution of its next token.

        A text prompt is tokenized by the agent (after its domain prompt, if any).
        Token ids are used exactly as given, and `add_bos` applies to text only.
        """
        reply = self.call("open", timeout_s=timeout_s, session=session,
                          prompt=_encode_prompt(prompt), format=fmt.to_wire(), add_bos=add_bos)
        return _step_result(reply)

    def step(self, session: str, step: int, token: int, fmt: DistributionFormat = DENSE,
             *, timeout_s: float | None = None) -> StepResult:
        """Feed the `step`-th generated token and return the distribution after it."""
        reply = self.call("step", timeout_s=timeout_s, session=session, step=int(step),
                          token=int(token), format=fmt.to_wire())
        return _step_result(reply)

    def close_session(self, session: str, *, timeout_s: float | None = None) -> None:
        self.call("close", timeout_s=timeout_s, session=session)

    def score(self, prompt: str | Sequence[int] | np.ndarray,
              continuation: Sequence[int] | np.ndarray, *, add_bos: bool = True,
              timeout_s: float | None = None) -> ScoreResult:
        """Return log p(continuation[t] | prompt, continuation[:t]) for every t."""
        reply = self.call("score", timeout_s=timeout_s, prompt=_encode_prompt(prompt),
                          continuation=protocol.encode_array(np.asarray(continuation), "<i4"),
                          add_bos=add_bos)
        logprobs = protocol.decode_array(reply["logprobs"], "logprobs", "<f4")
        return ScoreResult(logprobs, int(reply["n_prompt"]), float(reply["compute_s"]),
                           reply.get("energy_j"), str(reply.get("meter", "")), reply.get("energy"))

    def ping(self, *, timeout_s: float | None = None) -> float:
        """Return the agent's clock (unix seconds); raises AgentTimeout if it is down."""
        return float(self.call("ping", timeout_s=timeout_s)["time"])

    # --- transport -------------------------------------------------------------------

    def call(self, op: str, *, timeout_s: float | None = None, **fields: Any) -> dict:
        """Send one request and return its reply map, or raise RemoteError/AgentTimeout."""
        request_id = next(self._ids)
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        self._socket.send(protocol.pack(protocol.request(op, request_id, **fields)), copy=False)

        deadline = time.monotonic() + timeout
        while True:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if remaining_ms == 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                raise AgentTimeout(f"{op} to {self.address} timed out after {timeout:g} s; "
                                   "check that the agent is running and reachable")
            reply = protocol.unpack(self._socket.recv(copy=False).buffer)
            reply_id = reply.get("id")
            # An error about an undecodable frame (frame_too_large) cannot echo an id.
            if reply_id != request_id and not (reply_id is None and reply.get("ok") is False):
                log.debug("discarding stale reply id=%r while waiting for id=%d", reply_id, request_id)
                continue
            if reply.get("ok") is not True:
                raise RemoteError(reply.get("error") or {}, op)
            return reply


def _encode_prompt(prompt: str | Sequence[int] | np.ndarray) -> str | dict:
    if isinstance(prompt, str):
        return prompt
    return protocol.encode_array(np.asarray(prompt), "<i4")


def _step_result(reply: dict) -> StepResult:
    return StepResult(
        step=int(reply["step"]),
        n_past=int(reply["n_past"]),
        dist=protocol.decode_distribution(reply["dist"]),
        compute_s=float(reply["compute_s"]),
        energy_j=reply.get("energy_j"),
        meter=str(reply.get("meter", "")),
        energy=reply.get("energy"),
    )
