"""Tests of the gate trainer on synthetic score tables where the right routing is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="gate training needs PyTorch (the train extra)")

from coordinator import scoretable, train_gate  # noqa: E402
from coordinator.scoretable import ScoreTable  # noqa: E402
from coordinator.train_gate import TrainSettings  # noqa: E402

N_DOMAINS = 4
DIM = 16
P_RIGHT = 0.9   # probability the domain's own expert gives each target token
P_WRONG = 0.05  # probability every other expert gives it


def synthetic_table(n_per_domain: int = 100, seed: int = 0) -> tuple[np.ndarray, ScoreTable, np.ndarray]:
    """Return embeddings, a score table where expert n is right only on domain n, and domains.

    Embeddings are domain centers plus noise; examples have 1 to 3 target tokens.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_DOMAINS, DIM)) * 2.0
    domains = np.repeat(np.arange(N_DOMAINS), n_per_domain)
    embeddings = centers[domains] + rng.standard_normal((len(domains), DIM)) * 0.5
    lengths = rng.integers(1, 4, size=len(domains))
    rows = []
    for domain, length in zip(domains, lengths):
        row = np.full(N_DOMAINS, np.log(P_WRONG))
        row[domain] = np.log(P_RIGHT)
        rows += [row] * length
    choice_logprobs = np.full((len(domains), N_DOMAINS, 4), np.log(0.1), dtype=np.float32)
    answers = rng.integers(0, 4, size=len(domains))
    for i, (domain, answer) in enumerate(zip(domains, answers)):
        # Every expert picks a wrong letter except the domain's own expert.
        choice_logprobs[i, :, (answer + 1) % 4] = np.log(0.6)
        choice_logprobs[i, domain, answer] = np.log(0.9)
    table = ScoreTable(
        logprobs=np.array(rows, dtype=np.float32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        experts=[f"expert{n}" for n in range(N_DOMAINS)],
        fingerprints=[f"fp{n}" for n in range(N_DOMAINS)],
        example_ids=[f"synthetic/{d}/{i}" for i, d in enumerate(domains)],
        subjects=[f"domain{d}" for d in domains],
        gate_texts=[f"text {i}" for i in range(len(domains))],
        choice_logprobs=choice_logprobs, answers=answers.astype(np.int64),
        meta={"dataset_hash": "synthetic"})
    return embeddings.astype(np.float32), table, domains


FAST = TrainSettings(epochs=40, lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def trained():
    embeddings, table, domains = synthetic_table()
    train_index, val_index = train_gate.split_examples(table)
    result = train_gate.train(embeddings, table, train_index, val_index, FAST)
    return embeddings, table, domains, train_index, val_index, result


def test_mixture_nll_matches_numpy_loss():
    rng = np.random.default_rng(1)
    embeddings, table, _ = synthetic_table(n_per_domain=5, seed=1)
    gates = rng.dirichlet(np.ones(N_DOMAINS), size=table.n_examples)
    expected = scoretable.example_losses(table, gates)
    padded = torch.from_numpy(train_gate.padded_logprobs(table))
    ours = train_gate.mixture_nll(torch.log(torch.from_numpy(gates)), padded.double()).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_gate_routes_each_domain_to_its_expert(trained):
    embeddings, table, domains, _, val_index, result = trained
    gates = train_gate.gate_values(result.model, embeddings[val_index])
    routed = gates.argmax(axis=1)
    for domain in range(N_DOMAINS):
        mine = domains[val_index] == domain
        assert mine.sum() >= 10
        assert np.mean(routed[mine] == domain) >= 0.95, f"domain {domain} routed to {np.bincount(routed[mine])}"


def test_gate_validation_loss_near_oracle(trained):
    """The oracle loss is -log(P_RIGHT) per token; uniform weights cost far more."""
    embeddings, table, _, _, val_index, result = trained
    val = table.subset_examples(val_index)
    report = train_gate.evaluate_gates(val, train_gate.gate_values(result.model, embeddings[val_index]))
    tokens_per_example = np.diff(val.offsets).mean()
    margin = 0.05 * tokens_per_example
    assert report["loss"]["oracle"] == pytest.approx(-np.log(P_RIGHT) * tokens_per_example, rel=1e-5)
    assert report["loss"]["gate"] <= report["loss"]["oracle"] + margin
    assert report["loss"]["uniform"] > report["loss"]["oracle"] + 10 * margin


def test_gate_accuracy_beats_uniform_and_single_experts(trained):
    embeddings, table, _, _, val_index, result = trained
    val = table.subset_examples(val_index)
    report = train_gate.evaluate_gates(val, train_gate.gate_values(result.model, embeddings[val_index]))
    assert report["accuracy"]["gate"] >= 0.95
    assert report["accuracy"]["uniform"] <= 0.5
    for name, value in report["accuracy"]["experts"].items():
        assert value <= 0.5, name


def test_wrong_routing_fails_the_loss_check():
    """A gate that sends each domain to the next expert is far from the oracle."""
    embeddings, table, domains = synthetic_table(n_per_domain=20)
    wrong = np.eye(N_DOMAINS)[(domains + 1) % N_DOMAINS] + 1e-6
    report = train_gate.evaluate_gates(table, wrong)
    assert report["loss"]["gate"] > report["loss"]["oracle"] + 1.0


def test_onnx_export_matches_pytorch(trained, tmp_path):
    import onnxruntime as ort

    embeddings, table, _, _, _, result = trained
    path = tmp_path / "gate.onnx"
    max_diff = train_gate.export_onnx(result.model, DIM, path, embeddings[:64])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(["gate"], {"embedding": embeddings[:5]})[0]
    assert max_diff < 1e-5
    assert ours.shape == (5, N_DOMAINS)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, train_gate.gate_values(result.model, embeddings[:5]), atol=1e-5)


def test_split_is_deterministic_and_stratified():
    _, table, domains = synthetic_table(n_per_domain=50)
    first = train_gate.split_examples(table, seed=3)
    second = train_gate.split_examples(table.subset_examples(np.arange(table.n_examples)[::-1]), seed=3)
    assert len(first[1]) == 40
    assert set(first[0]).isdisjoint(first[1])
    for domain in range(N_DOMAINS):
        assert np.sum(domains[first[1]] == domain) == 10
    reversed_ids = [table.example_ids[::-1][i] for i in second[1]]
    assert sorted(reversed_ids) == sorted(table.example_ids[i] for i in first[1])


def test_split_from_files_rejects_overlap(tmp_path):
    _, table, _ = synthetic_table(n_per_domain=5)
    (tmp_path / "train.txt").write_text("\n".join(table.example_ids[:12]))
    (tmp_path / "val.txt").write_text("\n".join(table.example_ids[10:]))
    with pytest.raises(train_gate.TrainError, match="share 2 examples"):
        train_gate.split_from_files(table, tmp_path / "train.txt", tmp_path / "val.txt")


def test_settings_reject_bad_values():
    with pytest.raises(train_gate.TrainError, match="dropout"):
        TrainSettings(dropout=1.5).validate()
    with pytest.raises(train_gate.TrainError, match="batch_size must be at least 1"):
        TrainSettings(batch_size=0).validate()


def test_score_table_roundtrip(tmp_path):
    _, table, _ = synthetic_table(n_per_domain=3)
    scoretable.save_score_table(table, tmp_path / "scores.npz")
    loaded = scoretable.load_score_table(tmp_path / "scores.npz")
    np.testing.assert_array_equal(loaded.logprobs, table.logprobs)
    np.testing.assert_array_equal(loaded.offsets, table.offsets)
    assert loaded.experts == table.experts
    assert loaded.example_ids == table.example_ids
    assert loaded.gate_texts == table.gate_texts
    assert loaded.meta == table.meta
    with np.load(tmp_path / "scores.npz", allow_pickle=False) as data:
        assert json.loads(str(data["meta_json"])) == table.meta
