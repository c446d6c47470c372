"""Coordinator building blocks: top-k selection, stop strings, detokenization, the
vocabulary cache and the agent client, the last two against real agents on loopback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from agent import protocol
from agent.protocol import DistributionFormat
from coordinator.client import (AgentClient, AgentDisconnected, AgentRemoteError, AgentTimeout, PendingReply,
                                Vocabulary, VocabularyCache)
from coordinator.cmd_generate import format_summary
from coordinator.config import TimeoutConfig
from coordinator.generate import TokenizerMismatchError, check_fingerprints, select_top_k
from coordinator.result import GenerationResult, StepTimings, StopMatcher
from coordinator.steps import OwedReply, Participant, StepExchange, StepReplies


# --- selection ---------------------------------------------------------------------------

def test_select_top_k_orders_by_gate():
    assert select_top_k(["a", "b", "c", "d"], [0.1, 0.4, 0.2, 0.3], 2) == [1, 3]


def test_select_top_k_ties_go_to_earlier_expert():
    assert select_top_k(["a", "b", "c", "d"], [0.25, 0.25, 0.25, 0.25], 3) == [0, 1, 2]
    assert select_top_k(["a", "b", "c"], [0.2, 0.4, 0.4], 1) == [1]


def test_check_fingerprints_names_both_experts():
    check_fingerprints([("a", "f1"), ("b", "f1")])
    with pytest.raises(TokenizerMismatchError) as info:
        check_fingerprints([("a", "f1"), ("b", "f1"), ("c", "f2")])
    assert "expert a has f1" in str(info.value)
    assert "expert c has f2" in str(info.value)


# --- stop strings ------------------------------------------------------------------------

def feed_all(stops: list[str], pieces: list[str]) -> tuple[StopMatcher, list[str], bool]:
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    stopped = False
    for piece in pieces:
        if matcher.feed(piece, emitted.append):
            stopped = True
            break
    if not stopped:
        matcher.finish("", emitted.append)
    return matcher, emitted, stopped


def test_stop_matcher_without_stops_emits_everything():
    matcher, emitted, stopped = feed_all([], ["Hel", "lo", " world"])
    assert not stopped
    assert emitted == ["Hel", "lo", " world"]
    assert matcher.text == "Hello world"


def test_stop_matcher_cuts_stop_split_across_pieces():
    matcher, emitted, stopped = feed_all(["\n\nQ"], ["Answer one.", "\n", "\n", "Q: next"])
    assert stopped
    assert matcher.text == "Answer one."
    assert "".join(emitted) == "Answer one."


def test_stop_matcher_releases_held_prefix_that_diverges():
    matcher, emitted, stopped = feed_all(["END"], ["x E", "N", "D?"])
    assert stopped
    assert matcher.text == "x "

    matcher, emitted, stopped = feed_all(["END"], ["x E", "N", "O"])
    assert not stopped
    assert emitted == ["x ", "ENO"]
    assert matcher.text == "x ENO"


def test_stop_matcher_earliest_of_several_stops():
    matcher, _, stopped = feed_all(["bb", "a"], ["xxbba"])
    assert stopped
    assert matcher.text == "xx"
    assert matcher.matched == "bb"


def test_stop_matcher_records_matched_stop():
    matcher, _, stopped = feed_all(["END", "\n\n"], ["one\n", "\ntwo END"])
    assert stopped
    assert matcher.matched == "\n\n"

    matcher, _, stopped = feed_all(["END"], ["no stop here"])
    assert not stopped
    assert matcher.matched is None


# --- vocabulary and detokenization ---------------------------------------------------------

def make_vocabulary(pieces: list[bytes], control: set[int] = frozenset()) -> Vocabulary:
    offsets = np.zeros(len(pieces) + 1, dtype=np.uint32)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    attrs = np.array([(1 << 3) if i in control else (1 << 2) for i in range(len(pieces))], dtype=np.int32)
    return Vocabulary(b"".join(pieces), offsets, attrs)


def test_detokenizer_joins_utf8_split_across_tokens():
    euro = "€".encode("utf-8")
    vocabulary = make_vocabulary([b"<s>", b"price ", euro[:1], euro[1:2], euro[2:], b"5"], control={0})
    detokenizer = vocabulary.detokenizer()
    pieces = [detokenizer.feed(token) for token in (0, 1, 2, 3, 4, 5)]
    assert pieces == ["", "price ", "", "", "€", "5"]
    assert detokenizer.flush() == ""


def test_detokenizer_flush_replaces_truncated_utf8():
    vocabulary = make_vocabulary([b"a", "€".encode("utf-8")[:2]])
    detokenizer = vocabulary.detokenizer()
    assert detokenizer.feed(0) + detokenizer.feed(1) == "a"
    assert detokenizer.flush() == "\ufffd"


def test_vocabulary_inconsistent_offsets_rejected():
    with pytest.raises(ValueError, match="offsets"):
        Vocabulary(b"abc", np.array([0, 2, 1, 3], dtype=np.uint32), np.zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match="attributes"):
        Vocabulary(b"abc", np.array([0, 1, 3], dtype=np.uint32), np.zeros(3, dtype=np.int32))


async def fetch_vocabularies(endpoints: list[str], cache: VocabularyCache) -> list[Vocabulary]:
    context = zmq.asyncio.Context()
    clients = [AgentClient(f"e{i}", endpoint, context) for i, endpoint in enumerate(endpoints)]
    try:
        for client in clients:
            client.start()
        infos = await asyncio.gather(*(client.info(10) for client in clients))
        return list(await asyncio.gather(*(cache.get(c, i, 10) for c, i in zip(clients, infos))))
    finally:
        for client in clients:
            client.close()
        context.destroy(linger=0)


@pytest.mark.timeout(60)
def test_vocabulary_cache_fetches_once_per_fingerprint(start_agent, tiny_model_path, caplog):
    first = start_agent(tiny_model_path)
    second = start_agent(tiny_model_path)
    cache = VocabularyCache()
    with caplog.at_level(logging.INFO, logger="moe2.coordinator.client"):
        vocabularies = asyncio.run(fetch_vocabularies([first.address, second.address], cache))

    fetched = [r for r in caplog.records if "fetched vocabulary" in r.getMessage()]
    assert len(fetched) == 1
    assert vocabularies[0] is vocabularies[1]
    assert vocabularies[0].n_tokens == first.model.vocab.n_tokens
    text = b"".join(vocabularies[0].piece(t) for t in first.model.vocab.tokenize("hello world", False))
    assert text.decode("utf-8").strip() == "hello world"


@pytest.mark.timeout(60)
def test_vocabulary_cache_reads_disk_without_fetch(start_agent, tiny_model_path, tmp_path: Path, caplog):
    agent = start_agent(tiny_model_path)
    stored = asyncio.run(fetch_vocabularies([agent.address], VocabularyCache(tmp_path)))[0]
    assert len(list(tmp_path.glob("vocab-*.npz"))) == 1

    with caplog.at_level(logging.INFO, logger="moe2.coordinator.client"):
        loaded = asyncio.run(fetch_vocabularies([agent.address], VocabularyCache(tmp_path)))[0]
    assert not [r for r in caplog.records if "fetched vocabulary" in r.getMessage()]
    assert loaded.pieces == stored.pieces
    assert np.array_equal(loaded.offsets, stored.offsets)
    assert np.array_equal(loaded.attrs, stored.attrs)


@pytest.mark.timeout(60)
def test_vocabulary_cache_corrupt_file_refetched(start_agent, tiny_model_path, tmp_path: Path, caplog):
    agent = start_agent(tiny_model_path)
    asyncio.run(fetch_vocabularies([agent.address], VocabularyCache(tmp_path)))
    (path,) = tmp_path.glob("vocab-*.npz")
    path.write_bytes(b"not a zip file")

    with caplog.at_level(logging.INFO, logger="moe2.coordinator.client"):
        vocabulary = asyncio.run(fetch_vocabularies([agent.address], VocabularyCache(tmp_path)))[0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreadable" in m for m in messages)
    assert any("fetched vocabulary" in m for m in messages)
    assert vocabulary.n_tokens == agent.model.vocab.n_tokens


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_vocabulary_cache_damaged_file_refetched(start_agent, tiny_model_path, tmp_path: Path, caplog, damage):
    agent = start_agent(tiny_model_path)
    asyncio.run(fetch_vocabularies([agent.address], VocabularyCache(tmp_path)))
    (path,) = tmp_path.glob("vocab-*.npz")
    content = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else content[:len(content) // 2])

    with caplog.at_level(logging.INFO, logger="moe2.coordinator.client"):
        vocabulary = asyncio.run(fetch_vocabularies([agent.address], VocabularyCache(tmp_path)))[0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreadable" in m for m in messages)
    assert any("fetched vocabulary" in m for m in messages)
    assert vocabulary.n_tokens == agent.model.vocab.n_tokens


# --- agent client --------------------------------------------------------------------------

async def call_once(endpoint: str, op: str, timeout_s: float, **fields) -> dict:
    context = zmq.asyncio.Context()
    client = AgentClient("e", endpoint, context)
    try:
        client.start()
        return await client.call(op, timeout_s, **fields)
    finally:
        client.close()
        context.destroy(linger=0)


@pytest.mark.timeout(30)
def test_client_timeout_names_operation_and_endpoint():
    # A bound socket that never replies simulates a hung agent.
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:0")
    endpoint = silent.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        with pytest.raises(AgentTimeout) as info:
            asyncio.run(call_once(endpoint, "info", 0.3))
    finally:
        silent.close(linger=0)
        context.term()
    assert "info timed out after 0.3 s" in str(info.value)
    assert endpoint in str(info.value)


@pytest.mark.timeout(30)
def test_client_error_reply_raises_remote_error(start_agent, tiny_model_path):
    agent = start_agent(tiny_model_path)
    with pytest.raises(AgentRemoteError) as info:
        asyncio.run(call_once(agent.address, "step", 5.0, session="missing", step=1, token=5,
                              format={"kind": "dense"}))
    assert info.value.code == "unknown_session"
    assert "step failed" in str(info.value)


@pytest.mark.timeout(30)
def test_client_full_send_queue_fails_request():
    async def flood() -> list:
        context = zmq.asyncio.Context()
        # Nothing listens on port 9 (discard) of loopback, so requests stay queued.
        client = AgentClient("gone", "tcp://127.0.0.1:9", context)
        try:
            client.start()
            pending = [client.submit("ping") for _ in range(1200)]
            await asyncio.sleep(0)
            return [p.future.exception() if p.future.done() else None for p in pending]
        finally:
            client.close()
            context.destroy(linger=0)

    errors = asyncio.run(flood())
    assert errors[0] is None, "the first requests wait in the queue"
    failed = [e for e in errors if e is not None]
    assert failed, "requests beyond ZMQ_SNDHWM must fail instead of blocking"
    assert all(isinstance(e, AgentDisconnected) for e in failed)
    assert "send queue full" in str(failed[0])


# --- energy accounting ---------------------------------------------------------------------

def distribution_reply(step: int, energy_j: float | None, meter: str = "tegrastats") -> dict:
    """A `step` reply as agent.protocol defines it, with a one-token sparse distribution."""
    ids = np.array([3], dtype=np.int32)
    logprobs = np.array([-0.1], dtype=np.float32)
    return {"v": 1, "op": "step", "id": step, "ok": True, "step": step, "n_past": 5 + step,
            "dist": protocol.encode_sparse(ids, logprobs, 0.05), "compute_s": 0.01,
            "energy_j": energy_j, "meter": meter, "energy": None}


def account(energies: list[float | None], name: str = "e", meter: str = "tegrastats") -> Participant:
    participant = Participant(name, client=None, gate=0.5, weight=1.0, meter=meter)
    exchange = StepExchange("r1", [participant], DistributionFormat("sparse", 1), TimeoutConfig(), 10, [])
    for step, energy in enumerate(energies, start=1):
        owed = OwedReply(step, PendingReply(name, "step", step, 0.0, None), 1.0)
        exchange._read_distribution(participant, owed, distribution_reply(step, energy, meter))
    return participant


def test_energy_summed_when_every_reply_reports_it():
    report = account([0.5, 0.25, 1.0]).report()
    assert report.energy_j == pytest.approx(1.75)
    assert report.replies == 3
    assert report.compute_s == pytest.approx(0.03)
    assert report.meter == "tegrastats"


def test_energy_unknown_when_one_reply_lacks_it():
    assert account([0.5, None, 1.0]).report().energy_j is None


def test_energy_total_unknown_unless_every_expert_known():
    known = account([0.5, 0.5]).report()
    unknown = account([None]).report()
    timings = StepTimings()
    common = dict(request_id="r1", text="", tokens=[3], stop_reason="eos", max_tokens=8, events=[], started=0.0,
                  token_times=[0.1], finished=0.2, timings=timings, gate_s=0.0, gate_uniform=True, seed=1,
                  top_k=2, distribution={"kind": "sparse", "m": 1})
    assert GenerationResult.build(experts=[known, known], **common).energy_j == pytest.approx(2.0)
    assert GenerationResult.build(experts=[known, unknown], **common).energy_j is None


def test_step_timings_keep_deadline_wait_apart():
    # Expert a replied 0.1 s after the token was sent, with 0.05 s of compute. The step
    # then waited 1.9 s for a late expert until its deadline, and sampled 2 ms later.
    replies = StepReplies(distributions={"a": None}, compute_s={"a": 0.05}, arrived_at={"a": 10.1},
                          transport_s={"a": 0.05}, deadline_expired=True, waited_s=1.9)
    timings = StepTimings()
    timings.add(replies, sent_at=10.0, sampled_at=12.002)
    timings.add_wait(replies)
    assert timings.overhead == [pytest.approx(0.052)]
    assert timings.local == [pytest.approx(0.002)]
    assert timings.waits == [1.9]


def test_step_timings_ignore_steps_without_wait():
    timings = StepTimings()
    timings.add_wait(StepReplies(distributions={"a": None}))
    assert timings.waits == []


# --- human summary ---------------------------------------------------------------------------

def summary_of(tokens: list[int], stop_reason: str, stop_text: str | None = None, experts=None, events=()) -> str:
    result = GenerationResult.build(
        request_id="r1", text="", tokens=tokens, stop_reason=stop_reason, stop_text=stop_text, max_tokens=8,
        experts=experts if experts is not None else [account([0.5]).report()], events=list(events),
        started=0.0, token_times=[0.1 * (i + 1) for i in range(len(tokens))], finished=1.0, timings=StepTimings(),
        gate_s=0.0, gate_uniform=True, seed=1, top_k=1, distribution={"kind": "sparse", "m": 1})
    return format_summary(result)


def test_summary_names_stop_text():
    assert "tokens: 2, stopped at stop text '\\n\\n';" in summary_of([5, 6], "stop", "\n\n")


def test_summary_names_end_of_sequence_token():
    assert "tokens: 3, stopped at an end-of-sequence token (id 2);" in summary_of([5, 6, 2], "eos")


def test_summary_names_token_limit():
    assert "tokens: 8, stopped at the token limit (8);" in summary_of(list(range(8)), "max_tokens")


def test_summary_names_experts_without_meter():
    experts = [account([None, None], "science", "none").report(), account([0.5], "math").report(),
               account([None], "humanities", "none").report()]
    summary = summary_of([5, 6], "max_tokens", experts=experts)
    assert "energy: unknown (no meter on science, humanities)" in summary


def test_summary_names_meter_without_reading():
    experts = [account([0.5, None], "math", "tegrastats").report(), account([], "law", "nvml").report()]
    summary = summary_of([5, 6], "max_tokens", experts=experts)
    assert "no reply from law" in summary
    assert "no reading in some replies from tegrastats on math" in summary


def test_summary_total_energy_when_known():
    summary = summary_of([5, 6], "max_tokens", experts=[account([0.5, 0.25], "math").report()])
    assert "energy: 0.75 J in total" in summary
