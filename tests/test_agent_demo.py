"""The agent on the Gemma 3 270M demo GGUF, compared with llama-cpp-python's own Llama.

Tolerance: both sides run the same llama.cpp kernels with flash attention off, so the
log-probabilities agree to float32 rounding. The tests allow 1e-4 (measured: 3e-6).

llama.cpp's CPU kernels for this Q4_K_M model depend on how many tokens one decode call
takes: the same prompt decoded in one call or in two parts gives logits that differ by
up to 3 nats on single tokens. So every reference here splits the tokens into decode
calls exactly as the agent does.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from agent.client import SPARSE_256
from agent.protocol import DENSE

PROMPT = "The capital of France is"
TOLERANCE = 1e-4
N_GREEDY = 20

pytestmark = [pytest.mark.demo_model, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def reference(demo_model_path):
    """llama-cpp-python's Llama on the demo model, flash attention off like the agents here."""
    llm = llama_cpp.Llama(str(demo_model_path), n_ctx=256, logits_all=True, verbose=False,
                          n_threads=1, flash_attn=False)
    yield llm
    llm.close()


def test_demo_distribution_matches_logits_all(demo_model_path, reference, start_agent, agent_client):
    agent = start_agent(demo_model_path, n_ctx=256, max_sessions=2, flash_attn="off")
    client = agent_client(agent.address, timeout_s=60)
    tokens = reference.tokenize(PROMPT.encode(), special=True)
    reference.reset()
    reference.eval(tokens)
    logits = np.array(reference.scores[len(tokens) - 1], dtype=np.float64)
    expected = logits - logits.max()
    expected -= np.log(np.exp(expected).sum())

    first = client.open("s", PROMPT, DENSE)

    assert first.n_past == len(tokens)
    assert first.dist.logprobs.shape == (262_144,)
    assert np.abs(first.dist.logprobs - expected).max() < TOLERANCE
    assert first.dist.logprobs.std() > 1.0, "distribution is (nearly) constant: logits were not read"
    assert int(np.argmax(first.dist.logprobs)) == int(np.argmax(logits))


def test_demo_greedy_matches_llama_generate(demo_model_path, reference, start_agent, agent_client):
    agent = start_agent(demo_model_path, n_ctx=256, max_sessions=2, flash_attn="off")
    client = agent_client(agent.address, timeout_s=60)
    tokens = reference.tokenize(PROMPT.encode(), special=True)
    reference.reset()
    expected = []
    for token in reference.generate(tokens, temp=0.0, repeat_penalty=1.0):
        expected.append(token)
        if len(expected) == N_GREEDY:
            break

    generated = []
    result = client.open("s", PROMPT, SPARSE_256)
    first_logprobs = result.dist.logprobs
    for step in range(1, N_GREEDY + 1):
        token = int(result.dist.ids[0])
        generated.append(token)
        result = client.step("s", step, token, SPARSE_256)

    assert generated == expected
    vocab = client.vocab()
    assert vocab.detokenize(generated) == reference.detokenize(expected)

    scored = client.score(PROMPT, generated[:3])
    assert scored.logprobs[0] == pytest.approx(float(first_logprobs[0]), abs=1e-6)


def test_demo_domain_prompt_matches_split_reference(demo_model_path, reference, start_agent, agent_client,
                                                     tmp_path):
    domain = tmp_path / "domain.txt"
    domain.write_text("You are a geography tutor. Answer briefly.\n", encoding="utf-8")
    agent = start_agent(demo_model_path, n_ctx=256, max_sessions=2, flash_attn="off", domain_prompt=domain)
    client = agent_client(agent.address, timeout_s=60)
    domain_tokens = reference.tokenize(domain.read_bytes(), add_bos=True, special=True)
    prompt_tokens = reference.tokenize(PROMPT.encode(), add_bos=False, special=True)
    # One decode call for the domain prompt, one for the prompt, one per step, as in the agent.
    reference.reset()
    reference.eval(domain_tokens)
    reference.eval(prompt_tokens)
    reference.eval([506])
    n_context = len(domain_tokens) + len(prompt_tokens)
    logits = np.array(reference.scores[n_context - 1:n_context + 1], dtype=np.float64)
    expected = logits - logits.max(axis=1, keepdims=True)
    expected -= np.log(np.exp(expected).sum(axis=1, keepdims=True))

    for session in ("first", "second"):
        opened = client.open(session, PROMPT, DENSE)
        assert opened.n_past == n_context
        assert np.abs(opened.dist.logprobs - expected[0]).max() < TOLERANCE, session
    stepped = client.step("second", 1, 506, DENSE)

    assert np.abs(stepped.dist.logprobs - expected[1]).max() < TOLERANCE
    assert client.info()["domain_prompt"]["n_tokens"] == len(domain_tokens)
