"""Fused generation against real agents on loopback, with the tiny GGUF.

Agents serve from threads of the test process (`start_agent`), except where a test
kills an agent: those run as `moe2-agent` processes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import pytest
from llama_cpp import Llama

from coordinator.cmd_generate import format_summary
from coordinator.config import Config, parse_config
from coordinator.generate import Coordinator, GenerationError, TokenizerMismatchError
from coordinator.local_agents import AgentSpec, LocalAgents
from coordinator.result import GenerationResult
from gguf_factory import OTHER_WORDS
from zmq_delay_proxy import DelayProxy

PROMPT = "the quick brown fox"
N_TOKENS = 12


def make_config(endpoints: dict[str, str], *, top_k: int | None = None, dist: str = "sparse",
                max_tokens: int = N_TOKENS, temperature: float = 0.0, seed: int = 1,
                step_deadline_s: float = 5.0, step_s: float = 20.0, **sections: dict) -> Config:
    data = {
        "experts": [{"name": name, "endpoint": endpoint} for name, endpoint in endpoints.items()],
        "selection": {"top_k": top_k or len(endpoints)},
        "distribution": {"format": dist},
        "sampling": {"temperature": temperature, "max_tokens": max_tokens, "seed": seed},
        "timeouts": {"handshake_s": 10.0, "open_s": 20.0, "step_deadline_s": step_deadline_s, "step_s": step_s,
                     "close_s": 2.0},
    }
    data.update(sections)
    return parse_config(data)


def generate(config: Config, prompt: str = PROMPT, **options) -> GenerationResult:
    async def run() -> GenerationResult:
        async with Coordinator(config) as coordinator:
            return await coordinator.generate(prompt, **options)

    return asyncio.run(run())


def llama_greedy(model_path: Path, prompt: str, n_tokens: int) -> list[int]:
    """Greedy tokens of llama-cpp-python itself, up to and including EOS."""
    llm = Llama(model_path=str(model_path), n_ctx=512, n_threads=1, verbose=False)
    try:
        prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        tokens = []
        for token in llm.generate(prompt_tokens, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if token == llm.token_eos() or len(tokens) == n_tokens:
                break
        return tokens
    finally:
        llm.close()


@pytest.fixture(scope="module")
def greedy_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """llama-cpp-python's own greedy output on the tiny model, computed once."""
    from gguf_factory import write_tiny_llama

    path = write_tiny_llama(tmp_path_factory.mktemp("reference") / "tiny.gguf")
    return {"tokens": llama_greedy(path, PROMPT, N_TOKENS)}


def served(result: GenerationResult) -> dict[str, int]:
    return result.served_counts


def report(result: GenerationResult, name: str):
    return next(expert for expert in result.experts if expert.name == name)


# --- 1. k = 1 equals the single expert's greedy output ------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("dist", ["sparse", "dense", "dense_prob"])
def test_generate_top1_matches_llama_greedy(start_agent, tiny_model_path, greedy_reference, dist):
    agent = start_agent(tiny_model_path)
    result = generate(make_config({"a": agent.address}, top_k=1, dist=dist))

    assert result.tokens == greedy_reference["tokens"]
    assert len(result.tokens) == N_TOKENS, "the reference should not stop early, or the test checks too little"
    assert result.stop_reason == "max_tokens"
    assert result.stop_text is None
    assert result.max_tokens == N_TOKENS
    assert report(result, "a").weight == 1.0
    assert served(result) == {"a": N_TOKENS}
    assert result.gate_uniform
    assert agent.model.sessions == {}, "the session must be closed after the request"


# --- 2. two agents with the same model, k = 2, equal one of them --------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("dist", ["sparse", "dense", "dense_prob"])
def test_generate_two_identical_experts_match_one(start_agent, tiny_model_path, greedy_reference, dist):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    both = generate(make_config({"a": first.address, "b": second.address}, top_k=2, dist=dist))
    one = generate(make_config({"a": first.address}, top_k=1, dist=dist))

    assert both.tokens == one.tokens
    assert both.text == one.text
    assert both.tokens == greedy_reference["tokens"]
    assert [e.weight for e in both.experts] == [0.5, 0.5]
    assert served(both) == {"a": N_TOKENS, "b": N_TOKENS}
    assert both.events == []


@pytest.mark.timeout(120)
def test_generate_identical_experts_sampling_matches_one(start_agent, tiny_model_path):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    options = {"temperature": 1.0, "seed": 1234}
    both = generate(make_config({"a": first.address, "b": second.address}, **options))
    one = generate(make_config({"a": first.address}, **options))

    assert both.tokens == one.tokens
    assert both.seed == 1234


