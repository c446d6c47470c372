"""The dense_prob distribution format: codec, agent, and fused generation.

Tolerance: the agent's probabilities are compared with exp() of its own dense
log-probabilities. Both round the shifted logit to float32, so they agree to a
relative 1e-5 (at most 7e-6 measured on random logits of a 262,144-token vocabulary).
Probabilities below 1e-37 (float32 subnormals, where the relative precision is lost)
are compared to an absolute 1e-37.

Malformed replies come from a real agent whose reply passes through a proxy that
rewrites it.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent import protocol
from agent.protocol import DENSE, DENSE_PROB, DistributionFormat, ProtocolError, decode_distribution
from coordinator.config import Config, parse_config
from coordinator.generate import Coordinator
from coordinator.result import GenerationResult
from zmq_rewrite_proxy import RewriteProxy

PROMPT = "the quick brown fox"
N_TOKENS = 12
RTOL = 1e-5
ATOL = 1e-37

pytestmark = pytest.mark.timeout(120)


def probs_array(values, dtype: str = "<f4") -> dict:
    data = np.asarray(values, dtype=np.dtype(dtype)).tobytes()
    return {"dtype": dtype, "n": len(values), "data": data}


# --- codec ---------------------------------------------------------------------------

def test_format_dense_prob_round_trips():
    fmt = DistributionFormat.from_wire({"kind": "dense_prob"})

    assert fmt == DENSE_PROB
    assert fmt.to_wire() == {"kind": "dense_prob"}


def test_format_dense_prob_unknown_key_rejected():
    with pytest.raises(ProtocolError) as raised:
        DistributionFormat.from_wire({"kind": "dense_prob", "m": 256})

    assert raised.value.code == protocol.BAD_REQUEST
    assert raised.value.field == "format"
    assert "'m'" in raised.value.message


def test_format_unknown_kind_lists_dense_prob():
    with pytest.raises(ProtocolError) as raised:
        DistributionFormat.from_wire({"kind": "probs"})

    assert raised.value.field == "format.kind"
    assert "dense_prob" in raised.value.message


def test_decode_dense_prob_returns_probs():
    values = np.array([0.25, 0.5, 0.25], dtype=np.float32)

    dist = decode_distribution(protocol.encode_dense_prob(values))

    assert dist.kind == "dense_prob"
    assert dist.logprobs is None
    assert dist.probs.dtype == np.float32
    np.testing.assert_array_equal(dist.probs, values)
    np.testing.assert_array_equal(dist.dense_values, values)


MALFORMED_DISTS = [
    # (case, DIST map, field named in the error)
    ("float64 probs", {"kind": "dense_prob", "probs": probs_array([0.5, 0.5], "<f8")}, "dist.probs"),
    ("int32 probs", {"kind": "dense_prob", "probs": probs_array([1, 0], "<i4")}, "dist.probs"),
    ("missing probs", {"kind": "dense_prob"}, "dist.probs"),
    ("logprobs instead of probs", {"kind": "dense_prob", "logprobs": probs_array([0.0])}, "dist.probs"),
    ("probs as a list", {"kind": "dense_prob", "probs": [0.5, 0.5]}, "dist.probs"),
    ("short data", {"kind": "dense_prob", "probs": {"dtype": "<f4", "n": 3, "data": b"\0" * 8}}, "dist.probs"),
]


@pytest.mark.parametrize("case, value, field", MALFORMED_DISTS, ids=[case[0] for case in MALFORMED_DISTS])
def test_decode_malformed_dense_prob_names_field(case, value, field):
    with pytest.raises(ProtocolError) as raised:
        decode_distribution(value)

    assert raised.value.code == protocol.BAD_REQUEST
    assert raised.value.field == field
    assert field in raised.value.message


# --- agent ---------------------------------------------------------------------------

def test_agent_dense_prob_equals_exp_dense(tiny_model_path, start_agent, agent_client):
    agent = start_agent(tiny_model_path)
    client = agent_client(agent.address)
    n_tokens = agent.model.vocab.n_tokens

    dense = client.open("dense", PROMPT, DENSE)
    probs = client.open("probs", PROMPT, DENSE_PROB)
    for step in range(N_TOKENS + 1):
        if step > 0:
            token = int(np.argmax(dense.dist.logprobs))
            dense = client.step("dense", step, token, DENSE)
            probs = client.step("probs", step, token, DENSE_PROB)

        assert probs.dist.kind == "dense_prob", f"step {step}"
        assert probs.dist.probs.dtype == np.float32, f"step {step}"
        assert probs.dist.probs.shape == (n_tokens,), f"step {step}"
        expected = np.exp(dense.dist.logprobs.astype(np.float64))
        np.testing.assert_allclose(probs.dist.probs, expected, rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
        assert probs.dist.probs.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5), f"step {step}"
        assert int(np.argmax(probs.dist.probs)) == int(np.argmax(dense.dist.logprobs)), f"step {step}"

    client.close_session("dense")
    client.close_session("probs")


def test_agent_dense_prob_excludes_padding(tiny_gguf, start_agent, agent_client):
    agent = start_agent(tiny_gguf(n_pad=40))
    client = agent_client(agent.address)

    result = client.open("s", PROMPT, DENSE_PROB)

    assert agent.model.vocab.n_vocab == agent.model.vocab.n_tokens + 40
    assert result.dist.probs.shape == (agent.model.vocab.n_tokens,)
    assert result.dist.probs.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


# --- coordinator ---------------------------------------------------------------------

def make_config(endpoints: dict[str, str], dist: str, top_k: int) -> Config:
    return parse_config({
        "experts": [{"name": name, "endpoint": endpoint} for name, endpoint in endpoints.items()],
        "selection": {"top_k": top_k},
        "distribution": {"format": dist},
        "sampling": {"temperature": 0.0, "max_tokens": N_TOKENS, "seed": 1},
        "timeouts": {"handshake_s": 10.0, "open_s": 20.0, "step_deadline_s": 5.0, "step_s": 20.0, "close_s": 2.0},
    })


def generate(config: Config) -> GenerationResult:
    async def run() -> GenerationResult:
        async with Coordinator(config) as coordinator:
            return await coordinator.generate(PROMPT)

    return asyncio.run(run())


@pytest.mark.parametrize("top_k", [1, 2])
def test_generate_dense_prob_matches_dense(start_agent, tiny_gguf, top_k):
    # Two models with one tokenizer and different weights, so k = 2 fuses two
    # different distributions.
    models = [tiny_gguf(), tiny_gguf(seed=1)][:top_k]
    endpoints = {f"e{i}": start_agent(path).address for i, path in enumerate(models)}

    dense = generate(make_config(endpoints, "dense", top_k))
    probs = generate(make_config(endpoints, "dense_prob", top_k))

    assert probs.tokens == dense.tokens
    assert len(probs.tokens) == N_TOKENS
    assert probs.distribution == {"kind": "dense_prob"}
    assert probs.events == []
    assert probs.served_counts == {name: N_TOKENS for name in endpoints}


def corrupt_step(step: int, change):
    """Return a rewrite that applies `change(dist)` to the DIST of the reply to `step`."""
    def rewrite(reply: dict) -> dict:
        if reply.get("op") != "step" or reply.get("step") != step or not reply.get("ok"):
            return reply
        dist = dict(reply["dist"])
        change(dist)
        return {**reply, "dist": dist}

    return rewrite


def as_float64(dist: dict) -> None:
    probs = np.frombuffer(dist["probs"]["data"], dtype="<f4")
    dist["probs"] = probs_array(probs, "<f8")


def one_short(dist: dict) -> None:
    probs = np.frombuffer(dist["probs"]["data"], dtype="<f4")
    dist["probs"] = probs_array(probs[:-1])


def set_value(index: int, value: float):
    def change(dist: dict) -> None:
        probs = np.frombuffer(dist["probs"]["data"], dtype="<f4").copy()
        probs[index] = value
        dist["probs"] = probs_array(probs)

    return change


def all_zero(dist: dict) -> None:
    dist["probs"] = probs_array(np.zeros(dist["probs"]["n"], dtype=np.float32))


BAD_REPLIES = [
    # (case, change to the DIST, drop kind, words of the drop reason)
    ("float64", as_float64, "protocol", "dist.probs.dtype is '<f8'"),
    ("one entry short", one_short, "protocol", "dense_prob reply to step 2 has"),
    ("NaN", set_value(5, np.nan), "invalid", "probs[1][5] is nan"),
    ("infinity", set_value(5, np.inf), "invalid", "probs[1][5] is inf"),
    ("negative", set_value(7, -0.25), "invalid", "probs[1][7] is -0.25; probabilities must be >= 0"),
    ("all zeros", all_zero, "invalid", "probs[1] has no probability mass"),
]


@pytest.mark.parametrize("case, change, kind, reason", BAD_REPLIES, ids=[case[0] for case in BAD_REPLIES])
def test_generate_malformed_dense_prob_drops_expert(start_agent, tiny_model_path, case, change, kind, reason):
    honest = start_agent(tiny_model_path)
    corrupted = start_agent(tiny_model_path)
    reference = generate(make_config({"a": honest.address}, "dense_prob", 1))

    with RewriteProxy(corrupted.address, corrupt_step(2, change)) as proxy:
        result = generate(make_config({"a": honest.address, "b": proxy.endpoint}, "dense_prob", 2))

    assert proxy.rewritten == 1
    assert result.tokens == reference.tokens
    b = next(expert for expert in result.experts if expert.name == "b")
    assert b.dropped_at_step == 2
    assert b.drop_reason.startswith(f"{kind}: ")
    assert reason in b.drop_reason
    assert result.served_counts == {"a": N_TOKENS, "b": 2}
