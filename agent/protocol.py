"""MoE² wire protocol, version 1, shared by agents and the coordinator.

Transport: each agent binds a ZeroMQ ROUTER socket; a client connects a DEALER socket
and sends one frame per request (no empty delimiter frame). Every request and reply is
one msgpack map:

    request: {"v": 1, "op": OP, "id": REQUEST_ID, ...fields of OP}
    reply:   {"v": 1, "op": OP, "id": REQUEST_ID, "ok": True, ...result fields}
    error:   {"v": 1, "op": OP, "id": REQUEST_ID, "ok": False,
              "error": {"code": CODE, "message": TEXT, "field": NAME or None, ...}}

Arrays travel as raw little-endian bytes, never as per-element msgpack lists:

    {"dtype": "<f4" | "<i4" | "<u4", "n": LENGTH, "data": BIN}

Operations and their fields (every field listed is required unless marked optional):

    info   -> model, vocabulary, limits and meter of the agent (fields listed in
              agent/server.py, `AgentServer.info_fields`)
    vocab  -> {"pieces": BIN, "offsets": ARRAY <u4 of n_tokens + 1, "attrs": ARRAY <i4}
    open   {"session": STR, "prompt": STR or ARRAY <i4 of token ids,
            "format": FORMAT, optional "add_bos": BOOL (default true, text prompts only)}
           -> DISTRIBUTION with "step": 0
    step   {"session": STR, "step": INT >= 1, "token": INT, "format": FORMAT}
           -> DISTRIBUTION with "step" echoed
    close  {"session": STR} -> {}
    score  {"prompt": STR or ARRAY <i4, "continuation": ARRAY <i4, optional "add_bos"}
           -> {"logprobs": ARRAY <f4 (one per continuation token),
               "n_prompt": INT tokens before the continuation, domain prompt included,
               "compute_s", "energy_j", "meter", "energy" as in DISTRIBUTION}
    ping   -> {"time": FLOAT unix seconds}

    FORMAT = {"kind": "dense"} | {"kind": "dense_prob"} | {"kind": "sparse", "m": INT >= 1}
    DISTRIBUTION = {"step": INT, "n_past": INT, "dist": DIST,
                    "compute_s": FLOAT, "energy_j": FLOAT or None, "meter": STR,
                    "energy": ENERGY RECORD MAP or None}
    DIST = {"kind": "dense", "logprobs": ARRAY <f4 of n_tokens}
         | {"kind": "dense_prob", "probs": ARRAY <f4 of n_tokens}
         | {"kind": "sparse", "ids": ARRAY <i4 of m, "logprobs": ARRAY <f4 of m,
            "tail": FLOAT probability mass outside the m ids}

Step numbers: `open` returns the distribution for step 0 (the token after the prompt).
The token sampled from it is sent as step 1, and so on: step s carries the s-th
generated token and returns the distribution of token s + 1. A step whose number is
not the session's next number is rejected with `bad_step`, so a duplicate or
reordered step never corrupts the KV cache.

Dense distributions cover the real tokens only (`n_tokens` of `info`); ids at or above
it are padding in the GGUF and have probability 0. `dense` carries log-probabilities
and `dense_prob` probabilities, which sum to 1 within float32 rounding. Both take
4 bytes per token, and the coordinator fuses probabilities without computing exp().
`dense_prob` was added to version 1 without changing the other messages. An agent
that predates it rejects the format with `bad_request` naming the field `format.kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

OPERATIONS = ("info", "vocab", "open", "step", "close", "score", "ping")

# Error codes carried in error replies.
BAD_REQUEST = "bad_request"          # malformed frame, wrong type, missing field
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_OPERATION = "unknown_operation"
UNKNOWN_SESSION = "unknown_session"
SESSION_EXISTS = "session_exists"
BAD_STEP = "bad_step"                # step number is not the session's next one
TOKEN_OUT_OF_RANGE = "token_out_of_range"
CONTEXT_OVERFLOW = "context_overflow"
BUSY = "busy"                        # all session slots are in use
FRAME_TOO_LARGE = "frame_too_large"
INTERNAL = "internal"                # an unexpected failure inside the agent

ERROR_CODES = (BAD_REQUEST, UNSUPPORTED_VERSION, UNKNOWN_OPERATION, UNKNOWN_SESSION,
               SESSION_EXISTS, BAD_STEP, TOKEN_OUT_OF_RANGE, CONTEXT_OVERFLOW, BUSY,
               FRAME_TOO_LARGE, INTERNAL)

_ARRAY_DTYPES = {"<f4": np.dtype("<f4"), "<i4": np.dtype("<i4"), "<u4": np.dtype("<u4"),
                 "<f8": np.dtype("<f8")}


class ProtocolError(Exception):
    """A message that violates the protocol; becomes an error reply naming the field."""

    def __init__(self, code: str, message: str, field: str | None = None, **details: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.details = details

    def to_error(self) -> dict:
        error = {"code": self.code, "message": self.message, "field": self.field}
        error.update(self.details)
        return error


class RemoteError(Exception):
    """An error reply received from an agent."""

    def __init__(self, error: dict, op: str | None = None):
        self.code = str(error.get("code", INTERNAL))
        self.message = str(error.get("message", ""))
        self.field = error.get("field")
        self.error = error
        self.op = op
        where = f" (field {self.field})" if self.field else ""
        super().__init__(f"{op or 'request'} failed: {self.code}: {self.message}{where}")


# --- arrays -------------------------------------------------------------------------

def encode_array(values: np.ndarray, dtype: str) -> dict:
    """Pack a 1-D array as raw little-endian bytes with dtype and length."""
    array = np.ascontiguousarray(values, dtype=_ARRAY_DTYPES[dtype]).reshape(-1)
    return {"dtype": dtype, "n": int(array.size), "data": array.tobytes()}


def decode_array(value: Any, field: str, dtype: str | tuple[str, ...] | None = None) -> np.ndarray:
    """Unpack an array map, checking dtype and that the byte length matches `n`.

    Returns a read-only view over the received bytes (no copy).
    """
    if not isinstance(value, dict):
        raise ProtocolError(BAD_REQUEST, f"{field} must be an array map with dtype, n and data", field)
    kind = value.get("dtype")
    if kind not in _ARRAY_DTYPES:
        raise ProtocolError(BAD_REQUEST, f"{field}.dtype {kind!r} is not one of {sorted(_ARRAY_DTYPES)}", field)
    allowed = (dtype,) if isinstance(dtype, str) else dtype
    if allowed is not None and kind not in allowed:
        raise ProtocolError(BAD_REQUEST, f"{field}.dtype is {kind!r}, expected {' or '.join(allowed)}", field)
    n = value.get("n")
    data = value.get("data")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ProtocolError(BAD_REQUEST, f"{field}.n must be a non-negative integer, got {n!r}", field)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_REQUEST, f"{field}.data must be binary", field)
    item = _ARRAY_DTYPES[kind].itemsize
    if len(data) != n * item:
        raise ProtocolError(BAD_REQUEST, f"{field}.data has {len(data)} bytes, expected n * {item} = {n * item}", field)
    return np.frombuffer(data, dtype=_ARRAY_DTYPES[kind])


# --- frames -------------------------------------------------------------------------

def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> dict:
    """Decode one frame into a message map, or raise ProtocolError(bad_request)."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise ProtocolError(BAD_REQUEST, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_REQUEST, f"frame must be a msgpack map, got {type(message).__name__}")
    return message