# --- 3. an agent killed in the middle of a generation --------------------------------------

@pytest.mark.timeout(180)
def test_generate_killed_expert_dropped_others_finish(tiny_model_path, greedy_reference, caplog):
    specs = [AgentSpec(name, tiny_model_path) for name in ("a", "b", "c")]
    with LocalAgents(specs, start_timeout_s=60) as agents:
        config = make_config({agent.name: agent.endpoint for agent in agents.agents}, top_k=3)

        def kill_b_after_token_3(index: int, token: int) -> None:
            if index == 3:
                agents["b"].kill()

        with caplog.at_level(logging.WARNING, logger="moe2"):
            result = generate(config, on_token=kill_b_after_token_3)

    assert result.tokens == greedy_reference["tokens"]
    b = report(result, "b")
    assert b.dropped_at_step == 4
    assert b.drop_reason.startswith("disconnected")
    assert served(result) == {"a": N_TOKENS, "b": 4, "c": N_TOKENS}
    dropped = [e for e in result.events if e.kind == "dropped"]
    assert [(e.expert, e.step) for e in dropped] == [("b", 4)]
    logged = [r.getMessage() for r in caplog.records if "expert b dropped at step 4" in r.getMessage()]
    assert logged, "the drop must be logged"
    assert result.request_id in logged[0]


@pytest.mark.timeout(120)
def test_generate_stopped_agent_fails_fast_next_request(start_agent, tiny_model_path, greedy_reference):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    config = make_config({"a": first.address, "b": second.address}, top_k=2)

    async def two_requests() -> tuple[GenerationResult, GenerationResult]:
        async with Coordinator(config) as coordinator:
            before = await coordinator.generate(PROMPT)
            second.stop()
            # Give the socket monitor time to report the closed connection.
            await asyncio.sleep(1.0)
            after = await coordinator.generate(PROMPT)
            return before, after

    before, after = asyncio.run(two_requests())

    assert before.events == []
    assert after.tokens == greedy_reference["tokens"]
    b = report(after, "b")
    assert b.dropped_at_step == 0
    # "request not sent" shows that the open failed at once, instead of waiting in
    # the queue for timeouts.open_s and being dropped as a timeout.
    assert b.drop_reason.startswith("disconnected: open: request not sent")


# --- 4. an agent that misses the deadline for one step ------------------------------------

@pytest.mark.timeout(120)
def test_generate_stalled_expert_skips_one_step(start_agent, tiny_model_path, greedy_reference):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    with DelayProxy(second.address, hold_step=3, release_on_next_step=False, max_hold_s=60) as proxy:
        config = make_config({"a": first.address, "b": proxy.endpoint}, top_k=2, step_deadline_s=1.0)

        # Release b's reply to step 3 after step 3 was fused without it and before
        # step 4 is sent, so b has caught up when step 4 begins.
        def release_after_token_3(index: int, token: int) -> None:
            if index == 3:
                proxy.release()

        result = generate(config, on_token=release_after_token_3)

    assert proxy.held_replies == [3]
    assert result.tokens == greedy_reference["tokens"]
    assert [(e.expert, e.step, e.kind) for e in result.events] == [("b", 3, "late")]
    b = report(result, "b")
    assert b.late_steps == 1
    assert b.dropped_at_step is None
    # b served every step but step 3, so it rejoined at step 4.
    assert served(result) == {"a": N_TOKENS, "b": N_TOKENS - 1}
    # The held reply was consumed when it arrived: b replied to every step.
    assert b.replies == N_TOKENS
    assert result.late_wait_steps == 1


@pytest.mark.timeout(120)
def test_generate_hung_expert_dropped_after_step_timeout(start_agent, tiny_model_path, greedy_reference):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    with DelayProxy(second.address, hold_step=3, release_on_next_step=False, max_hold_s=60) as proxy:
        config = make_config({"a": first.address, "b": proxy.endpoint}, top_k=2, step_deadline_s=0.2, step_s=1.0)

        # Steps without b take milliseconds, so let the step timeout pass before step 7.
        def pause_after_token_6(index: int, token: int) -> None:
            if index == 6:
                time.sleep(1.1)

        result = generate(config, on_token=pause_after_token_6)

    assert result.tokens == greedy_reference["tokens"]
    b = report(result, "b")
    assert b.dropped_at_step is not None
    assert 3 < b.dropped_at_step <= 7
    assert b.drop_reason.startswith("timeout: no reply to step 3 within 1 s")
    assert b.served_steps == 3
    late = [e for e in result.events if e.expert == "b" and e.kind == "late"]
    assert [e.step for e in late] == list(range(3, b.dropped_at_step))
    assert late[0].detail.startswith("no reply within the deadline of 0.2 s")
    for event in late[1:]:
        assert event.detail.startswith("still owes its reply to step 3"), event
    assert result.late_wait_steps == 1
    assert served(result)["a"] == N_TOKENS


