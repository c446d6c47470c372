"""Tests of the data set loaders and prompt formats that `moe2 score` and `moe2 cluster` read."""

from __future__ import annotations

import json

import pytest

from coordinator.datasets import (DatasetError, PromptFormat, dataset_hash, detect_kind, load_arc, load_dataset,
                                  load_mmlu, load_prompt_target_jsonl)
from pipeline_fixtures import write_mmlu


@pytest.fixture(scope="module")
def mmlu(tmp_path_factory):
    return write_mmlu(tmp_path_factory.mktemp("mmlu"), {"algebra": 4, "law": 2}, seed=3)


def test_mmlu_zero_shot_prompt_layout(mmlu):
    examples = load_mmlu(mmlu, "test")
    first = examples[0]
    assert [e.id for e in examples[:2]] == ["mmlu/test/algebra/0", "mmlu/test/algebra/1"]
    assert first.prompt.startswith("The following are multiple choice questions (with answers) about algebra.\n\n")
    assert first.prompt.endswith("\nAnswer:")
    assert "\nA. " in first.prompt
    assert "\nD. " in first.prompt
    assert first.target == " " + "ABCD"[first.answer]
    assert first.gate_text == first.prompt


def test_mmlu_k_shot_uses_dev_rows(mmlu):
    zero = load_mmlu(mmlu, "test", subjects=["law"])
    five = load_mmlu(mmlu, "test", PromptFormat.parse("5-shot"), subjects=["law"])
    dev = load_mmlu(mmlu, "dev", subjects=["law"])
    assert five[0].prompt.count("\nAnswer: ") == 5
    assert dev[4].question in five[0].prompt
    assert five[0].prompt.endswith(zero[0].prompt.split("\n\n", 1)[1])
    # The gate embeds the question without the exemplars.
    assert five[0].gate_text == zero[0].prompt


def test_mmlu_per_subject_keeps_first_rows(mmlu):
    examples = load_mmlu(mmlu, "test", per_subject=1)
    assert [e.id for e in examples] == ["mmlu/test/algebra/0", "mmlu/test/law/0"]


def test_mmlu_bad_answer_letter_names_row(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(DatasetError, match="row 2: answer 'E' is not one of A, B, C, D"):
        load_mmlu(tmp_path, "test")


def test_arc_lines_become_lettered_prompts(tmp_path):
    path = tmp_path / "arc_easy.jsonl"
    path.write_text(json.dumps({"query": "Question: Which is a gas?", "choices": ["ice", "steam", "rock"], "gold": 1}) + "\n")
    [example] = load_arc(path)
    assert example.id == "arc_easy/0"
    assert example.prompt == "Which is a gas?\nA. ice\nB. steam\nC. rock\nAnswer:"
    assert example.target == " B"
    assert detect_kind(path) == "arc"


def test_arc_gold_out_of_range_is_rejected(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"query": "Question: q", "choices": ["a"], "gold": 3}) + "\n")
    with pytest.raises(DatasetError, match="line 1: gold 3 is not an index into 1 choices"):
        load_arc(path)


def test_prompt_target_jsonl_rejects_duplicate_ids(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "target": "t"}) + "\n"
                    + json.dumps({"id": "a", "prompt": "p2", "target": "t2"}) + "\n")
    with pytest.raises(DatasetError, match="id 'a' is used twice"):
        load_prompt_target_jsonl(path)


def test_dataset_hash_follows_prompt_format(mmlu):
    zero = load_dataset(mmlu, "test", PromptFormat(0))
    assert dataset_hash(zero) == dataset_hash(load_dataset(mmlu, "test", PromptFormat(0)))
    assert dataset_hash(zero) != dataset_hash(load_dataset(mmlu, "test", PromptFormat(2)))


def test_prompt_format_rejects_unknown_name():
    assert PromptFormat.parse("zero-shot").shots == 0
    assert PromptFormat.parse("3-shot").name == "3-shot"
    with pytest.raises(DatasetError, match="prompt format 'few' is invalid"):
        PromptFormat.parse("few")
