"""Tests of `moe2 score` against real agents serving a tiny GGUF on loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator import cli, scoring
from coordinator.datasets import Example, dataset_hash, load_mmlu, load_prompt_target_jsonl
from coordinator.scoretable import load_score_table
from coordinator.scoring import Expert, Job, LocalTokenizer, ScoreCache
from pipeline_fixtures import write_mmlu

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mmlu(tmp_path_factory):
    return write_mmlu(tmp_path_factory.mktemp("mmlu"), {"algebra": 3, "law": 3}, seed=0)


@pytest.fixture
def tokenizer(tiny_model_path):
    tokenizer = LocalTokenizer(tiny_model_path)
    yield tokenizer
    tokenizer.close()


@pytest.fixture
def two_agents(tiny_model_path, start_agent, tmp_path):
    (tmp_path / "first.txt").write_text("the quick brown fox\n")
    (tmp_path / "second.txt").write_text("hello world\n")
    return [start_agent(tiny_model_path, name=name, domain_prompt=tmp_path / f"{name}.txt")
            for name in ("first", "second")]


def experts_of(agents, tokenizer) -> list[Expert]:
    experts = [Expert(a.config.expert_name, a.address) for a in agents]
    scoring.identify(experts, tokenizer, timeout_s=10)
    return experts


def test_fingerprint_depends_on_domain_prompt_and_lora():
    base = {"model_sha256": "m", "lora": None, "domain_prompt": {"sha256": "d1"}}
    other_prompt = dict(base, domain_prompt={"sha256": "d2"})
    with_lora = dict(base, lora={"sha256": "l", "scale": 1.0})
    fingerprints = {scoring.expert_fingerprint(i) for i in (base, other_prompt, with_lora)}
    assert len(fingerprints) == 3
    assert scoring.expert_fingerprint(dict(base, name="renamed")) == scoring.expert_fingerprint(base)


def test_score_command_writes_table(mmlu, two_agents, tiny_model_path, tmp_path, agent_client):
    argv = ["score", "--data", str(mmlu), "--model", str(tiny_model_path), "--cache", str(tmp_path / "cache"),
            "--output", str(tmp_path / "scores.npz")]
    for agent in two_agents:
        argv += ["--agent", f"{agent.config.expert_name}={agent.address}"]
    assert cli.main(argv) == 0

    table = load_score_table(tmp_path / "scores.npz")
    examples = load_mmlu(mmlu, "test")
    assert table.experts == ["first", "second"]
    assert table.example_ids == [e.id for e in examples]
    assert table.meta["dataset_hash"] == dataset_hash(examples)
    assert table.choice_logprobs.shape == (6, 2, 4)
    assert table.gate_texts[0] == examples[0].gate_text

    # The first example's target log-probabilities equal a direct `score` call on the agent.
    # llama.cpp's logits change slightly with how tokens are split across decode calls
    # (one `open` prefill versus `score`'s two calls), hence the relative tolerance.
    tokenizer = LocalTokenizer(tiny_model_path)
    try:
        target = tokenizer.continuation(examples[0].prompt, examples[0].target)
    finally:
        tokenizer.close()
    direct = agent_client(two_agents[1].address).score(examples[0].prompt, target).logprobs
    rows = table.logprobs[table.offsets[0]:table.offsets[1], 1]
    np.testing.assert_allclose(rows, direct, rtol=1e-3)
    # The correct choice's log-probability is the sum over the target's tokens.
    np.testing.assert_allclose(table.choice_logprobs[0, 1, table.answers[0]], rows.sum(), rtol=1e-6)


def test_score_cache_resumes_without_recomputing(mmlu, two_agents, tokenizer, tmp_path):
    examples = load_mmlu(mmlu, "test")
    jobs = scoring.make_jobs(examples, tokenizer)
    experts = experts_of(two_agents, tokenizer)
    data_hash = dataset_hash(examples)
    first = scoring.score_all(experts, jobs, tmp_path, data_hash, timeout_s=30)
    table = scoring.build_table(first, jobs, {})
    assert [r.computed for r in first] == [6, 6]

    # Interrupt the first expert's run: drop its last two records and cut the one before.
    path = first[0].cache.path
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3] + [lines[-3][:20]]))

    second = scoring.score_all(experts, jobs, tmp_path, data_hash, timeout_s=30)
    assert [(r.cached, r.computed) for r in second] == [(3, 3), (6, 0)]
    resumed = scoring.build_table(second, jobs, {})
    np.testing.assert_allclose(resumed.logprobs, table.logprobs, atol=1e-6)
    np.testing.assert_allclose(resumed.choice_logprobs, table.choice_logprobs, atol=1e-6)
    assert len(ScoreCache(tmp_path, data_hash, experts[0]).records) == 6


def test_changed_fingerprint_invalidates_cache(mmlu, tiny_model_path, start_agent, tokenizer, tmp_path):
    examples = load_mmlu(mmlu, "test")
    jobs = scoring.make_jobs(examples, tokenizer)
    data_hash = dataset_hash(examples)
    prompt = tmp_path / "domain.txt"

    prompt.write_text("the lazy dog\n")
    agent = start_agent(tiny_model_path, name="expert", domain_prompt=prompt)
    before = experts_of([agent], tokenizer)
    assert scoring.score_all(before, jobs, tmp_path, data_hash, timeout_s=30)[0].computed == 6
    agent.stop()

    # Same name, same model, another domain prompt: a different expert.
    prompt.write_text("capital of France is Paris\n")
    agent = start_agent(tiny_model_path, name="expert", domain_prompt=prompt)
    after = experts_of([agent], tokenizer)
    assert after[0].fingerprint != before[0].fingerprint
    run = scoring.score_all(after, jobs, tmp_path, data_hash, timeout_s=30)[0]
    assert (run.cached, run.computed) == (0, 6)


def test_open_path_matches_score_path(two_agents, tokenizer, agent_client):
    """Single-token choices are read from one dense `open`; each must equal its own `score`."""
    prompt = "the quick brown fox jumps over the"
    ids = [tokenizer.continuation(prompt, word)[0] for word in (" lazy", " dog", " a")]
    example = Example(id="x", prompt=prompt, target=" lazy", choices=("lazy", "dog", "a"), answer=0)
    job = Job(example, [ids[0]], [[i] for i in ids])
    assert job.single_token_choices
    client = agent_client(two_agents[0].address)
    record = scoring.score_job(client, job, "test")
    expected = [float(client.score(prompt, [i]).logprobs[0]) for i in ids]
    # Tolerance: one `open` prefill and `score`'s two decode calls differ slightly in llama.cpp.
    np.testing.assert_allclose(record["choices"], expected, rtol=1e-3)
    assert record["logprobs"] == [record["choices"][0]]


def test_generic_jsonl_scores_multi_token_targets(two_agents, tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "the capital of France is", "target": " Paris"},
            {"prompt": "hello", "target": " world of the quick brown fox"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_prompt_target_jsonl(path)
    jobs = scoring.make_jobs(examples, tokenizer)
    runs = scoring.score_all(experts_of(two_agents, tokenizer), jobs, tmp_path / "cache", dataset_hash(examples))
    table = scoring.build_table(runs, jobs, {})
    assert np.diff(table.offsets).tolist() == [len(j.target_ids) for j in jobs]
    assert len(jobs[1].target_ids) > 1
    assert table.choice_logprobs is None
    assert np.all(table.logprobs < 0)


def test_tokenizer_mismatch_is_rejected(two_agents, tiny_gguf):
    other = LocalTokenizer(tiny_gguf(words=("alpha", "beta", "gamma")))
    try:
        experts = [Expert("first", two_agents[0].address)]
        with pytest.raises(scoring.ScoringError, match="tokenizer fingerprint"):
            scoring.identify(experts, other, timeout_s=10)
    finally:
        other.close()


def test_agent_argument_must_name_endpoint():
    with pytest.raises(scoring.ScoringError, match="use NAME=ENDPOINT"):
        scoring.parse_agents(["tcp://127.0.0.1:5555"], None)


@pytest.mark.demo_model
@pytest.mark.timeout(300)
def test_demo_model_scores_letters_in_one_open(demo_model_path, start_agent, mmlu, tmp_path):
    """Gemma 3 tokenizes " A" .. " D" as single tokens, so one dense `open` gives every letter."""
    tokenizer = LocalTokenizer(demo_model_path)
    try:
        examples = load_mmlu(mmlu, "test")[:2]
        jobs = scoring.make_jobs(examples, tokenizer)
        assert all(job.single_token_choices for job in jobs)
        agent = start_agent(demo_model_path, name="demo", n_ctx=1024, max_sessions=1)
        experts = experts_of([agent], tokenizer)
    finally:
        tokenizer.close()
    run = scoring.score_all(experts, jobs, tmp_path, dataset_hash(examples))[0]
    table = scoring.build_table([run], jobs, {})
    letters_mass = np.exp(table.choice_logprobs[:, 0, :]).sum(axis=1)
    assert np.all((letters_mass > 0.2) & (letters_mass <= 1.0))
    np.testing.assert_allclose(table.logprobs[:, 0], table.choice_logprobs[np.arange(2), 0, table.answers])