@pytest.mark.timeout(120)
def test_generate_stopped_process_costs_one_deadline(tiny_model_path, greedy_reference):
    specs = [AgentSpec(name, tiny_model_path) for name in ("a", "b")]
    with LocalAgents(specs, start_timeout_s=60) as agents:
        stopped = agents["b"].process
        config = make_config({agent.name: agent.endpoint for agent in agents.agents}, top_k=2,
                             step_deadline_s=2.0, step_s=30.0)

        def stop_b_after_token_3(index: int, token: int) -> None:
            if index == 3:
                stopped.send_signal(signal.SIGSTOP)

        try:
            result = generate(config, on_token=stop_b_after_token_3)
        finally:
            if stopped.poll() is None:
                stopped.send_signal(signal.SIGCONT)

    assert result.tokens == greedy_reference["tokens"]
    b = report(result, "b")
    assert b.dropped_at_step is None
    assert b.served_steps == 4
    late = [e for e in result.events if e.expert == "b" and e.kind == "late"]
    assert [e.step for e in late] == list(range(4, N_TOKENS))
    # Only step 4 waited for b: from step 5 on it owed step 4, so it was not waited for.
    assert late[0].detail.startswith("no reply within the deadline of 2 s")
    for event in late[1:]:
        assert event.detail.startswith("still owes its reply to step 4"), event
    assert result.late_wait_steps == 1
    assert result.late_wait_s > 0
    assert served(result)["a"] == N_TOKENS
    assert "at 1 step that reached the deadline" in format_summary(result)


# --- 5. tokenizer mismatch ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_generate_tokenizer_mismatch_rejected(start_agent, tiny_model_path, tiny_gguf):
    same = start_agent(tiny_model_path)
    other = start_agent(tiny_gguf(words=OTHER_WORDS))
    config = make_config({"a": same.address, "x": other.address})

    with pytest.raises(TokenizerMismatchError) as info:
        generate(config)
    message = str(info.value)
    assert "expert a" in message
    assert "expert x" in message
    assert same.model.vocab.fingerprint in message
    assert other.model.vocab.fingerprint in message
    assert same.model.sessions == {}
    assert other.model.sessions == {}


