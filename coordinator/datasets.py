"""Evaluation and training data sets: MMLU CSV folders, ARC JSONL, generic JSONL.

Every loader returns `Example`s with a stable id, the prompt text sent to the experts,
and the target text whose tokens are scored. Multiple-choice examples also carry the
choices and the index of the correct one.

Supported layouts:
- MMLU in its original release layout: `ROOT/{dev,val,test}/SUBJECT_{split}.csv`, no
  header, columns question, A, B, C, D, answer (a letter). The subject is the file name
  without `_{split}.csv`.
- ARC as JSON lines `{"query": "Question: ...", "choices": [...], "gold": INDEX}`.
- Generic JSON lines `{"prompt": ..., "target": ...}` with optional `id` and `subject`.

Multiple-choice prompts follow the MMLU paper's format: a header naming the subject,
k solved exemplars from the dev split (k = 0 for zero-shot), then the question, its
lettered choices and "Answer:". The target is " X", a space and the correct letter.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

LETTERS = "ABCDEFGHIJ"
MMLU_SPLITS = ("dev", "val", "test")


class DatasetError(ValueError):
    """A data file that is missing or malformed; the message names the file and row."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    target: str
    subject: str = ""
    question: str = ""                          # the bare question, for clustering
    gate_text: str = ""                         # what the gate embeds: the prompt without k-shot exemplars
    choices: tuple[str, ...] = field(default=())
    answer: int = -1                            # index into choices; -1 if not multiple choice

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices) and self.answer >= 0


@dataclass(frozen=True)
class PromptFormat:
    """Multiple-choice prompt layout: the number of k-shot exemplars (0 = zero-shot)."""

    shots: int = 0

    @property
    def name(self) -> str:
        return "zero-shot" if self.shots == 0 else f"{self.shots}-shot"

    @classmethod
    def parse(cls, text: str) -> PromptFormat:
        """Parse "zero-shot", "0-shot" or "K-shot"."""
        value = text.strip().lower()
        if value == "zero-shot":
            return cls(0)
        if value.endswith("-shot") and value[:-5].isdigit():
            return cls(int(value[:-5]))
        raise DatasetError(f"prompt format {text!r} is invalid; use zero-shot or K-shot, like 5-shot")


