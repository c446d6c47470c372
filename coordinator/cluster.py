"""`moe2 cluster`: find domains in a prompt corpus, one per expert.

The corpus texts (for MMLU, the bare question texts) are embedded, then grouped by
K-means with a fixed seed (k-means++ initialization, the best of several restarts by
inertia). For every cluster the command writes:

- `cluster_I/train.jsonl`: the cluster's examples as chat records
  `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, a layout that
  common LoRA fine-tuning tools read (TRL's SFTTrainer, axolotl, LLaMA-Factory);
- `prompts/domain_I.txt`: a domain prompt of the exemplars nearest the centroid,
  question and answer, for experts without fine-tuning;

and for the whole run `assignments.jsonl`, `clusters.json` (sizes, top subjects,
composition, seed, embedder, data hash), `composition.csv` and the heat map
`composition.png` of cluster composition by subject.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.datasets import (DatasetError, Example, PromptFormat, dataset_hash, format_question,
                                  load_dataset, subject_title)

log = logging.getLogger("moe2.cluster")

HELP = "cluster a prompt corpus into domains, one per expert: data sets, domain prompts, composition"


class ClusterError(ValueError):
    """Invalid clustering input, such as more clusters than texts."""


# --- K-means ---------------------------------------------------------------------------------

@dataclass
class KMeansResult:
    labels: np.ndarray        # int64 [n]
    centroids: np.ndarray     # float64 [k, dim]
    inertia: float            # sum of squared distances to the assigned centroid
    iterations: int


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :], 0.0)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(len(x))]]
    closest = _squared_distances(x, centroids[0][None, :])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        # All points coincide with a centroid: any point will do.
        index = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=closest / total)
        centroids.append(x[index])
        closest = np.minimum(closest, _squared_distances(x, x[index][None, :])[:, 0])
    return np.array(centroids)


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-6) -> KMeansResult:
    """Cluster rows of `x` into k groups (Lloyd iterations from k-means++ seeds).

    Same input and seed give the same result. Clusters are renumbered by their smallest
    member index, so the numbering does not depend on the restart that won.
    """
    x = np.asarray(x, dtype=np.float64)
    if not 1 <= k <= len(x):
        raise ClusterError(f"cannot make {k} clusters from {len(x)} texts; k must be from 1 to the number of texts")
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centroids = _kmeans_plus_plus(x, k, rng)
        for iteration in range(1, max_iter + 1):
            labels = _squared_distances(x, centroids).argmin(1)
            updated = centroids.copy()
            for c in range(k):
                members = x[labels == c]
                if len(members):
                    updated[c] = members.mean(0)
                else:
                    # An empty cluster takes the point farthest from its centroid.
                    far = _squared_distances(x, centroids)[np.arange(len(x)), labels].argmax()
                    updated[c] = x[far]
            shift = float(((updated - centroids) ** 2).sum())
            centroids = updated
            if shift <= tol:
                break
        labels = _squared_distances(x, centroids).argmin(1)
        inertia = float(_squared_distances(x, centroids)[np.arange(len(x)), labels].sum())
        if best is None or inertia < best.inertia - 1e-9:
            best = KMeansResult(labels, centroids, inertia, iteration)

    # Renumber clusters in order of first appearance.
    order = list(dict.fromkeys(best.labels.tolist()))
    order += [c for c in range(k) if c not in order]
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return KMeansResult(remap[best.labels], best.centroids[order], best.inertia, best.iterations)


# --- outputs -------------------------------------------------------------------------------

def composition(labels: np.ndarray, subjects: list[str], k: int) -> tuple[list[str], np.ndarray]:
    """Return the subjects (sorted) and counts int64 [k, n_subjects] of examples per cluster and subject."""
    names = sorted(set(subjects))
    counts = np.zeros((k, len(names)), np.int64)
    column = {name: i for i, name in enumerate(names)}
    for label, subject in zip(labels, subjects):
        counts[label, column[subject]] += 1
    return names, counts


def answer_text(example: Example) -> str:
    if example.is_multiple_choice:
        letter = "ABCDEFGHIJ"[example.answer]
        return f"{letter}. {example.choices[example.answer]}"
    return example.target.strip()


def domain_prompt(examples: list[Example], top_subjects: list[str]) -> str:
    """Render exemplars as solved questions under a header naming the cluster's main subjects."""
    topics = ", ".join(subject_title(s) for s in top_subjects if s)
    header = f"You are an expert in {topics}." if topics else "You are a domain expert."
    parts = [header, "Here are solved examples from your domain.", ""]
    for e in examples:
        if e.is_multiple_choice:
            parts += [format_question(e.question, e.choices, e.answer), ""]
        else:
            parts += [e.prompt.strip(), e.target.strip(), ""]
    return "\n".join(parts)


