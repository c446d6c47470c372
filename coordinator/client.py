"""Asyncio client for one agent: a ZeroMQ DEALER socket, requests matched to replies by id.

Each request gets a fresh integer id, and the agent echoes it, so replies may arrive in
any order and late. `submit` returns the pending reply at once, so the generation loop
can keep a step reply that missed its deadline and consume it later. Every `call` has
a timeout. A socket monitor reports a lost TCP connection. It fails every pending
request of that agent with `AgentDisconnected`, and so does every request made before
ZeroMQ has reconnected, instead of letting them wait for their timeouts.

Vocabularies (`vocab`) are fetched once per tokenizer fingerprint and kept by
`VocabularyCache`, in memory and optionally on disk, so the coordinator detokenizes
locally.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import logging
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from agent import protocol

log = logging.getLogger("moe2.coordinator.client")

# llama.cpp token attribute bit for control tokens (BOS, EOS, turn markers): such tokens
# have no text, as in llama.cpp's detokenizer without `special`.
TOKEN_ATTR_CONTROL = 1 << 3


class AgentError(Exception):
    """A request to an agent failed; `kind` is timeout, disconnected, remote or protocol."""

    kind = "error"

    def __init__(self, expert: str, message: str):
        super().__init__(f"expert {expert}: {message}")
        self.expert = expert
        self.detail = message


class AgentTimeout(AgentError):
    kind = "timeout"


class AgentDisconnected(AgentError):
    kind = "disconnected"


class AgentRemoteError(AgentError):
    """The agent replied with an error; `code` is the protocol error code."""

    kind = "remote"

    def __init__(self, expert: str, op: str, error: dict):
        self.code = str(error.get("code", protocol.INTERNAL))
        self.field = error.get("field")
        where = f" (field {self.field})" if self.field else ""
        super().__init__(expert, f"{op} failed: {self.code}: {error.get('message', '')}{where}")


class AgentProtocolError(AgentError):
    """A reply that violates the wire protocol."""

    kind = "protocol"


def describe_handshake_error(error: AgentError) -> str:
    """Return the error's detail, with what to check next when the agent did not reply."""
    if isinstance(error, AgentTimeout):
        return f"{error.detail}. Is moe2-agent running there? The setting timeouts.handshake_s sets the wait"
    return error.detail


