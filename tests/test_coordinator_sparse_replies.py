"""Malformed sparse replies from a real agent, rewritten on the wire by a proxy."""

from __future__ import annotations

import numpy as np
import pytest

from test_dense_prob import N_TOKENS, corrupt_step, generate, make_config
from zmq_rewrite_proxy import RewriteProxy

pytestmark = pytest.mark.timeout(120)


def empty_list(dist: dict) -> None:
    empty = np.zeros(0, dtype="<i4")
    dist["ids"] = {"dtype": "<i4", "n": 0, "data": empty.tobytes()}
    dist["logprobs"] = {"dtype": "<f4", "n": 0, "data": empty.astype("<f4").tobytes()}
    dist["tail"] = 1.0


def test_generate_empty_sparse_reply_drops_expert(start_agent, tiny_model_path):
    honest = start_agent(tiny_model_path)
    corrupted = start_agent(tiny_model_path)
    reference = generate(make_config({"a": honest.address}, "sparse", 1))

    with RewriteProxy(corrupted.address, corrupt_step(2, empty_list)) as proxy:
        result = generate(make_config({"a": honest.address, "b": proxy.endpoint}, "sparse", 2))

    assert proxy.rewritten == 1
    assert result.tokens == reference.tokens
    b = next(expert for expert in result.experts if expert.name == "b")
    assert b.dropped_at_step == 2
    assert b.drop_reason.startswith("protocol: ")
    assert "lists no token ids" in b.drop_reason
    assert result.served_counts == {"a": N_TOKENS, "b": 2}
