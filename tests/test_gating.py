"""Tests of run-time gating: embedder ONNX + gate ONNX -> gate values per configured expert."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import numpy as np
import pytest

from coordinator.config import parse_config
from coordinator.embedder_export import export_embedder
from coordinator.embedding import Embedder
from coordinator.gating import Gate, GateError
from coordinator.generate import Coordinator
from coordinator.identity import expert_fingerprint
from pipeline_fixtures import DOMAIN_WORDS, write_mmlu, write_tiny_bert

EXPERTS = [("algebra", "fp-a"), ("anatomy", "fp-b"), ("law", "fp-c")]


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    source = write_tiny_bert(tmp_path_factory.mktemp("bert"))
    output = tmp_path_factory.mktemp("embedder")
    export_embedder(source, output, "tiny")
    return output


def write_linear_gate(path, weights: np.ndarray, experts=EXPERTS) -> None:
    """Write gate.onnx = softmax(embedding @ weights) and its gate.json."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["embedding", "weights"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["gate"], axis=-1)]
    graph = helper.make_graph(
        nodes, "gate", [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", weights.shape[0]])],
        [helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        [numpy_helper.from_array(weights.astype(np.float32), "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    metadata = {"format": "moe2-gate/1", "experts": [{"name": n, "fingerprint": f} for n, f in experts]}
    path.with_suffix(".json").write_text(json.dumps(metadata))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture
def linear_gate(embedder_dir, tmp_path):
    weights = np.random.default_rng(0).standard_normal((32, len(EXPERTS))) * 3
    write_linear_gate(tmp_path / "gate.onnx", weights)
    return Gate.load(tmp_path / "gate.onnx", Embedder(embedder_dir)), weights


def test_gate_values_match_embedding_times_weights(linear_gate, embedder_dir):
    gate, weights = linear_gate
    prompt = "which of the following is true of the court statute ?"
    output = gate(prompt)
    embedding = Embedder(embedder_dir).embed([prompt])[0]
    assert not output.uniform
    np.testing.assert_allclose(output.values, softmax(embedding @ weights), atol=1e-5)


def test_gate_maps_outputs_by_fingerprint(linear_gate):
    gate, _ = linear_gate
    prompt = "the muscle bone nerve"
    full = gate(prompt).values
    # Configured in another order and with other names: fingerprints decide the column.
    reordered = gate.for_experts(["x", "y", "z"], ["fp-c", "fp-a", "fp-b"])
    np.testing.assert_allclose(reordered(prompt).values, full[[2, 0, 1]], atol=1e-12)
    assert reordered.fingerprints == ["fp-c", "fp-a", "fp-b"]


def test_gate_matched_by_name_keeps_trained_fingerprints(linear_gate):
    gate, _ = linear_gate
    assert gate.for_experts(["law", "algebra"]).fingerprints == ["fp-c", "fp-a"]


def test_gate_subset_is_renormalized(linear_gate):
    gate, _ = linear_gate
    prompt = "the muscle bone nerve"
    full = gate(prompt).values
    subset = gate.for_experts(["law", "algebra"])(prompt).values
    np.testing.assert_allclose(subset, full[[2, 0]] / full[[2, 0]].sum(), atol=1e-12)


def test_gate_rejects_unknown_fingerprint(linear_gate):
    gate, _ = linear_gate
    with pytest.raises(GateError, match="fingerprint fp-zzz, which the gate was not trained on"):
        gate.for_experts(["algebra"], ["fp-zzz"])


def test_gate_rejects_unknown_name(linear_gate):
    gate, _ = linear_gate
    with pytest.raises(GateError, match="expert history is not one the gate was trained on"):
        gate.for_experts(["history"])


def test_gate_rejects_embedder_dimension_mismatch(embedder_dir, tmp_path):
    write_linear_gate(tmp_path / "gate.onnx", np.zeros((16, 3)))
    with pytest.raises(GateError, match="dimension 16, but embedder tiny produces 32"):
        Gate.load(tmp_path / "gate.onnx", Embedder(embedder_dir))


def test_gate_without_metadata_is_rejected(embedder_dir, tmp_path):
    write_linear_gate(tmp_path / "gate.onnx", np.zeros((32, 3)))
    (tmp_path / "gate.json").unlink()
    with pytest.raises(GateError, match="gate.json not found"):
        Gate.load(tmp_path / "gate.onnx", Embedder(embedder_dir))


def test_gate_loads_from_embedder_files(embedder_dir, tmp_path):
    write_linear_gate(tmp_path / "gate.onnx", np.ones((32, 3)))
    gate = Gate.load(tmp_path / "gate.onnx", embedder_onnx=embedder_dir / "model.onnx",
                     tokenizer=embedder_dir / "tokenizer.json", providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(gate("court").values, [1 / 3] * 3, atol=1e-6)


def test_uniform_gate_reports_uniform():
    gate = Gate.uniform_for(["a", "b", "c", "d"])
    output = gate("anything")
    assert output.uniform
    assert gate.uniform
    np.testing.assert_allclose(output.values, 0.25)
    assert gate.for_experts(["a", "b"])("x").uniform


@pytest.mark.timeout(60)
def test_coordinator_warns_on_gate_fingerprint_mismatch(embedder_dir, tmp_path, start_agent, tiny_model_path,
                                                        agent_client, caplog):
    (tmp_path / "domain.txt").write_text("the quick brown fox\n")
    same = start_agent(tiny_model_path, name="same")
    changed = start_agent(tiny_model_path, name="changed", domain_prompt=tmp_path / "domain.txt")
    same_fingerprint = expert_fingerprint(agent_client(same.address).info())
    changed_info = agent_client(changed.address).info()
    # The gate was trained while "changed" ran without its domain prompt.
    trained_fingerprint = expert_fingerprint(dict(changed_info, domain_prompt=None))
    served_fingerprint = expert_fingerprint(changed_info)
    assert served_fingerprint != trained_fingerprint

    experts = [("same", same_fingerprint), ("changed", trained_fingerprint)]
    write_linear_gate(tmp_path / "gate.onnx", np.zeros((32, 2)), experts)
    gate = Gate.load(tmp_path / "gate.onnx", Embedder(embedder_dir)).for_experts(["same", "changed"])
    config = parse_config({"experts": [{"name": "same", "endpoint": same.address},
                                       {"name": "changed", "endpoint": changed.address}],
                           "timeouts": {"handshake_s": 10.0}})

    async def connect() -> None:
        async with Coordinator(config, gate):
            pass

    with caplog.at_level(logging.WARNING, logger="moe2"):
        asyncio.run(connect())

    warnings = [r.getMessage() for r in caplog.records if "the gate was trained on fingerprint" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("expert changed: ")
    assert served_fingerprint in warnings[0]
    assert trained_fingerprint in warnings[0]


@pytest.mark.timeout(300)
def test_trained_gate_routes_domain_prompts(embedder_dir, tmp_path, monkeypatch):
    """moe2 train-gate on a score table where expert n is right only on subject n, then Gate."""
    pytest.importorskip("torch", reason="gate training needs PyTorch (the train extra)")
    from coordinator import cli
    from coordinator.datasets import load_mmlu
    from coordinator.scoretable import ScoreTable, save_score_table

    subjects = list(DOMAIN_WORDS)
    examples = load_mmlu(write_mmlu(tmp_path / "mmlu", {s: 60 for s in subjects}), "test")
    rows = []
    for example in examples:
        row = np.full(len(subjects), np.log(0.05))
        row[subjects.index(example.subject)] = np.log(0.9)
        rows.append(row)
    table = ScoreTable(
        logprobs=np.array(rows, np.float32), offsets=np.arange(len(rows) + 1, dtype=np.int64),
        experts=subjects, fingerprints=[f"fp-{s}" for s in subjects],
        example_ids=[e.id for e in examples], subjects=[e.subject for e in examples],
        gate_texts=[e.gate_text for e in examples], meta={"dataset_hash": "h"})
    save_score_table(table, tmp_path / "scores.npz")

    argv = ["train-gate", "--scores", str(tmp_path / "scores.npz"), "--embedder", str(embedder_dir),
            "--output", str(tmp_path / "gate" / "gate.onnx"), "--epochs", "30", "--lr", "3e-3",
            "--gates-out", str(tmp_path / "gates.npy")]
    monkeypatch.setattr(sys, "argv", ["moe2", *argv])
    assert cli.main(argv) == 0

    metadata = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert [e["fingerprint"] for e in metadata["experts"]] == [f"fp-{s}" for s in subjects]
    assert metadata["metrics"]["onnx_max_abs_diff"] < 1e-5
    assert metadata["metrics"]["validation"]["loss"]["gate"] < metadata["metrics"]["validation"]["loss"]["uniform"]
    assert np.load(tmp_path / "gates.npy").shape == (len(examples), len(subjects))

    # Fresh prompts of the same layout, written with another seed, route to their subject's expert.
    gate = Gate.load(tmp_path / "gate" / "gate.onnx", Embedder(embedder_dir))
    fresh = load_mmlu(write_mmlu(tmp_path / "fresh", {s: 10 for s in subjects}, seed=5), "test")
    for subject in subjects:
        routed = [gate.names[int(gate(e.gate_text).values.argmax())] for e in fresh if e.subject == subject]
        assert routed.count(subject) >= 9, f"{subject} routed to {routed}"


@pytest.mark.timeout(60)
def test_coordinator_zero_gate_expert_serves_alone(embedder_dir, tmp_path, start_agent, tiny_model_path):
    """An expert whose gate value underflows to 0 still serves once the other is dropped."""
    prompt = "the quick brown fox"
    cramped = start_agent(tiny_model_path, name="cramped", n_ctx=16)
    roomy = start_agent(tiny_model_path, name="roomy")
    embedding = Embedder(embedder_dir).embed([prompt])[0].astype(np.float64)
    # Gate logits are [200, -200] for this prompt, so the float32 softmax is exactly [1, 0].
    weights = np.outer(embedding / embedding.dot(embedding), [200.0, -200.0])
    write_linear_gate(tmp_path / "gate.onnx", weights, [("cramped", None), ("roomy", None)])
    gate = Gate.load(tmp_path / "gate.onnx", Embedder(embedder_dir)).for_experts(["cramped", "roomy"])
    assert gate(prompt).values.tolist() == [1.0, 0.0]
    config = parse_config({"experts": [{"name": "cramped", "endpoint": cramped.address},
                                       {"name": "roomy", "endpoint": roomy.address}],
                           "selection": {"top_k": 2},
                           "sampling": {"temperature": 0.0, "max_tokens": 20},
                           "timeouts": {"handshake_s": 10.0}})

    async def run():
        async with Coordinator(config, gate) as coordinator:
            return await coordinator.generate(prompt)

    result = asyncio.run(run())

    assert len(result.tokens) == 20
    reports = {expert.name: expert for expert in result.experts}
    assert "context_overflow" in reports["cramped"].drop_reason
    assert reports["roomy"].weight == 0.0
    assert reports["roomy"].served_steps > 0
    assert reports["roomy"].served_steps + reports["cramped"].served_steps >= 20