@dataclass(frozen=True)
class AgentInfo:
    """The fields of an `info` reply that the coordinator uses; `raw` keeps the rest."""

    model: str
    n_vocab: int
    n_tokens: int
    tokenizer_fingerprint: str
    eos_ids: tuple[int, ...]
    raw: dict[str, Any]

    @classmethod
    def from_reply(cls, expert: str, reply: dict) -> AgentInfo:
        def field(name: str, kind: type) -> Any:
            value = reply.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise AgentProtocolError(expert, f"info reply field {name!r} is {value!r}, expected {kind.__name__}")
            return value

        n_vocab = field("n_vocab", int)
        n_tokens = field("n_tokens", int)
        if not 0 < n_tokens <= n_vocab:
            raise AgentProtocolError(expert, f"info reply has n_tokens {n_tokens} outside 1..n_vocab ({n_vocab})")
        eos = [field("eos_id", int)] if isinstance(reply.get("eos_id"), int) else []
        stop_ids = reply.get("stop_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
            raise AgentProtocolError(expert, f"info reply field 'stop_ids' is {stop_ids!r}, expected a list of token ids")
        eos_ids = tuple(dict.fromkeys(t for t in eos + stop_ids if 0 <= t < n_tokens))
        return cls(model=str(reply.get("model", "")), n_vocab=n_vocab, n_tokens=n_tokens,
                   tokenizer_fingerprint=field("tokenizer_fingerprint", str), eos_ids=eos_ids, raw=dict(reply))

    @property
    def meter(self) -> str | None:
        """Name of the agent's energy meter ("none" when it has none), or None if unreported."""
        meter = self.raw.get("energy_meter")
        name = meter.get("name") if isinstance(meter, dict) else meter
        return name if isinstance(name, str) and name else None


@dataclass
class PendingReply:
    """A request sent to an agent whose reply has not been consumed yet."""

    expert: str
    op: str
    request_id: int
    sent_at: float                    # time.monotonic() seconds
    future: asyncio.Future
    received_at: float | None = None  # when the reply was read from the socket


class AgentClient:
    """One DEALER connection to one agent. Create inside a running event loop."""

    def __init__(self, name: str, endpoint: str, context: zmq.asyncio.Context):
        self.name = name
        self.endpoint = endpoint
        self.connected = False
        # Set when the connection drops and cleared when it is back. Requests made in
        # between fail at once instead of waiting in the queue for their timeout.
        self.lost = False
        self._context = context
        self._ids = itertools.count(1)
        self._pending: dict[int, PendingReply] = {}
        self._unmatched_replies = 0
        self._last_reply_id = 0           # highest request id a reply has carried
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> AgentClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # Keep up to 1000 unsent requests while the agent is unreachable; a request
        # beyond that fails at once instead of blocking the loop.
        socket.setsockopt(zmq.SNDHWM, 1000)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        socket.connect(self.endpoint)
        self._socket = socket
        self._tasks = [asyncio.create_task(self._receive_replies(), name=f"receive-{self.name}"),
                       asyncio.create_task(self._watch_connection(), name=f"monitor-{self.name}")]

    def close(self) -> None:
        """Close the socket and fail every pending request."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._fail_pending(lambda: AgentDisconnected(self.name, "client closed"))
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    # --- requests --------------------------------------------------------------------

    def submit(self, op: str, **fields: Any) -> PendingReply:
        """Send a request now and return its pending reply (resolved by the receiver)."""
        if self._socket is None:
            raise AgentDisconnected(self.name, "client is not started")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        pending = PendingReply(self.name, op, request_id, time.monotonic(), future)
        if self.lost:
            future.set_exception(AgentDisconnected(self.name, f"request not sent: connection to {self.endpoint} is lost, reconnecting"))
            future.exception()  # the caller sees it through the future; mark it retrieved
            return pending
        frame = protocol.pack(protocol.request(op, request_id, **fields))
        self._pending[request_id] = pending
        # With DONTWAIT the send completes at once, and a full queue (ZMQ_SNDHWM
        # requests waiting for an unreachable agent) sets zmq.Again on the returned
        # future instead of blocking.
        sent = self._socket.send(frame, flags=zmq.DONTWAIT)
        if sent.done():
            self._check_sent(pending, sent)
        else:
            sent.add_done_callback(lambda done: self._check_sent(pending, done))
        return pending

    def _check_sent(self, pending: PendingReply, sent: asyncio.Future) -> None:
        error = None if sent.cancelled() else sent.exception()
        if error is None:
            return
        self._pending.pop(pending.request_id, None)
        if isinstance(error, zmq.Again):
            message = f"request not sent: send queue full, agent at {self.endpoint} unreachable"
        else:
            message = f"request not sent: {error}"
        if not pending.future.done():
            pending.future.set_exception(AgentDisconnected(self.name, message))
            pending.future.exception()  # the caller sees it through the future; mark it retrieved

    def forget(self, pending: PendingReply) -> None:
        """Stop waiting for a reply; if it arrives later it is counted and dropped."""
        self._pending.pop(pending.request_id, None)
        if not pending.future.done():
            pending.future.cancel()

    async def call(self, op: str, timeout_s: float, **fields: Any) -> dict:
        """Send a request and wait at most `timeout_s` for its reply."""
        pending = self.submit(op, **fields)
        return await self.wait(pending, timeout_s)

    async def wait(self, pending: PendingReply, timeout_s: float) -> dict:
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except asyncio.TimeoutError:
            self.forget(pending)
            raise AgentTimeout(self.name, f"{pending.op} timed out after {timeout_s:g} s (agent at {self.endpoint})") from None

    async def info(self, timeout_s: float) -> AgentInfo:
        return AgentInfo.from_reply(self.name, await self.call("info", timeout_s))

    async def ping(self, timeout_s: float) -> float:
        """Return the round-trip time of a `ping` in seconds."""
        start = time.monotonic()
        await self.call("ping", timeout_s)
        return time.monotonic() - start

    async def close_session(self, session: str, timeout_s: float) -> None:
        await self.call("close", timeout_s, session=session)

    # --- background tasks -------------------------------------------------------------

    async def _receive_replies(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv()
            try:
                message = protocol.unpack(frame)
            except protocol.ProtocolError as exc:
                log.warning("expert %s: dropped an undecodable reply: %s", self.name, exc.message)
                continue
            request_id = message.get("id")
            if request_id is None and message.get("ok") is False:
                # An agent rejects a frame it cannot decode (frame_too_large) without
                # echoing the id. It replies in order, so the reply is for the oldest
                # request sent after the last one answered. NOTE: when that request
                # timed out and was forgotten, the error goes to the next pending one.
                request_id = self._oldest_unanswered_id()
            if isinstance(request_id, int):
                self._last_reply_id = max(self._last_reply_id, request_id)
            pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if pending is None:
                self._count_unmatched(request_id, message.get("op"))
                continue
            if pending.future.done():
                continue
            pending.received_at = time.monotonic()
            error = self._reply_error(pending, message)
            if error is None:
                pending.future.set_result(message)
            else:
                pending.future.set_exception(error)

    def _oldest_unanswered_id(self) -> int | None:
        return min((request_id for request_id in self._pending if request_id > self._last_reply_id), default=None)

    def _reply_error(self, pending: PendingReply, message: dict) -> AgentError | None:
        if message.get("v") != protocol.PROTOCOL_VERSION:
            return AgentProtocolError(self.name, f"reply to {pending.op} has protocol version {message.get('v')!r}, expected {protocol.PROTOCOL_VERSION}")
        if message.get("ok") is False:
            error = message.get("error")
            return AgentRemoteError(self.name, pending.op, error if isinstance(error, dict) else {})
        if message.get("ok") is not True:
            return AgentProtocolError(self.name, f"reply to {pending.op} has no boolean 'ok' field")
        return None

    def _count_unmatched(self, request_id: Any, op: Any) -> None:
        # Replies to requests the coordinator gave up on (timeouts) land here. Log the
        # first few and then every 100th, so a slow agent cannot flood the log.
        self._unmatched_replies += 1
        count = self._unmatched_replies
        if count <= 3 or count % 100 == 0:
            log.info("expert %s: dropped a reply to %s request id %r that is no longer awaited (%d so far)",
                     self.name, op, request_id, count)

    async def _watch_connection(self) -> None:
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected = True
                if self.lost:
                    log.info("expert %s: reconnected to %s", self.name, self.endpoint)
                self.lost = False
                log.debug("expert %s: connected to %s", self.name, self.endpoint)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.lost = True
                log.warning("expert %s: connection to %s lost; failing %d pending requests",
                            self.name, self.endpoint, len(self._pending))
                self._fail_pending(lambda: AgentDisconnected(self.name, f"connection to {self.endpoint} lost"))

    def _fail_pending(self, make_error: Any) -> None:
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(make_error())
                item.future.exception()  # a caller may never wait for it; mark it retrieved


# --- vocabulary ---------------------------------------------------------------------------

class Vocabulary:
    """Token pieces as bytes, from an agent's `vocab` reply, for local detokenization."""

    def __init__(self, pieces: bytes, offsets: np.ndarray, attrs: np.ndarray):
        offsets = np.asarray(offsets, dtype=np.int64)
        attrs = np.asarray(attrs, dtype=np.int32)
        if offsets.ndim != 1 or offsets.size < 2:
            raise ValueError(f"vocabulary offsets must list n_tokens + 1 positions, got {offsets.size}")
        if offsets[0] != 0 or offsets[-1] != len(pieces) or np.any(np.diff(offsets) < 0):
            raise ValueError("vocabulary offsets are not increasing from 0 to the length of the pieces")
        if attrs.size != offsets.size - 1:
            raise ValueError(f"vocabulary has {offsets.size - 1} pieces but {attrs.size} attributes")
        self.pieces = bytes(pieces)
        self.offsets = offsets
        self.attrs = attrs

    @property
    def n_tokens(self) -> int:
        return self.attrs.size

    def piece(self, token: int) -> bytes:
        """Return the bytes of `token`; control tokens have none."""
        if self.attrs[token] & TOKEN_ATTR_CONTROL:
            return b""
        return self.pieces[self.offsets[token]:self.offsets[token + 1]]

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)

    @classmethod
    def from_reply(cls, reply: dict) -> Vocabulary:
        pieces = reply.get("pieces")
        if not isinstance(pieces, (bytes, bytearray)):
            raise ValueError("vocab reply field 'pieces' must be binary")
        offsets = protocol.decode_array(reply.get("offsets"), "offsets", "<u4")
        attrs = protocol.decode_array(reply.get("attrs"), "attrs", "<i4")
        return cls(bytes(pieces), offsets, attrs)


