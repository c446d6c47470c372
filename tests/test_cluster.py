"""Tests of `moe2 cluster`: K-means, per-cluster files and the composition report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator import cli
from coordinator.cluster import ClusterError, kmeans
from coordinator.embedder_export import export_embedder
from pipeline_fixtures import DOMAIN_WORDS, write_mmlu, write_tiny_bert


def blobs(seed: int = 0, per_blob: int = 40):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    labels = np.repeat(np.arange(4), per_blob)
    return centers[labels] + rng.standard_normal((len(labels), 2)), labels


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs()
    result = kmeans(x, 4, seed=0)
    for blob in range(4):
        assert len(set(result.labels[truth == blob])) == 1
    assert len(set(result.labels)) == 4


def test_kmeans_same_seed_same_result():
    x, _ = blobs(seed=1)
    noisy = x + np.random.default_rng(2).standard_normal(x.shape) * 4
    first = kmeans(noisy, 3, seed=5)
    second = kmeans(noisy, 3, seed=5)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centroids, second.centroids)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ClusterError, match="cannot make 5 clusters from 3 texts"):
        kmeans(np.zeros((3, 2)), 5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    export_embedder(write_tiny_bert(root / "bert"), root / "embedder", "tiny")
    write_mmlu(root / "mmlu", {s: 5 for s in DOMAIN_WORDS}, seed=0)
    return root


def run_cluster(corpus, output, *extra):
    argv = ["cluster", "--data", str(corpus / "mmlu"), "--k", "4", "--embedder", str(corpus / "embedder"),
            "--output", str(output), *extra]
    return cli.main(argv)


def test_cluster_command_is_reproducible(corpus, tmp_path):
    assert run_cluster(corpus, tmp_path / "a", "--seed", "3") == 0
    assert run_cluster(corpus, tmp_path / "b", "--seed", "3") == 0
    for name in ("assignments.jsonl", "composition.csv", "prompts/domain_0.txt", "cluster_2/train.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_cluster_command_writes_every_output(corpus, tmp_path, capsys):
    assert run_cluster(corpus, tmp_path, "--exemplars", "2") == 0
    summary = json.loads((tmp_path / "clusters.json").read_text())
    # dev has 5 rows and val 5 rows per subject: 40 questions in all.
    assert summary["examples"] == 40
    assert sum(c["size"] for c in summary["clusters"]) == 40
    assert (tmp_path / "composition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top subjects" in capsys.readouterr().out
    for c in summary["clusters"]:
        records = [json.loads(line) for line in (tmp_path / f"cluster_{c['cluster']}" / "train.jsonl").open()]
        assert len(records) == c["size"]
        assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
        prompt = (tmp_path / c["domain_prompt"]).read_text()
        assert prompt.count("Answer: ") == 2
        assert len(c["exemplar_ids"]) == 2


def test_cluster_finds_one_cluster_per_domain(corpus, tmp_path):
    """Four subjects with disjoint words: each cluster is led by a different subject.

    The tiny embedder has random weights, so a few questions may land in another
    subject's cluster; the leading subjects must still differ.
    """
    assert run_cluster(corpus, tmp_path) == 0
    summary = json.loads((tmp_path / "clusters.json").read_text())
    leaders = [c["top_subjects"][0] for c in summary["clusters"]]
    assert sorted(leaders) == sorted(DOMAIN_WORDS), summary["clusters"]


def test_cluster_takes_k_from_config(corpus, tmp_path):
    config = tmp_path / "moe2.toml"
    config.write_text("".join(f'[[experts]]\nname = "e{i}"\nendpoint = "tcp://127.0.0.1:{5550 + i}"\n'
                              for i in range(2)))
    argv = ["cluster", "--data", str(corpus / "mmlu"), "--config", str(config),
            "--embedder", str(corpus / "embedder"), "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "out" / "clusters.json").read_text())["k"] == 2


def test_cluster_without_k_or_config_fails(corpus, tmp_path, caplog):
    argv = ["cluster", "--data", str(corpus / "mmlu"), "--embedder", str(corpus / "embedder"),
            "--output", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "pass --k or --config" in caplog.text
