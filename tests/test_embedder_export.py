"""Tests of `moe2 export-embedder` and the runtime embedder built on ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator import embedder_export
from coordinator.embedder_export import ExportError, export_embedder
from coordinator.embedding import Embedder, EmbedderError, resolve_providers
from pipeline_fixtures import reference_embed, write_tiny_bert

TEXTS = [
    "which of the following is true of the equation root ?",
    "the muscle bone nerve",
    "court",
    "what is the galaxy orbit of a comet star planet moon nebula telescope ?",
    "",
]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    source = write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
    output = tmp_path_factory.mktemp("tiny_export")
    metadata = export_embedder(source, output, "tiny")
    return source, output, metadata


def test_export_matches_numpy_reference(tiny_export):
    source, output, _ = tiny_export
    embedder = Embedder(output, batch_size=8)
    ours = embedder.embed(TEXTS)
    ids = [e.ids for e in embedder.tokenizer.encode_batch(TEXTS)]
    # Padding to the batch's longest text: strip it so the reference gets real tokens only.
    masks = [e.attention_mask for e in embedder.tokenizer.encode_batch(TEXTS)]
    unpadded = [[t for t, m in zip(row, mask) if m] for row, mask in zip(ids, masks)]
    expected = reference_embed(source, unpadded)
    assert ours.shape == (len(TEXTS), 32)
    assert np.abs(ours - expected).max() < 1e-5


def test_export_writes_unit_norm_embeddings(tiny_export):
    _, output, metadata = tiny_export
    embedder = Embedder(output)
    norms = np.linalg.norm(embedder.embed(TEXTS), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert metadata["dim"] == embedder.dim == 32
    assert metadata["max_length"] == 64


def test_embedding_independent_of_batch_padding(tiny_export):
    _, output, _ = tiny_export
    together = Embedder(output, batch_size=8).embed(TEXTS)
    alone = Embedder(output, batch_size=1).embed(TEXTS)
    assert np.abs(together - alone).max() < 1e-5


def test_export_reads_bert_prefixed_weights(tmp_path):
    source = write_tiny_bert(tmp_path / "src", prefix="bert.")
    export_embedder(source, tmp_path / "out", "tiny")
    embedder = Embedder(tmp_path / "out")
    encoding = embedder.tokenizer.encode(TEXTS[0])
    expected = reference_embed(source, [encoding.ids])
    assert np.abs(embedder.embed(TEXTS[:1]) - expected).max() < 1e-5


def test_export_rejects_unsupported_activation(tmp_path):
    source = write_tiny_bert(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["hidden_act"] = "relu"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="hidden_act is 'relu'"):
        export_embedder(source, tmp_path / "out")


def test_export_rejects_cls_pooling(tmp_path):
    source = write_tiny_bert(tmp_path / "src")
    (source / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ExportError, match="pooling_mode_cls_token"):
        export_embedder(source, tmp_path / "out")


def test_export_is_current_detects_changed_weights(tmp_path):
    source = write_tiny_bert(tmp_path / "src", seed=1)
    export_embedder(source, tmp_path / "out")
    assert embedder_export.is_current(source, tmp_path / "out")
    write_tiny_bert(source, seed=2)
    assert not embedder_export.is_current(source, tmp_path / "out")


def test_embedder_missing_folder_names_fix(tmp_path):
    with pytest.raises(EmbedderError, match="moe2 export-embedder"):
        Embedder(tmp_path / "nothing")


def write_sum_embedder(folder, tokenizer_source, reduce: bool) -> None:
    """Write an ONNX "embedder" whose embedding is the masked sum of token ids, 3 times.

    Its inputs include token_type_ids and its output dimension is symbolic ("d"). With
    reduce=False it returns [batch, seq, 3] instead, which is not an embedder output.
    """
    from onnx import TensorProto, helper

    folder.mkdir()
    nodes = [
        helper.make_node("Add", ["input_ids", "token_type_ids"], ["ids_sum"]),
        helper.make_node("Mul", ["ids_sum", "attention_mask"], ["masked"]),
        helper.make_node("Cast", ["masked"], ["masked_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["masked_f", "axis2"], ["expanded"]),
        helper.make_node("Mul", ["expanded", "ones"], ["per_token" if reduce else "embedding"]),
    ]
    shape = ["b", "d"] if reduce else ["b", "s", "d"]
    if reduce:
        nodes.append(helper.make_node("ReduceSum", ["per_token", "axis1"], ["embedding"], keepdims=0))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(
        nodes, "sum", inputs, [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, shape)],
        [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
         helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
         helper.make_tensor("ones", TensorProto.FLOAT, [3], [1.0, 1.0, 1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "tokenizer.json").write_bytes((tokenizer_source / "tokenizer.json").read_bytes())


def test_embedder_accepts_other_onnx_with_same_interface(tmp_path):
    source = write_tiny_bert(tmp_path / "tok")
    write_sum_embedder(tmp_path / "sum", source, reduce=True)
    embedder = Embedder(tmp_path / "sum")
    ids = embedder.tokenizer.encode("court judge").ids
    assert embedder.dim == 3
    np.testing.assert_allclose(embedder.embed(["court judge", "court"])[0], [sum(ids)] * 3)


def test_embedder_rejects_output_not_batch_by_dim(tmp_path):
    source = write_tiny_bert(tmp_path / "tok")
    write_sum_embedder(tmp_path / "sum", source, reduce=False)
    with pytest.raises(EmbedderError, match=r"returns \[batch, dim\]"):
        Embedder(tmp_path / "sum")


def test_resolve_providers_rejects_unknown_name():
    with pytest.raises(EmbedderError, match="'quantum' is not available"):
        resolve_providers(["quantum"])


def test_resolve_providers_maps_aliases():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"


def test_embedder_reports_provider_in_use(tiny_export):
    _, output, _ = tiny_export
    embedder = Embedder(output, providers=["cpu"])
    assert embedder.providers[0] == "CPUExecutionProvider"


# Texts of different kinds and lengths for the comparison with sentence-transformers.
REFERENCE_TEXTS = [
    "Hello world",
    "The mitochondria is the powerhouse of the cell.",
    "",
    "Ünïcödé façade naïve café 東京 Москва",
    "What is the derivative of x^2 + 3x with respect to x? " * 40,
    "a",
    "Which of the following is a prime number? A. 4 B. 6 C. 7 D. 9 Answer:",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "   leading and trailing spaces   ",
    "Le contrat est nul si le consentement a été vicié.",
]


@pytest.mark.timeout(300)
def test_minilm_export_matches_sentence_transformers(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers", reason="reference library sentence-transformers is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    source = embedder_export.default_source()
    export_embedder(source, tmp_path, "all-MiniLM-L6-v2")
    ours = Embedder(tmp_path, batch_size=4).embed(REFERENCE_TEXTS)
    reference = SentenceTransformer(str(source), device="cpu").encode(REFERENCE_TEXTS, normalize_embeddings=True)
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert ours.shape == (len(REFERENCE_TEXTS), 384)
    assert cosine.min() >= 0.999, f"cosine per text: {np.round(cosine, 5).tolist()}"


def test_runtime_modules_do_not_import_torch():
    """Gating, embedding, export, clustering and scoring run where PyTorch is not installed."""
    code = ("import sys; import coordinator.gating, coordinator.embedding, coordinator.embedder_export, "
            "coordinator.cluster, coordinator.scoring, coordinator.scoretable; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sentence_transformers')))")
    root = Path(__file__).resolve().parents[1]
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                            cwd=root)
    assert output.stdout.strip() == "[]"