@pytest.mark.timeout(60)
def test_connect_warns_once_on_name_mismatch(start_agent, tiny_model_path, caplog):
    agent = start_agent(tiny_model_path, name="science")
    config = make_config({"humanities": agent.address}, max_tokens=2)

    async def two_requests() -> None:
        async with Coordinator(config) as coordinator:
            await coordinator.generate(PROMPT)
            await coordinator.generate(PROMPT)

    with caplog.at_level(logging.WARNING, logger="moe2"):
        asyncio.run(two_requests())

    warnings = [r.getMessage() for r in caplog.records if "reports the name" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("expert humanities: ")
    assert "reports the name 'science'" in warnings[0]
    assert "--name humanities" in warnings[0]


@pytest.mark.timeout(60)
def test_generate_padded_vocab_fused(start_agent, tiny_gguf):
    plain = start_agent(tiny_gguf())
    padded = start_agent(tiny_gguf(n_pad=40))
    n_tokens = plain.model.vocab.n_tokens
    assert padded.model.vocab.n_vocab == n_tokens + 40

    for dist in ("sparse", "dense", "dense_prob"):
        result = generate(make_config({"a": plain.address, "p": padded.address}, dist=dist,
                                      temperature=5.0, max_tokens=40), seed=7)
        assert served(result) == {"a": len(result.tokens), "p": len(result.tokens)}
        assert max(result.tokens) < n_tokens


# --- failures and their reports -------------------------------------------------------------

@pytest.mark.timeout(60)
def test_generate_context_overflow_drops_expert(start_agent, tiny_model_path):
    roomy = start_agent(tiny_model_path)
    cramped = start_agent(tiny_model_path, n_ctx=16)
    result = generate(make_config({"a": roomy.address, "small": cramped.address}, max_tokens=20))

    assert len(result.tokens) == 20
    small = report(result, "small")
    assert small.dropped_at_step is not None
    assert "context_overflow" in small.drop_reason
    assert served(result)["a"] == 20


@pytest.mark.timeout(60)
def test_generate_last_expert_lost_fails_listing_events(start_agent, tiny_model_path):
    cramped = start_agent(tiny_model_path, n_ctx=16)
    with pytest.raises(GenerationError) as info:
        generate(make_config({"small": cramped.address}, max_tokens=40))
    assert "every selected expert was dropped" in str(info.value)
    assert "expert small dropped at step" in str(info.value)
    assert "context_overflow" in str(info.value)
    assert [e.kind for e in info.value.events] == ["dropped"]


@pytest.mark.timeout(60)
def test_generate_unreachable_expert_left_out(start_agent, tiny_model_path, greedy_reference):
    agent = start_agent(tiny_model_path)
    # Port 9 (discard) has no listener on loopback, so the handshake times out.
    config = make_config({"a": agent.address, "gone": "tcp://127.0.0.1:9"}, top_k=2,
                         timeouts={"handshake_s": 0.5})
    result = generate(config)

    assert result.tokens == greedy_reference["tokens"]
    assert [e.name for e in result.experts] == ["a"]
    assert [(e.expert, e.kind) for e in result.events] == [("gone", "unavailable")]
    detail = result.events[0].detail
    assert detail.startswith("info timed out after 0.5 s (agent at tcp://127.0.0.1:9)")
    assert "Is moe2-agent running there? The setting timeouts.handshake_s sets the wait" in detail


@pytest.mark.timeout(60)
def test_generate_stop_string_cuts_text(start_agent, tiny_model_path):
    agent = start_agent(tiny_model_path)
    config = make_config({"a": agent.address}, max_tokens=N_TOKENS)
    full = generate(config)
    assert len(full.text) > 4, f"the tiny model's output {full.text!r} is too short to cut"
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    streamed: list[str] = []

    cut = generate(config, stop=[stop], on_text=streamed.append)

    assert cut.stop_reason == "stop"
    assert cut.stop_text == stop
    assert cut.text == full.text[:full.text.index(stop)]
    assert "".join(streamed) == cut.text
    assert len(cut.tokens) <= len(full.tokens)


@pytest.mark.timeout(60)
def test_generate_streamed_text_equals_result(start_agent, tiny_model_path):
    agent = start_agent(tiny_model_path)
    streamed: list[str] = []
    tokens: list[tuple[int, int]] = []
    result = generate(make_config({"a": agent.address}, temperature=0.8), on_text=streamed.append,
                      on_token=lambda index, token: tokens.append((index, token)))

    assert "".join(streamed) == result.text
    assert tokens == list(enumerate(result.tokens))
    assert result.time_to_first_token_s > 0
    assert result.token_latency_mean_s > 0
    assert result.token_latency_p95_s is not None
    assert result.tokens_per_s > 0
    assert result.energy_j is None, "the agents have no energy meter, so energy must be unknown, not 0"
    assert report(result, "a").meter == "none"


@pytest.mark.timeout(60)
def test_connect_default_agent_name_not_warned(start_agent, tiny_model_path, caplog):
    agent = start_agent(tiny_model_path)
    config = make_config({"humanities": agent.address}, max_tokens=2)

    async def one_request() -> None:
        async with Coordinator(config) as coordinator:
            await coordinator.generate(PROMPT)

    with caplog.at_level(logging.INFO, logger="moe2"):
        asyncio.run(one_request())

    records = [r for r in caplog.records if "reports the name" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert f"reports the name '{tiny_model_path.name}'" in records[0].getMessage()


@pytest.mark.timeout(60)
def test_generate_oversized_prompt_reports_frame_too_large(start_agent, tiny_model_path):
    agent = start_agent(tiny_model_path, max_frame_bytes=4096)
    config = make_config({"small": agent.address}, timeouts={"handshake_s": 10.0, "open_s": 30.0})
    # The agent rejects the open frame without decoding it, so its error reply has no request id.
    prompt = "the quick brown fox " * 300

    with pytest.raises(GenerationError) as info:
        generate(config, prompt=prompt)

    assert [e.kind for e in info.value.events] == ["dropped"]
    detail = info.value.events[0].detail
    assert "frame_too_large" in detail
    assert "timed out" not in detail