def write_heat_map(path: Path, subjects: list[str], counts: np.ndarray) -> None:
    """Plot the share of each subject's examples that falls in each cluster."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
    k, n = counts.shape
    figure, axes = plt.subplots(figsize=(max(6, 0.22 * n + 2), 1.0 + 0.5 * k))
    image = axes.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes.set_xticks(range(n), [subject_title(s) for s in subjects], rotation=90, fontsize=6)
    axes.set_yticks(range(k), [f"cluster {c}" for c in range(k)], fontsize=8)
    axes.set_title("Share of each subject's questions per cluster")
    figure.colorbar(image, ax=axes, fraction=0.02, pad=0.01)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def composition_table(subjects: list[str], counts: np.ndarray, top: int = 4) -> str:
    """Return a plain-text table: cluster, size, and its largest subjects with their counts."""
    lines = [f"{'cluster':<8}{'size':>6}  top subjects (questions)"]
    for c in range(counts.shape[0]):
        order = np.argsort(-counts[c], kind="stable")[:top]
        named = ", ".join(f"{subject_title(subjects[i])} ({counts[c, i]})" for i in order if counts[c, i])
        lines.append(f"{c:<8}{int(counts[c].sum()):>6}  {named}")
    return "\n".join(lines)


def pick_exemplars(examples: list[Example], nearest: np.ndarray, count: int, max_chars: int | None) -> list[int]:
    """Return up to `count` indices from `nearest` (closest first), preferring short exemplars.

    Exemplars longer than `max_chars` are used only when too few short ones exist, so a
    domain prompt stays cheap to prefill on an edge device.
    """
    def length(i: int) -> int:
        e = examples[i]
        return len(format_question(e.question, e.choices, e.answer)) if e.is_multiple_choice else len(e.prompt)

    short = [int(i) for i in nearest if max_chars is None or length(int(i)) <= max_chars]
    chosen = short[:count]
    chosen += [int(i) for i in nearest if int(i) not in chosen][:count - len(chosen)]
    return chosen


def run_clustering(examples: list[Example], embeddings: np.ndarray, k: int, seed: int, output: Path,
                   exemplars: int, meta: dict, max_exemplar_chars: int | None = None) -> dict:
    """Cluster, then write every output file; return the summary written to clusters.json."""
    result = kmeans(embeddings, k, seed)
    subjects = [e.subject for e in examples]
    names, counts = composition(result.labels, subjects, k)
    distances = np.sqrt(_squared_distances(np.asarray(embeddings, np.float64), result.centroids))
    output.mkdir(parents=True, exist_ok=True)
    (output / "prompts").mkdir(exist_ok=True)

    clusters = []
    for c in range(k):
        members = np.flatnonzero(result.labels == c)
        nearest = members[np.argsort(distances[members, c], kind="stable")]
        top = [names[i] for i in np.argsort(-counts[c], kind="stable")[:3] if counts[c, i]]
        folder = output / f"cluster_{c}"
        folder.mkdir(exist_ok=True)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
            for i in nearest:
                record = {"messages": [{"role": "user", "content": examples[i].prompt},
                                       {"role": "assistant", "content": answer_text(examples[i])}],
                          "id": examples[i].id, "subject": examples[i].subject}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        prompt_path = output / "prompts" / f"domain_{c}.txt"
        chosen = pick_exemplars(examples, nearest, exemplars, max_exemplar_chars)
        prompt_path.write_text(domain_prompt([examples[i] for i in chosen], top), encoding="utf-8")
        clusters.append({"cluster": c, "size": int(len(members)), "top_subjects": top,
                         "domain_prompt": str(prompt_path.relative_to(output)),
                         "exemplar_ids": [examples[i].id for i in chosen],
                         "composition": {names[i]: int(counts[c, i]) for i in np.flatnonzero(counts[c])}})

    with open(output / "assignments.jsonl", "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            f.write(json.dumps({"id": e.id, "subject": e.subject, "cluster": int(result.labels[i]),
                                "distance": round(float(distances[i, result.labels[i]]), 6)}) + "\n")
    with open(output / "composition.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["cluster", *names])
        for c in range(k):
            writer.writerow([c, *counts[c].tolist()])
    write_heat_map(output / "composition.png", names, counts)

    summary = dict(meta, k=k, seed=seed, inertia=result.inertia, iterations=result.iterations,
                   examples=len(examples), clusters=clusters)
    (output / "clusters.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


# --- command line --------------------------------------------------------------------------

def experts_in_config(path: Path) -> int:
    """Return the number of [[experts]] in a coordinator TOML file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ClusterError(f"cannot read experts from {path}: {exc}") from None
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise ClusterError(f"{path} has no [[experts]] tables; pass --k")
    return len(experts)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="corpus: an MMLU root folder, ARC JSONL, or {prompt, target} JSONL")
    parser.add_argument("--split", default="dev,val",
                        help="MMLU splits to cluster, comma-separated (default: dev,val, which keeps "
                             "the test split out of the domain prompts)")
    parser.add_argument("--k", type=int, default=None, help="number of clusters (default: the experts in --config)")
    parser.add_argument("--config", type=Path, default=None, help="coordinator TOML whose [[experts]] count sets K")
    parser.add_argument("--seed", type=int, default=0, help="K-means seed (default: 0)")
    parser.add_argument("--exemplars", type=int, default=3,
                        help="exemplars nearest the centroid in each domain prompt (default: 3)")
    parser.add_argument("--max-exemplar-chars", type=int, default=600,
                        help="prefer exemplars of at most this many characters, so domain prompts stay short "
                             "(default: 600; 0 turns the limit off)")
    parser.add_argument("--embedder", type=Path, default=None,
                        help="embedder folder (default: the model cache's embedder folder, see `moe2 export-embedder`)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the cluster files")


