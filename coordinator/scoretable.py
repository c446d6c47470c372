"""The score table: teacher-forced target log-probabilities of every expert, in one NPZ.

Written by `moe2 score`, read by `moe2 train-gate` and `moe2 select`. Keys:

    logprobs          float32 [n_targets_total, N]  log f_n(h_t)[y_t] of every target token
                                                    under every expert n (columns in expert order)
    offsets           int64 [n_examples + 1]       example i owns rows offsets[i]:offsets[i+1]
    experts           str [N]                       expert names, in column order
    fingerprints      str [N]                       expert fingerprints (model, LoRA, domain prompt)
    example_ids       str [n_examples]              stable ids, like "mmlu/test/anatomy/17"
    meta_json         str scalar                    JSON: data set path and hash, prompt format, created
    optional:
    subjects          str [n_examples]
    gate_texts        str [n_examples]              the text the gate embeds for each example: the
                                                    prompt without k-shot exemplars
    choice_logprobs   float32 [n_examples, N, C]    log-probability of each answer letter at the
                                                    answer position (multiple choice)
    answers           int64 [n_examples]            index of the correct choice

Strings are stored as numpy unicode arrays, so `np.load(path, allow_pickle=False)` reads
every key.

The loss of subset S on example i with gate values g (softmax over all N experts) is
    w_n = g_n / sum_{m in S} g_m,   loss_i = - sum_t log sum_{n in S} w_n exp(logprobs[t, n]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ScoreTableError(ValueError):
    """A score table whose arrays are missing or inconsistent; the message names the key."""


@dataclass
class ScoreTable:
    logprobs: np.ndarray                  # float32 [n_targets_total, N]
    offsets: np.ndarray                   # int64 [n_examples + 1]
    experts: list[str]
    # Required in files; optional in memory, for loss tables built from synthetic data.
    fingerprints: list[str] | None = None
    example_ids: list[str] | None = None
    meta: dict = field(default_factory=dict)
    subjects: list[str] | None = None
    gate_texts: list[str] | None = None
    choice_logprobs: np.ndarray | None = None   # float32 [n_examples, N, C]
    answers: np.ndarray | None = None           # int64 [n_examples]

    @property
    def n_experts(self) -> int:
        return self.logprobs.shape[1]

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def is_multiple_choice(self) -> bool:
        return self.choice_logprobs is not None and self.answers is not None

    def example_rows(self) -> np.ndarray:
        """Return the example index of every target row, int64 [n_targets_total]."""
        return np.repeat(np.arange(self.n_examples), np.diff(self.offsets))

    def validate(self, source: str = "score table") -> None:
        n = self.n_examples
        if self.logprobs.ndim != 2 or self.logprobs.shape[1] < 1:
            raise ScoreTableError(f"{source}: logprobs has shape {self.logprobs.shape}, expected [n_targets, N >= 1]")
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ScoreTableError(f"{source}: offsets must be 1-D and start at 0")
        if self.offsets[-1] != self.logprobs.shape[0] or np.any(np.diff(self.offsets) < 1):
            raise ScoreTableError(f"{source}: offsets must rise by at least 1 per example up to "
                                  f"the number of logprobs rows ({self.logprobs.shape[0]})")
        if not np.all(np.isfinite(self.logprobs)) or np.any(self.logprobs > 0):
            raise ScoreTableError(f"{source}: logprobs must be finite log-probabilities (<= 0)")
        for key, values, size in (("experts", self.experts, self.n_experts),
                                  ("fingerprints", self.fingerprints, self.n_experts),
                                  ("example_ids", self.example_ids, n),
                                  ("subjects", self.subjects, n), ("gate_texts", self.gate_texts, n)):
            if values is not None and len(values) != size:
                raise ScoreTableError(f"{source}: {key} has {len(values)} entries, expected {size}")
        if self.example_ids is not None and len(set(self.example_ids)) != n:
            raise ScoreTableError(f"{source}: example_ids are not unique")
        if (self.choice_logprobs is None) != (self.answers is None):
            raise ScoreTableError(f"{source}: choice_logprobs and answers must be present together")
        if self.choice_logprobs is not None:
            shape = self.choice_logprobs.shape
            if len(shape) != 3 or shape[:2] != (n, self.n_experts):
                raise ScoreTableError(f"{source}: choice_logprobs has shape {shape}, expected [{n}, {self.n_experts}, C]")
            if np.any((self.answers < 0) | (self.answers >= shape[2])):
                raise ScoreTableError(f"{source}: answers must index the {shape[2]} choices")

    def subset_examples(self, indices: np.ndarray) -> ScoreTable:
        """Return a table of the examples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = np.diff(self.offsets)[indices]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]) \
            if len(indices) else np.zeros(0, np.int64)
        pick = (lambda values: None if values is None else [values[i] for i in indices])
        return ScoreTable(
            logprobs=self.logprobs[rows], offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            experts=list(self.experts), fingerprints=None if self.fingerprints is None else list(self.fingerprints),
            example_ids=pick(self.example_ids), meta=dict(self.meta), subjects=pick(self.subjects),
            gate_texts=pick(self.gate_texts),
            choice_logprobs=None if self.choice_logprobs is None else self.choice_logprobs[indices],
            answers=None if self.answers is None else self.answers[indices])