def subject_title(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(question: str, choices: tuple[str, ...] | list[str], answer: int | None = None) -> str:
    """Render a question, its lettered choices and "Answer:", with the letter if given."""
    lines = [question.strip()]
    lines += [f"{LETTERS[i]}. {str(choice).strip()}" for i, choice in enumerate(choices)]
    lines.append("Answer:" if answer is None else f"Answer: {LETTERS[answer]}")
    return "\n".join(lines)


def multiple_choice_prompt(subject: str, question: str, choices: tuple[str, ...],
                           exemplars: list[Example] = ()) -> str:
    header = (f"The following are multiple choice questions (with answers) about {subject_title(subject)}.\n\n"
              if subject else "")
    shots = "".join(format_question(e.question, e.choices, e.answer) + "\n\n" for e in exemplars)
    return header + shots + format_question(question, choices)


# --- MMLU ---------------------------------------------------------------------------------

def mmlu_subjects(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found; an MMLU root has dev/, val/ and test/ folders of SUBJECT_{split}.csv")
    suffix = f"_{split}.csv"
    return sorted(p.name[:-len(suffix)] for p in folder.glob(f"*{suffix}"))


def read_mmlu_csv(path: Path, split: str, subject: str) -> list[Example]:
    """Read one subject file as zero-shot examples with ids like mmlu/test/anatomy/17."""
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_number, row in enumerate(csv.reader(f)):
            if len(row) != 6:
                raise DatasetError(f"{path} row {row_number + 1} has {len(row)} columns; "
                                   "expected question,A,B,C,D,answer")
            question, *choices, letter = row
            letter = letter.strip().upper()
            if letter not in LETTERS[:4]:
                raise DatasetError(f"{path} row {row_number + 1}: answer {letter!r} is not one of A, B, C, D")
            answer = LETTERS.index(letter)
            choices = tuple(choices)
            prompt = multiple_choice_prompt(subject, question, choices)
            examples.append(Example(
                id=f"mmlu/{split}/{subject}/{row_number}", prompt=prompt, target=f" {letter}",
                subject=subject, question=question, gate_text=prompt, choices=choices, answer=answer))
    return examples


def load_mmlu(root: Path | str, split: str = "test", prompt_format: PromptFormat = PromptFormat(),
              subjects: list[str] | None = None, per_subject: int | None = None) -> list[Example]:
    """Load an MMLU split; k-shot prompts take the first k rows of the subject's dev file.

    `per_subject` keeps the first rows of each subject (a deterministic subset).
    """
    root = Path(root)
    if split not in MMLU_SPLITS:
        raise DatasetError(f"MMLU split {split!r} is invalid; use one of {', '.join(MMLU_SPLITS)}")
    available = mmlu_subjects(root, split)
    if not available:
        raise DatasetError(f"{root / split} contains no *_{split}.csv files")
    chosen = available if subjects is None else list(subjects)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise DatasetError(f"MMLU subjects not found in {root / split}: {', '.join(unknown)}")

    examples = []
    for subject in chosen:
        rows = read_mmlu_csv(root / split / f"{subject}_{split}.csv", split, subject)
        if per_subject is not None:
            rows = rows[:per_subject]
        if prompt_format.shots:
            dev_path = root / "dev" / f"{subject}_dev.csv"
            if not dev_path.is_file():
                raise DatasetError(f"{dev_path} not found; {prompt_format.name} prompts need the dev split")
            exemplars = read_mmlu_csv(dev_path, "dev", subject)[:prompt_format.shots]
            if len(exemplars) < prompt_format.shots:
                raise DatasetError(f"{dev_path} has {len(exemplars)} rows, fewer than {prompt_format.shots} shots")
            rows = [replace(e, prompt=multiple_choice_prompt(subject, e.question, e.choices, exemplars))
                    for e in rows]
        examples.extend(rows)
    return examples


# --- JSON lines ---------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path} line {line_number} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path} line {line_number} is not a JSON object")
            rows.append((line_number, row))
    if not rows:
        raise DatasetError(f"{path} contains no examples")
    return rows


def load_arc(path: Path | str) -> list[Example]:
    """Load ARC JSON lines: the query (with "Question: " removed), lettered choices, gold index."""
    path = Path(path)
    examples = []
    for line_number, row in _read_jsonl(path):
        query, choices, gold = row.get("query"), row.get("choices"), row.get("gold")
        if not isinstance(query, str) or not isinstance(choices, list) or not choices:
            raise DatasetError(f"{path} line {line_number}: expected query (string) and choices (non-empty list)")
        if len(choices) > len(LETTERS):
            raise DatasetError(f"{path} line {line_number}: {len(choices)} choices, at most {len(LETTERS)} are supported")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DatasetError(f"{path} line {line_number}: gold {gold!r} is not an index into {len(choices)} choices")
        question = query.removeprefix("Question:").strip()
        choices = tuple(str(c) for c in choices)
        prompt = multiple_choice_prompt("", question, choices)
        examples.append(Example(
            id=f"{path.stem}/{line_number - 1}", prompt=prompt, target=f" {LETTERS[gold]}", subject=path.stem,
            question=question, gate_text=prompt, choices=choices, answer=gold))
    return examples


def load_prompt_target_jsonl(path: Path | str) -> list[Example]:
    """Load generic `{prompt, target}` JSON lines; `id` and `subject` are optional."""
    path = Path(path)
    examples = []
    seen: set[str] = set()
    for line_number, row in _read_jsonl(path):
        prompt, target = row.get("prompt"), row.get("target")
        if not isinstance(prompt, str) or not isinstance(target, str) or not target:
            raise DatasetError(f"{path} line {line_number}: expected string prompt and non-empty string target")
        example_id = str(row.get("id", f"{path.stem}/{line_number - 1}"))
        if example_id in seen:
            raise DatasetError(f"{path} line {line_number}: id {example_id!r} is used twice")
        seen.add(example_id)
        examples.append(Example(id=example_id, prompt=prompt, target=target,
                                subject=str(row.get("subject", "")), question=prompt, gate_text=prompt))
    return examples


# --- dispatch and identity ------------------------------------------------------------------

def detect_kind(path: Path) -> str:
    """Return "mmlu", "arc" or "jsonl" from the layout of `path`."""
    if path.is_dir():
        return "mmlu"
    if not path.is_file():
        raise DatasetError(f"data set {path} not found")
    first = _read_jsonl(path)[0][1]
    if "query" in first and "choices" in first:
        return "arc"
    if "prompt" in first and "target" in first:
        return "jsonl"
    raise DatasetError(f"{path}: cannot tell the layout from keys {sorted(first)}; "
                       "expected ARC (query, choices, gold) or generic (prompt, target)")


def load_dataset(path: Path | str, split: str = "test", prompt_format: PromptFormat = PromptFormat(),
                 per_subject: int | None = None, kind: str | None = None) -> list[Example]:
    """Load any supported data set; `split`, `prompt_format` and `per_subject` apply to MMLU."""
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind == "mmlu":
        return load_mmlu(path, split, prompt_format, per_subject=per_subject)
    if kind == "arc":
        if prompt_format.shots:
            raise DatasetError("ARC has no dev split here, so only zero-shot prompts are supported")
        return load_arc(path)
    if kind == "jsonl":
        return load_prompt_target_jsonl(path)
    raise DatasetError(f"data set kind {kind!r} is invalid; use mmlu, arc or jsonl")


def dataset_hash(examples: list[Example]) -> str:
    """Return the sha256 of the examples' ids, prompts, targets and answers, in order."""
    digest = hashlib.sha256()
    for e in examples:
        record = [e.id, e.prompt, e.target, list(e.choices), e.answer]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