def run(args: argparse.Namespace) -> int:
    from coordinator.embedder_export import default_output
    from coordinator.embedding import Embedder, EmbedderError

    try:
        if args.k is None and args.config is None:
            raise ClusterError("pass --k or --config (a coordinator TOML whose [[experts]] count sets K)")
        k = args.k if args.k is not None else experts_in_config(args.config)
        if args.exemplars < 0:
            raise ClusterError(f"--exemplars must be 0 or more, got {args.exemplars}")
        examples: list[Example] = []
        splits = [s.strip() for s in args.split.split(",") if s.strip()]
        if args.data.is_dir():
            for split in splits:
                examples += load_dataset(args.data, split, PromptFormat(0))
        else:
            examples = load_dataset(args.data)
        embedder = Embedder(args.embedder or default_output())
        log.info("embedding %d texts with %s", len(examples), embedder.name)
        embeddings = embedder.embed([e.question or e.prompt for e in examples])
        meta = {"data": str(args.data), "splits": splits if args.data.is_dir() else None,
                "dataset_hash": dataset_hash(examples), "embedder": embedder.describe()}
        summary = run_clustering(examples, embeddings, k, args.seed, args.output, args.exemplars, meta,
                                 args.max_exemplar_chars or None)
    except (ClusterError, DatasetError, EmbedderError) as exc:
        log.error("%s", exc)
        return 1

    names = sorted({s for c in summary["clusters"] for s in c["composition"]})
    counts = np.array([[c["composition"].get(n, 0) for n in names] for c in summary["clusters"]])
    print(composition_table(names, counts))
    log.info("wrote %d clusters to %s", k, args.output)
    return 0
