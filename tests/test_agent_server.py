"""The agent's ZeroMQ server and the synchronous client, over real sockets on loopback."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from agent import protocol
from agent.client import SPARSE_256, AgentClient, AgentTimeout
from agent.protocol import DENSE, RemoteError

PROMPT = "the quick brown fox"
REPLY_TIMEOUT_MS = 10_000

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def raw_socket():
    """Return a factory: raw_socket(address, kind=zmq.DEALER) -> connected socket, closed at teardown."""
    sockets = []

    def connect(address: str, kind: int = zmq.DEALER) -> zmq.Socket:
        socket = zmq.Context.instance().socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        sockets.append(socket)
        return socket

    yield connect
    for socket in sockets:
        socket.close(linger=0)


def exchange(socket: zmq.Socket, frame: bytes) -> dict:
    socket.send(frame)
    assert socket.poll(REPLY_TIMEOUT_MS), "no reply within 10 s"
    return msgpack.unpackb(socket.recv(), raw=False)


def request(op: str, request_id: int = 7, **fields) -> bytes:
    return msgpack.packb({"v": 1, "op": op, "id": request_id, **fields}, use_bin_type=True)


def tokens_array(values, dtype="<i4") -> dict:
    data = np.asarray(values, dtype=np.dtype(dtype)).tobytes()
    return {"dtype": dtype, "n": len(values), "data": data}


def request_id_of(frame: bytes) -> int | None:
    """Return the integer id in a request frame, or None where the frame has none."""
    try:
        message = msgpack.unpackb(frame, raw=False)
    except ValueError:
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id if isinstance(request_id, int) else None


def greedy(result) -> int:
    return int(np.argmax(result.dist.logprobs))


# --- operations ------------------------------------------------------------------------

def test_info_reports_model_and_limits(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path, n_ctx=48, max_sessions=3)

    info = agent_client(agent.address).info()

    for field in ("name", "model", "model_sha256", "n_vocab", "n_tokens", "tokenizer_fingerprint",
                  "bos_id", "eos_id", "stop_ids", "special_ids", "n_ctx", "max_sessions", "device",
                  "lora", "domain_prompt", "energy_meter", "version", "protocol_version",
                  "max_frame_bytes"):
        assert field in info, field
    assert info["n_ctx"] == 48
    assert info["max_sessions"] == 3
    assert info["protocol_version"] == protocol.PROTOCOL_VERSION
    assert info["model_sha256"] == agent.model.model_sha256
    assert info["lora"] is None
    assert info["domain_prompt"] is None


def test_vocab_pieces_detokenize(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path)
    vocab = agent_client(agent.address).vocab()
    tokens = agent.model.vocab.tokenize(PROMPT, add_special=False)

    assert len(vocab.pieces) == agent.model.vocab.n_tokens
    assert vocab.attrs.shape == (agent.model.vocab.n_tokens,)
    assert vocab.detokenize(tokens) == b" " + PROMPT.encode()
    assert vocab.pieces[1] == b"<s>"
    assert vocab.attrs[1] & 8, "BOS is not marked as a control token"


def test_open_step_close_roundtrip(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path)
    client = agent_client(agent.address)

    first = client.open("s", PROMPT, DENSE)
    second = client.step("s", 1, greedy(first), SPARSE_256)
    client.close_session("s")

    assert first.step == 0
    assert second.step == 1
    assert second.n_past == first.n_past + 1
    assert first.dist.kind == "dense"
    assert first.dist.logprobs.shape == (agent.model.vocab.n_tokens,)
    assert second.dist.kind == "sparse"
    assert second.dist.ids.shape == (256,)
    assert first.compute_s > 0
    assert first.energy_j is None
    assert first.meter == "none"
    assert first.energy["joules"] is None
    with pytest.raises(RemoteError) as raised:
        client.close_session("s")
    assert raised.value.code == protocol.UNKNOWN_SESSION


def test_prompt_as_token_ids(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path)
    client = agent_client(agent.address)
    tokens = agent.model.vocab.tokenize(PROMPT, add_special=True)

    from_text = client.open("text", PROMPT)
    from_ids = client.open("ids", tokens)

    np.testing.assert_array_equal(from_text.dist.logprobs, from_ids.dist.logprobs)


def test_score_matches_model(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path)
    client = agent_client(agent.address)
    continuation = [408, 416, 5]

    scored = client.score(PROMPT, continuation)

    first = client.open("s", PROMPT)
    assert scored.logprobs.shape == (3,)
    assert scored.n_prompt == first.n_past
    assert scored.logprobs[0] == pytest.approx(first.dist.logprobs[408], abs=1e-5)
    assert scored.meter == "none"


def test_ping_returns_agent_clock(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path)

    assert abs(agent_client(agent.address).ping() - time.time()) < 60


# --- limits ----------------------------------------------------------------------------

def test_session_beyond_limit_is_busy(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path, max_sessions=2)
    client = agent_client(agent.address, timeout_s=5)
    client.open("a", PROMPT)
    client.open("b", PROMPT)

    with pytest.raises(RemoteError) as raised:
        client.open("c", PROMPT)

    assert raised.value.code == protocol.BUSY
    assert raised.value.error["max_sessions"] == 2
    client.close_session("a")
    assert client.open("c", PROMPT).step == 0


def test_context_overflow_carries_both_numbers(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path, n_ctx=32)
    client = agent_client(agent.address)

    assert client.open("fits", [5] * 31).n_past == 31
    with pytest.raises(RemoteError) as raised:
        client.open("long", [5] * 32)
    assert raised.value.code == protocol.CONTEXT_OVERFLOW
    assert raised.value.error["n_tokens"] == 32
    assert raised.value.error["n_ctx"] == 32

    assert client.step("fits", 1, 5).n_past == 32
    with pytest.raises(RemoteError) as raised:
        client.step("fits", 2, 5)
    assert raised.value.code == protocol.CONTEXT_OVERFLOW
    assert raised.value.error["n_tokens"] == 33
    assert client.ping() > 0


def test_idle_session_expires(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path, idle_timeout=0.2)
    client = agent_client(agent.address)
    client.open("s", PROMPT)

    time.sleep(1.5)

    with pytest.raises(RemoteError) as raised:
        client.step("s", 1, 5)
    assert raised.value.code == protocol.UNKNOWN_SESSION


# --- bad input -------------------------------------------------------------------------

BAD_REQUESTS = [
    # (name, frame, expected code, expected field)
    ("not msgpack", b"\xc1\xc1\xc1", protocol.BAD_REQUEST, None),
    ("not a map", msgpack.packb([1, 2, 3]), protocol.BAD_REQUEST, None),
    ("wrong version", msgpack.packb({"v": 2, "op": "ping", "id": 1}), protocol.UNSUPPORTED_VERSION, "v"),
    ("missing id", msgpack.packb({"v": 1, "op": "ping"}), protocol.BAD_REQUEST, "id"),
    ("unknown operation", request("generate"), protocol.UNKNOWN_OPERATION, "op"),
    ("unknown field", request("ping", extra=1), protocol.BAD_REQUEST, "extra"),
    ("session not a string", request("open", session=5, prompt="x", format={"kind": "dense"}),
     protocol.BAD_REQUEST, "session"),
    ("empty session", request("open", session="", prompt="x", format={"kind": "dense"}),
     protocol.BAD_REQUEST, "session"),
    ("missing prompt", request("open", session="x", format={"kind": "dense"}), protocol.BAD_REQUEST, "prompt"),
    ("prompt as a list", request("open", session="x", prompt=[1, 2], format={"kind": "dense"}),
     protocol.BAD_REQUEST, "prompt"),
    ("prompt of floats", request("open", session="x", prompt=tokens_array([1.0], "<f4"), format={"kind": "dense"}),
     protocol.BAD_REQUEST, "prompt"),
    ("prompt length mismatch",
     request("open", session="x", prompt={"dtype": "<i4", "n": 3, "data": b"\0" * 8}, format={"kind": "dense"}),
     protocol.BAD_REQUEST, "prompt"),
    ("prompt token out of range", request("open", session="x", prompt=tokens_array([1, 99_999]),
                                          format={"kind": "dense"}), protocol.TOKEN_OUT_OF_RANGE, "prompt"),
    ("unknown format", request("open", session="x", prompt="a", format={"kind": "topk"}),
     protocol.BAD_REQUEST, "format.kind"),
    ("sparse without m", request("open", session="x", prompt="a", format={"kind": "sparse", "m": 0}),
     protocol.BAD_REQUEST, "format.m"),
    ("add_bos not a boolean", request("open", session="x", prompt="a", format={"kind": "dense"}, add_bos="yes"),
     protocol.BAD_REQUEST, "add_bos"),
    ("token as a string", request("step", session="good", step=3, token="5", format={"kind": "dense"}),
     protocol.BAD_REQUEST, "token"),
    ("step as a float", request("step", session="good", step=3.0, token=5, format={"kind": "dense"}),
     protocol.BAD_REQUEST, "step"),
    ("unknown session", request("step", session="nobody", step=1, token=5, format={"kind": "dense"}),
     protocol.UNKNOWN_SESSION, "session"),
    ("duplicate step", request("step", session="good", step=2, token=5, format={"kind": "dense"}),
     protocol.BAD_STEP, "step"),
    ("skipped step", request("step", session="good", step=9, token=5, format={"kind": "dense"}),
     protocol.BAD_STEP, "step"),
    ("token out of range", request("step", session="good", step=3, token=10**6, format={"kind": "dense"}),
     protocol.TOKEN_OUT_OF_RANGE, "token"),
    ("negative token", request("step", session="good", step=3, token=-1, format={"kind": "dense"}),
     protocol.TOKEN_OUT_OF_RANGE, "token"),
    ("open existing session", request("open", session="good", prompt="a", format={"kind": "dense"}),
     protocol.SESSION_EXISTS, "session"),
    ("score without continuation", request("score", prompt="a"), protocol.BAD_REQUEST, "continuation"),
    ("close unknown session", request("close", session="nobody"), protocol.UNKNOWN_SESSION, "session"),
]


def test_bad_requests_get_errors_while_sessions_continue(tiny_model_path, start_agent, agent_client, raw_socket):
    agent = start_agent(tiny_model_path)
    client = agent_client(agent.address)
    raw = raw_socket(agent.address)

    # "good" takes two steps, then every bad request, then two more steps.
    results = [client.open("good", PROMPT)]
    for step in (1, 2):
        results.append(client.step("good", step, greedy(results[-1])))

    for name, frame, code, field in BAD_REQUESTS:
        reply = exchange(raw, frame)
        assert reply["ok"] is False, name
        assert reply["error"]["code"] == code, name
        assert reply["error"]["field"] == field, name
        assert reply["error"]["message"], name
        assert reply["id"] == request_id_of(frame), name

    for step in (3, 4):
        results.append(client.step("good", step, greedy(results[-1])))

    # A session that never saw bad requests gives the same distributions.
    reference = [client.open("reference", PROMPT)]
    for step in range(1, 5):
        reference.append(client.step("reference", step, greedy(reference[-1])))
    for step, (got, expected) in enumerate(zip(results, reference)):
        np.testing.assert_array_equal(got.dist.logprobs, expected.dist.logprobs, err_msg=f"step {step}")


def test_frame_above_limit_is_rejected_before_decoding(tiny_model_path, start_agent, raw_socket, agent_client):
    agent = start_agent(tiny_model_path, max_frame_bytes=4096)
    raw = raw_socket(agent.address)
    # Valid msgpack, so only the size check can reject it.
    frame = request("open", session="big", prompt="a" * 5000, format={"kind": "dense"})

    reply = exchange(raw, frame)

    assert reply["ok"] is False
    assert reply["error"]["code"] == protocol.FRAME_TOO_LARGE
    assert reply["error"]["size"] == len(frame)
    assert reply["error"]["max_frame_bytes"] == 4096
    assert "big" not in agent.model.sessions


def test_frame_above_zmq_limit_is_dropped(tiny_model_path, start_agent, raw_socket, agent_client):
    agent = start_agent(tiny_model_path, max_frame_bytes=4096)
    raw = raw_socket(agent.address)

    raw.send(b"x" * 100_000)

    assert raw.poll(500) == 0, "ZeroMQ should drop the frame and the connection, so no reply comes"
    assert agent_client(agent.address).ping() > 0


def test_req_socket_is_answered(tiny_model_path, start_agent, raw_socket):
    agent = start_agent(tiny_model_path)
    req = raw_socket(agent.address, zmq.REQ)

    reply = exchange(req, request("ping", 3))

    assert reply["ok"] is True
    assert reply["id"] == 3


def test_multipart_request_is_rejected(tiny_model_path, start_agent, raw_socket):
    agent = start_agent(tiny_model_path)
    raw = raw_socket(agent.address)

    raw.send_multipart([request("ping"), request("ping")])

    assert raw.poll(REPLY_TIMEOUT_MS)
    reply = msgpack.unpackb(raw.recv(), raw=False)
    assert reply["ok"] is False
    assert reply["error"]["code"] == protocol.BAD_REQUEST


# --- client ----------------------------------------------------------------------------

@pytest.fixture
def silent_router():
    """A ROUTER on loopback that never replies on its own; yields (socket, address)."""
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind("tcp://127.0.0.1:*")
    yield socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)
    socket.close(linger=0)


def test_client_times_out(silent_router):
    _, address = silent_router
    client = AgentClient(address, timeout_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(AgentTimeout, match="timed out after 0.3 s"):
            client.ping()
        assert time.monotonic() - started >= 0.29
    finally:
        client.close()


def test_client_discards_stale_reply(silent_router):
    router, address = silent_router
    client = AgentClient(address, timeout_s=0.3)
    try:
        with pytest.raises(AgentTimeout):
            client.ping()
        # The reply to the timed-out request arrives late, before the next call.
        identity, frame = router.recv_multipart()
        stale_id = msgpack.unpackb(frame)["id"]
        router.send_multipart([identity, protocol.pack(protocol.reply("ping", stale_id, time=1.0))])

        answered = {}

        def answer_next_request():
            assert router.poll(REPLY_TIMEOUT_MS)
            identity, frame = router.recv_multipart()
            answered["id"] = msgpack.unpackb(frame)["id"]
            router.send_multipart([identity, protocol.pack(protocol.reply("ping", answered["id"], time=2.0))])

        thread = threading.Thread(target=answer_next_request)
        thread.start()
        client.timeout_s = 5.0
        assert client.ping() == 2.0
        thread.join(REPLY_TIMEOUT_MS / 1000)
        assert answered["id"] == stale_id + 1
    finally:
        client.close()