class Detokenizer:
    """Turn a token stream into text; a UTF-8 sequence split across tokens is held back."""

    def __init__(self, vocabulary: Vocabulary):
        self._vocabulary = vocabulary
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._vocabulary.piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class VocabularyCache:
    """Vocabularies by tokenizer fingerprint, in memory and, if `directory` is set, on disk."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self._memory: dict[str, Vocabulary] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, client: AgentClient, info: AgentInfo, timeout_s: float) -> Vocabulary:
        """Return the vocabulary of `info`'s fingerprint, fetching it from `client` once.

        Concurrent calls for one fingerprint wait for a single fetch.
        """
        fingerprint = info.tokenizer_fingerprint
        async with self._locks.setdefault(fingerprint, asyncio.Lock()):
            vocabulary = self._memory.get(fingerprint) or self._load(fingerprint, info.n_tokens)
            if vocabulary is None:
                vocabulary = await self._fetch(client, info, timeout_s)
                self._save(fingerprint, vocabulary)
            self._memory[fingerprint] = vocabulary
        if vocabulary.n_tokens != info.n_tokens:
            raise AgentProtocolError(client.name, f"info reports n_tokens {info.n_tokens}, but the vocabulary of "
                                     f"tokenizer {fingerprint} has {vocabulary.n_tokens} tokens")
        return vocabulary

    @staticmethod
    async def _fetch(client: AgentClient, info: AgentInfo, timeout_s: float) -> Vocabulary:
        reply = await client.call("vocab", timeout_s)
        try:
            vocabulary = Vocabulary.from_reply(reply)
        except (ValueError, protocol.ProtocolError) as exc:
            raise AgentProtocolError(client.name, f"invalid vocab reply: {exc}") from None
        if vocabulary.n_tokens != info.n_tokens:
            raise AgentProtocolError(client.name, f"vocab reply has {vocabulary.n_tokens} pieces but info reports n_tokens {info.n_tokens}")
        log.info("expert %s: fetched vocabulary of %d tokens (tokenizer %s)", client.name, vocabulary.n_tokens,
                 info.tokenizer_fingerprint)
        return vocabulary

    def _file(self, fingerprint: str) -> Path:
        assert self.directory is not None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", fingerprint)
        return self.directory / f"vocab-{safe}.npz"

    def _load(self, fingerprint: str, n_tokens: int) -> Vocabulary | None:
        if self.directory is None:
            return None
        path = self._file(fingerprint)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != fingerprint:
                    raise ValueError("stored fingerprint differs")
                vocabulary = Vocabulary(data["pieces"].tobytes(), data["offsets"], data["attrs"])
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("vocabulary cache file %s is unreadable (%s); fetching from the agent", path, exc)
            return None
        if vocabulary.n_tokens != n_tokens:
            log.warning("vocabulary cache file %s has %d tokens, expected %d; fetching from the agent",
                        path, vocabulary.n_tokens, n_tokens)
            return None
        log.debug("loaded vocabulary %s from %s", fingerprint, path)
        return vocabulary

    def _save(self, fingerprint: str, vocabulary: Vocabulary) -> None:
        if self.directory is None:
            return
        path = self._file(fingerprint)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file and rename, so a reader never sees half a file.
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as tmp:
                np.savez(tmp, fingerprint=np.array(fingerprint),
                         pieces=np.frombuffer(vocabulary.pieces, dtype=np.uint8),
                         offsets=vocabulary.offsets, attrs=vocabulary.attrs)
            os.replace(tmp.name, path)
        except OSError as exc:
            log.warning("could not write vocabulary cache file %s: %s", path, exc)