def request(op: str, request_id: int, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "op": op, "id": request_id, **fields}


def reply(op: str, request_id: Any, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "op": op, "id": request_id, "ok": True, **fields}


def error_reply(op: str | None, request_id: Any, error: ProtocolError) -> dict:
    return {"v": PROTOCOL_VERSION, "op": op, "id": request_id, "ok": False, "error": error.to_error()}


def check_header(message: dict) -> tuple[str, int]:
    """Validate version, operation and request id; return (op, id)."""
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {version!r} is not supported; this agent speaks {PROTOCOL_VERSION}", "v")
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(BAD_REQUEST, f"id must be an integer, got {request_id!r}", "id")
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, f"op must be a string, got {op!r}", "op")
    if op not in OPERATIONS:
        raise ProtocolError(UNKNOWN_OPERATION, f"unknown operation {op!r}; supported: {', '.join(OPERATIONS)}", "op")
    return op, request_id


def check_fields(message: dict, allowed: set[str]) -> None:
    """Reject fields outside `allowed` (plus the header), naming the first unknown one."""
    for key in message:
        if key not in allowed and key not in ("v", "op", "id"):
            raise ProtocolError(BAD_REQUEST, f"unknown field {key!r}", str(key))


def require(message: dict, field: str, kind: type | tuple[type, ...]) -> Any:
    """Return message[field], checking presence and type (bool is never an int here)."""
    if field not in message:
        raise ProtocolError(BAD_REQUEST, f"missing field {field!r}", field)
    value = message[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(BAD_REQUEST, f"{field} must be {_type_names(kinds)}, got a boolean", field)
    if not isinstance(value, kinds):
        raise ProtocolError(BAD_REQUEST, f"{field} must be {_type_names(kinds)}, got {type(value).__name__}", field)
    return value


def _type_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "a map",
             bool: "a boolean", bytes: "binary", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# --- distribution formats ------------------------------------------------------------

FORMAT_KINDS = ("dense", "dense_prob", "sparse")
DENSE_KINDS = ("dense", "dense_prob")


@dataclass(frozen=True)
class DistributionFormat:
    kind: str          # one of FORMAT_KINDS
    m: int = 0         # top-m size for sparse

    def to_wire(self) -> dict:
        return {"kind": "sparse", "m": self.m} if self.kind == "sparse" else {"kind": self.kind}

    @classmethod
    def from_wire(cls, value: Any, field: str = "format") -> DistributionFormat:
        if not isinstance(value, dict):
            raise ProtocolError(BAD_REQUEST, f"{field} must be a map like {{'kind': 'dense'}}, "
                                "{'kind': 'dense_prob'} or {'kind': 'sparse', 'm': 256}", field)
        kind = value.get("kind")
        if kind in DENSE_KINDS:
            extra = set(value) - {"kind"}
            if extra:
                raise ProtocolError(BAD_REQUEST, f"{field} has unknown key {sorted(extra)[0]!r}", field)
            return cls(kind)
        if kind == "sparse":
            extra = set(value) - {"kind", "m"}
            if extra:
                raise ProtocolError(BAD_REQUEST, f"{field} has unknown key {sorted(extra)[0]!r}", field)
            m = value.get("m")
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise ProtocolError(BAD_REQUEST, f"{field}.m must be a positive integer, got {m!r}", f"{field}.m")
            return cls("sparse", m)
        raise ProtocolError(BAD_REQUEST, f"{field}.kind must be 'dense', 'dense_prob' or 'sparse', "
                            f"got {kind!r}", f"{field}.kind")


DENSE = DistributionFormat("dense")
DENSE_PROB = DistributionFormat("dense_prob")


def encode_dense(logprobs: np.ndarray) -> dict:
    return {"kind": "dense", "logprobs": encode_array(logprobs, "<f4")}


def encode_dense_prob(probs: np.ndarray) -> dict:
    return {"kind": "dense_prob", "probs": encode_array(probs, "<f4")}


def encode_sparse(ids: np.ndarray, logprobs: np.ndarray, tail: float) -> dict:
    return {"kind": "sparse", "ids": encode_array(ids, "<i4"),
            "logprobs": encode_array(logprobs, "<f4"), "tail": float(tail)}


@dataclass(frozen=True)
class Distribution:
    """A decoded next-token distribution: dense log-probabilities, dense probabilities or
    a sparse top-m."""

    kind: str                            # one of FORMAT_KINDS
    logprobs: np.ndarray | None          # float32; dense: n_tokens, sparse: m, dense_prob: None
    ids: np.ndarray | None = None        # int32, sparse only
    tail: float = 0.0                    # probability mass outside `ids`, sparse only
    probs: np.ndarray | None = None      # float32 of n_tokens, dense_prob only

    @property
    def dense_values(self) -> np.ndarray | None:
        """The n_tokens array of a dense kind (log-probabilities or probabilities), else None."""
        if self.kind == "dense_prob":
            return self.probs
        return self.logprobs if self.kind == "dense" else None


def decode_distribution(value: Any, field: str = "dist") -> Distribution:
    """Decode a DIST map, checking its kind, dtypes and the sparse lengths.

    The length of a dense array and the values themselves are not checked here: the
    caller knows n_tokens, and the fusion kernel rejects NaN and infinite values and
    negative probabilities.
    """
    if not isinstance(value, dict):
        raise ProtocolError(BAD_REQUEST, f"{field} must be a map", field)
    kind = value.get("kind")
    if kind == "dense":
        return Distribution("dense", decode_array(value.get("logprobs"), f"{field}.logprobs", "<f4"))
    if kind == "dense_prob":
        probs = decode_array(value.get("probs"), f"{field}.probs", "<f4")
        return Distribution("dense_prob", None, probs=probs)
    if kind == "sparse":
        ids = decode_array(value.get("ids"), f"{field}.ids", "<i4")
        logprobs = decode_array(value.get("logprobs"), f"{field}.logprobs", "<f4")
        if ids.size != logprobs.size:
            raise ProtocolError(BAD_REQUEST, f"{field}.ids has {ids.size} entries but {field}.logprobs has {logprobs.size}", field)
        tail = value.get("tail")
        if not isinstance(tail, (int, float)) or isinstance(tail, bool):
            raise ProtocolError(BAD_REQUEST, f"{field}.tail must be a number, got {tail!r}", f"{field}.tail")
        return Distribution("sparse", logprobs, ids, float(tail))
    raise ProtocolError(BAD_REQUEST, f"{field}.kind must be 'dense', 'dense_prob' or 'sparse', "
                        f"got {kind!r}", f"{field}.kind")