def save_score_table(table: ScoreTable, path: Path | str) -> None:
    """Validate `table` and write it atomically as an uncompressed NPZ."""
    table.validate()
    for key in ("fingerprints", "example_ids"):
        if getattr(table, key) is None:
            raise ScoreTableError(f"a score table file needs {key}; set them before saving")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "logprobs": np.asarray(table.logprobs, dtype=np.float32),
        "offsets": np.asarray(table.offsets, dtype=np.int64),
        "experts": np.array(table.experts, dtype=np.str_),
        "fingerprints": np.array(table.fingerprints, dtype=np.str_),
        "example_ids": np.array(table.example_ids, dtype=np.str_),
        "meta_json": np.array(json.dumps(table.meta, sort_keys=True), dtype=np.str_),
    }
    if table.subjects is not None:
        arrays["subjects"] = np.array(table.subjects, dtype=np.str_)
    if table.gate_texts is not None:
        arrays["gate_texts"] = np.array(table.gate_texts, dtype=np.str_)
    if table.choice_logprobs is not None:
        arrays["choice_logprobs"] = np.asarray(table.choice_logprobs, dtype=np.float32)
        arrays["answers"] = np.asarray(table.answers, dtype=np.int64)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    partial.replace(path)


def load_score_table(path: Path | str) -> ScoreTable:
    """Read and validate a score table NPZ written by `save_score_table`."""
    path = Path(path)
    if not path.is_file():
        raise ScoreTableError(f"score table {path} not found; write it with `moe2 score`")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("logprobs", "offsets", "experts", "fingerprints", "example_ids", "meta_json")
                   if k not in data]
        if missing:
            raise ScoreTableError(f"score table {path} lacks keys {missing}")

        def strings(key: str) -> list[str] | None:
            return [str(v) for v in data[key]] if key in data else None

        table = ScoreTable(
            logprobs=np.asarray(data["logprobs"], dtype=np.float32),
            offsets=np.asarray(data["offsets"], dtype=np.int64),
            experts=strings("experts"), fingerprints=strings("fingerprints"),
            example_ids=strings("example_ids"), meta=json.loads(str(data["meta_json"])),
            subjects=strings("subjects"), gate_texts=strings("gate_texts"),
            choice_logprobs=np.asarray(data["choice_logprobs"], dtype=np.float32) if "choice_logprobs" in data else None,
            answers=np.asarray(data["answers"], dtype=np.int64) if "answers" in data else None)
    table.validate(str(path))
    return table


# --- losses and accuracy over a table ----------------------------------------------------------

def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    top = values.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def example_losses(table: ScoreTable, gates: np.ndarray) -> np.ndarray:
    """Return the mixture loss of every example, float64 [n_examples], for gates [n_examples, N].

    Gates are renormalized over each row, so a subset is given by zeroing the other columns.
    """
    gates = np.asarray(gates, dtype=np.float64)
    weights = gates / gates.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights)[table.example_rows()]           # [T, N]
    per_row = -_logsumexp(log_weights + table.logprobs.astype(np.float64), axis=1)
    return np.add.reduceat(per_row, table.offsets[:-1]) if len(per_row) else np.zeros(0)


def single_expert_losses(table: ScoreTable) -> np.ndarray:
    """Return the loss of every example under every expert alone, float64 [n_examples, N]."""
    per_row = -table.logprobs.astype(np.float64)
    return np.add.reduceat(per_row, table.offsets[:-1], axis=0)


def fused_choices(table: ScoreTable, gates: np.ndarray) -> np.ndarray:
    """Return the chosen answer of every example under the gate-weighted fused distribution."""
    if not table.is_multiple_choice:
        raise ScoreTableError("the score table has no choice_logprobs; accuracy needs multiple-choice data")
    gates = np.asarray(gates, dtype=np.float64)
    weights = gates / gates.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        fused = _logsumexp(np.log(weights)[:, :, None] + table.choice_logprobs.astype(np.float64), axis=1)
    return fused.argmax(axis=1)


def accuracy(table: ScoreTable, gates: np.ndarray) -> float:
    """Return the fraction of examples whose fused answer is the correct choice."""
    return float(np.mean(fused_choices(table, gates) == table.answers)) if table.n_examples else float("nan")
