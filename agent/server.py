"""The agent's ZeroMQ ROUTER server: one request at a time, a reply to every request.

A client's DEALER sends one frame per request (a REQ socket's empty delimiter frame is
accepted too and echoed back). The server checks the frame size before decoding:

- frames above `max_frame_bytes` get a `frame_too_large` error reply without being
  decoded;
- frames above ZMQ_MAXMSGSIZE (`HARD_LIMIT_FACTOR` times larger) are dropped by ZeroMQ,
  which disconnects the peer without reading the frame into memory, so no reply
  can be sent.

Every other request gets exactly one reply. Invalid requests get an error reply that
names the field, and the server goes on serving the other sessions. An unexpected
exception inside an operation is logged with its traceback and gets an `internal`
error reply.

The loop polls with a short timeout, so `stop()` (from a signal handler or another
thread) ends it within `POLL_INTERVAL_S`. Idle sessions are expired from the same loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from agent import __version__, protocol
from agent.config import AgentConfig
from agent.model import ExpertModel, Measured, ModelError
from agent.protocol import DistributionFormat, ProtocolError

log = logging.getLogger("moe2.agent.server")

POLL_INTERVAL_S = 0.1
EXPIRY_INTERVAL_S = 1.0
HARD_LIMIT_FACTOR = 4
MAX_SESSION_ID_LENGTH = 256


class RateLimitedLog:
    """Log at most `burst` messages per `interval_s`, then count the rest."""

    def __init__(self, logger: logging.Logger, level: int, burst: int = 10, interval_s: float = 60.0):
        self._logger = logger
        self._level = level
        self._burst = burst
        self._interval_s = interval_s
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._interval_s:
            if self._suppressed:
                self._logger.log(self._level, "%d similar messages suppressed in the last %.0f s",
                                 self._suppressed, self._interval_s)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < self._burst:
            self._logged += 1
            self._logger.log(self._level, message, *args)
        else:
            self._suppressed += 1


class AgentServer:
    """Serve one ExpertModel on a ROUTER socket bound to `config.bind`.

    The socket is bound at construction, so a taken address fails before a large model
    loads. `model` may be set after construction, and must be set before serving.
    """

    def __init__(self, config: AgentConfig, model: ExpertModel | None = None, *,
                 context: zmq.Context | None = None):
        self.config = config
        self.model = model
        self._stop = threading.Event()
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, config.max_frame_bytes * HARD_LIMIT_FACTOR)
        self._socket.bind(config.bind)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._log_rejected = RateLimitedLog(log, logging.WARNING)
        self._handlers: dict[str, Callable[[dict], dict]] = {
            "info": self._info, "vocab": self._vocab, "open": self._open, "step": self._step,
            "close": self._close, "score": self._score, "ping": self._ping,
        }
        if not config.is_loopback:
            log.warning("listening on %s: traffic is unauthenticated and unencrypted, so anyone who "
                        "can reach this address can use the expert; bind to 127.0.0.1 unless the "
                        "network is trusted", self.endpoint)

    # --- loop ------------------------------------------------------------------------

    def serve_forever(self, on_tick: Callable[[], None] | None = None) -> None:
        """Serve until `stop()`; `on_tick` runs about every POLL_INTERVAL_S (for watchdogs)."""
        if self.model is None:
            raise RuntimeError("AgentServer.serve_forever needs a model: set server.model first")
        log.info("serving %s on %s", self.config.expert_name, self.endpoint)
        next_expiry = time.monotonic() + EXPIRY_INTERVAL_S
        while not self._stop.is_set():
            if self._socket.poll(int(POLL_INTERVAL_S * 1000), zmq.POLLIN):
                self.serve_one()
            now = time.monotonic()
            if now >= next_expiry:
                self.model.expire_idle(self.config.idle_timeout)
                next_expiry = now + EXPIRY_INTERVAL_S
            if on_tick is not None:
                on_tick()
        log.info("stopped serving on %s", self.endpoint)

    def serve_one(self) -> None:
        """Receive one message (it must be waiting) and send its reply."""
        frames = self._socket.recv_multipart(copy=False)
        identity = frames[0].bytes
        envelope = [identity]
        body = frames[1:]
        if len(body) == 2 and len(body[0]) == 0:
            envelope.append(b"")           # REQ socket: empty delimiter frame
            body = body[1:]
        if len(body) != 1:
            error = ProtocolError(protocol.BAD_REQUEST, f"expected one frame per request, got {len(body)}")
            self._log_rejected("rejected a message of %d frames", len(body))
            reply = protocol.error_reply(None, None, error)
        else:
            reply = self.handle(body[0].buffer)
        self._socket.send_multipart([*envelope, protocol.pack(reply)], copy=False)

    def stop(self) -> None:
        """Ask the loop to end; safe from signal handlers and other threads."""
        self._stop.set()

    def close(self) -> None:
        self._socket.close(linger=0)

    # --- dispatch --------------------------------------------------------------------

    def handle(self, frame: bytes | memoryview) -> dict:
        """Return the reply map for one request frame.

        Every Exception becomes an error reply, so one bad request never stops the server.
        """
        op: str | None = None
        request_id: Any = None
        try:
            if len(frame) > self.config.max_frame_bytes:
                raise ProtocolError(protocol.FRAME_TOO_LARGE,
                                    f"frame of {len(frame)} bytes exceeds max_frame_bytes "
                                    f"{self.config.max_frame_bytes}; send fewer tokens per request",
                                    None, size=len(frame), max_frame_bytes=self.config.max_frame_bytes)
            message = protocol.unpack(frame)
            # Echo what we can of the header even when it turns out invalid.
            op = message.get("op") if isinstance(message.get("op"), str) else None
            request_id = message.get("id") if isinstance(message.get("id"), int) else None
            op, request_id = protocol.check_header(message)
            return protocol.reply(op, request_id, **self._handlers[op](message))
        except ProtocolError as error:
            self._log_rejected("rejected %s request id=%r: %s: %s (field %s)",
                               op or "a", request_id, error.code, error.message, error.field)
            return protocol.error_reply(op, request_id, error)
        except ModelError as exc:
            log.error("%s request id=%r failed in llama.cpp: %s", op, request_id, exc)
            return protocol.error_reply(op, request_id, ProtocolError(protocol.INTERNAL, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a service answers every request and keeps serving
            log.exception("%s request id=%r failed unexpectedly", op, request_id)
            error = ProtocolError(protocol.INTERNAL, f"unexpected {type(exc).__name__}: {exc}")
            return protocol.error_reply(op, request_id, error)

    # --- operations ------------------------------------------------------------------

    def info_fields(self) -> dict:
        """Return the fields of an `info` reply.

        name, model (GGUF general.name), model_file, model_sha256, model_desc, n_params;
        n_vocab, n_tokens (real tokens), vocab_type, tokenizer_fingerprint, bos_id,
        eos_id, eot_id, special_ids, stop_ids, add_bos; n_ctx (per session, domain
        prompt included), n_ctx_train, max_sessions, open_sessions; device ("cpu" or
        "gpu"), n_gpu_layers, n_threads, flash_attn; lora (file, sha256, scale) and
        domain_prompt (sha256, n_tokens), each None when absent; energy_meter (name,
        method, update_interval_s); llama_cpp_python, version, protocol_version,
        max_frame_bytes, idle_timeout (seconds) and endpoint.
        """
        return {**self.model.info(), "version": __version__, "protocol_version": protocol.PROTOCOL_VERSION,
                "max_frame_bytes": self.config.max_frame_bytes, "idle_timeout": self.config.idle_timeout,
                "endpoint": self.endpoint}

    def _info(self, message: dict) -> dict:
        protocol.check_fields(message, set())
        return self.info_fields()

    def _vocab(self, message: dict) -> dict:
        protocol.check_fields(message, set())
        return self.model.vocab.vocab_reply_fields()

    def _open(self, message: dict) -> dict:
        protocol.check_fields(message, {"session", "prompt", "format", "add_bos"})
        session_id = _session_id(message)
        prompt = _prompt(message)
        fmt = DistributionFormat.from_wire(protocol.require(message, "format", dict))
        add_bos = _optional_bool(message, "add_bos", True)
        measured = self.model.open(session_id, prompt, fmt, add_bos)
        return _distribution_fields(measured)

    def _step(self, message: dict) -> dict:
        protocol.check_fields(message, {"session", "step", "token", "format"})
        session_id = _session_id(message)
        step = protocol.require(message, "step", int)
        token = protocol.require(message, "token", int)
        fmt = DistributionFormat.from_wire(protocol.require(message, "format", dict))
        measured = self.model.step(session_id, step, token, fmt)
        return _distribution_fields(measured)

    def _close(self, message: dict) -> dict:
        protocol.check_fields(message, {"session"})
        self.model.close_session(_session_id(message))
        return {}

    def _score(self, message: dict) -> dict:
        protocol.check_fields(message, {"prompt", "continuation", "add_bos"})
        prompt = _prompt(message)
        continuation = protocol.decode_array(protocol.require(message, "continuation", dict),
                                             "continuation", "<i4")
        add_bos = _optional_bool(message, "add_bos", True)
        measured = self.model.score(prompt, continuation, add_bos)
        logprobs, n_prompt = measured.value
        return {"logprobs": protocol.encode_array(logprobs, "<f4"), "n_prompt": n_prompt,
                **_cost_fields(measured)}

    def _ping(self, message: dict) -> dict:
        protocol.check_fields(message, set())
        return {"time": time.time()}


def _session_id(message: dict) -> str:
    session_id = protocol.require(message, "session", str)
    if not 0 < len(session_id) <= MAX_SESSION_ID_LENGTH:
        raise ProtocolError(protocol.BAD_REQUEST, f"session must be 1 to {MAX_SESSION_ID_LENGTH} "
                            f"characters, got {len(session_id)}", "session")
    return session_id


def _prompt(message: dict) -> str | np.ndarray:
    prompt = protocol.require(message, "prompt", (str, dict))
    if isinstance(prompt, str):
        return prompt
    return protocol.decode_array(prompt, "prompt", "<i4")


def _optional_bool(message: dict, field: str, default: bool) -> bool:
    if field not in message:
        return default
    return protocol.require(message, field, bool)


def _cost_fields(measured: Measured) -> dict:
    record = measured.energy
    return {"compute_s": measured.compute_s, "energy_j": record.joules, "meter": record.meter,
            "energy": record.to_wire()}


def _distribution_fields(measured: Measured) -> dict:
    session, dist = measured.value
    return {"step": session.next_step - 1, "n_past": session.n_past, "dist": dist, **_cost_fields(measured)}
