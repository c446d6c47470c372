"""`moe2 train-gate`: train the gating network on a score table and export it to ONNX.

The gate maps a prompt embedding x to softmax weights over N experts. Its MLP has two
hidden layers (128 units by default) with PReLU and dropout. The input of every layer
and the last activation are concatenated before the output layer, which gives the
residual connections of the MoE² gate. Training minimizes the mixture negative log-likelihood
over cached target log-probabilities,

    loss(x, y) = - sum_t log sum_n softmax(MLP(x))_n * p_n,t,

with AdamW, ReduceLROnPlateau on the validation loss (stepped once per epoch),
gradient clipping and gradient accumulation. The weights of the epoch with the lowest
validation loss are kept.

This is the only module that imports PyTorch. The exported ONNX file has input
`embedding` float32 [batch, dim] and output `gate` float32 [batch, N]; `gate.json`
beside it names the experts in column order, the embedder, the data hash, the
metrics and the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from coordinator import scoretable
from coordinator.scoretable import ScoreTable

log = logging.getLogger("moe2.train_gate")

HELP = "train the gating network on a score table and export it to ONNX"

GATE_FORMAT = "moe2-gate/1"


class TrainError(RuntimeError):
    """Training inputs that do not fit together; the message names the file or value."""


@dataclass
class TrainSettings:
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    accumulation: int = 8
    clip: float = 1.0
    epochs: int = 60
    plateau_factor: float = 0.8
    plateau_patience: int = 50
    seed: int = 0
    threads: int = 1

    def validate(self) -> None:
        for name in ("hidden", "layers", "batch_size", "accumulation", "epochs", "threads"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise TrainError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.plateau_factor < 1:
            raise TrainError(f"plateau factor must be in (0, 1), got {self.plateau_factor}")
        if self.lr <= 0 or self.clip <= 0:
            raise TrainError(f"learning rate and clip must be positive, got {self.lr} and {self.clip}")


# --- model --------------------------------------------------------------------------------------

def build_model(dim: int, n_experts: int, settings: TrainSettings):
    """Return the gate MLP as a torch module: embedding [B, dim] -> softmax [B, N]."""
    import torch
    from torch import nn

    class GateMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [dim] + [settings.hidden] * settings.layers
            self.hidden = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(settings.layers))
            self.activations = nn.ModuleList(nn.PReLU() for _ in range(settings.layers))
            self.dropout = nn.Dropout(settings.dropout)
            # The output layer takes the input of every hidden layer plus the last activation.
            self.output = nn.Linear(sum(widths), n_experts)

        def logits(self, x):
            features = [x]
            for linear, activation in zip(self.hidden, self.activations):
                x = self.dropout(activation(linear(x)))
                features.append(x)
            return self.output(torch.cat(features, dim=-1))

        def forward(self, x):
            return torch.softmax(self.logits(x), dim=-1)

    return GateMLP()


def mixture_nll(log_weights, logprobs):
    """Return the per-example mixture NLL: -sum_t logsumexp_n(log w_n + logprobs[t, n]).

    log_weights has shape [B, N] and logprobs [B, T, N]. Missing target tokens are padded
    with 0, and each contributes log sum_n w_n = 0.
    """
    import torch
    return -torch.logsumexp(log_weights[:, None, :] + logprobs, dim=-1).sum(dim=-1)


def padded_logprobs(table: ScoreTable) -> np.ndarray:
    """Return float32 [n_examples, T_max, N] target log-probabilities, 0-padded."""
    lengths = np.diff(table.offsets)
    padded = np.zeros((table.n_examples, int(lengths.max()), table.n_experts), dtype=np.float32)
    rows = table.example_rows()
    positions = np.arange(len(rows)) - table.offsets[rows]
    padded[rows, positions] = table.logprobs
    return padded


# --- training -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: object
    best_epoch: int
    history: list[dict]
    seconds: float


def train(embeddings: np.ndarray, table: ScoreTable, train_index: np.ndarray, val_index: np.ndarray,
          settings: TrainSettings) -> TrainResult:
    """Train the gate on the examples in `train_index`; keep the best epoch on `val_index`."""
    import torch

    settings.validate()
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()

    x_all = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    lp_all = torch.from_numpy(padded_logprobs(table))
    x_train, lp_train = x_all[train_index], lp_all[train_index]
    x_val, lp_val = x_all[val_index], lp_all[val_index]

    model = build_model(x_all.shape[1], table.n_experts, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.plateau_factor, patience=settings.plateau_patience)
    generator = torch.Generator().manual_seed(settings.seed)

    def evaluate(x, lp) -> float:
        model.eval()
        with torch.no_grad():
            return float(mixture_nll(torch.log_softmax(model.logits(x), -1), lp).mean())

    history = []
    best = (math.inf, -1, None)
    n_train = len(train_index)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(n_train, generator=generator)
        optimizer.zero_grad()
        total = 0.0
        n_batches = math.ceil(n_train / settings.batch_size)
        for batch_number in range(n_batches):
            batch = order[batch_number * settings.batch_size:(batch_number + 1) * settings.batch_size]
            log_weights = torch.log_softmax(model.logits(x_train[batch]), dim=-1)
            loss = mixture_nll(log_weights, lp_train[batch]).mean()
            (loss / settings.accumulation).backward()
            total += float(loss.detach()) * len(batch)
            if (batch_number + 1) % settings.accumulation == 0 or batch_number + 1 == n_batches:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
                optimizer.step()
                optimizer.zero_grad()

        val_loss = evaluate(x_val, lp_val) if len(val_index) else total / n_train
        scheduler.step(val_loss)
        history.append({"epoch": epoch, "train_loss": total / n_train, "val_loss": val_loss,
                        "lr": optimizer.param_groups[0]["lr"]})
        log.debug("epoch %d: train loss %.4f, validation loss %.4f", epoch, total / n_train, val_loss)
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})

    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, best[1], history, time.perf_counter() - start)


def gate_values(model, embeddings: np.ndarray) -> np.ndarray:
    """Return the trained gate's softmax outputs, float64 [n, N], with PyTorch."""
    import torch
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))).double().numpy()


# --- splits and reports -------------------------------------------------------------------------

def split_examples(table: ScoreTable, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split deterministically and stratified by subject into train and validation indices.

    Within each subject, examples are ordered by a seeded hash of their id, and each gets
    its quantile in that order. The validation set is the round(val_fraction * n)
    examples of highest quantile over all subjects (ties broken by the hash), so every
    subject contributes its share and an example's side does not depend on table order.
    """
    if not 0 < val_fraction < 1:
        raise TrainError(f"validation fraction must be in (0, 1), got {val_fraction}")
    subjects = table.subjects or [""] * table.n_examples
    by_subject: dict[str, list[int]] = {}
    for index, subject in enumerate(subjects):
        by_subject.setdefault(subject, []).append(index)

    def digest(index: int) -> str:
        return hashlib.sha256(f"{seed}:{table.example_ids[index]}".encode()).hexdigest()

    keys = {}
    for indices in by_subject.values():
        for rank, index in enumerate(sorted(indices, key=digest)):
            keys[index] = ((rank + 0.5) / len(indices), digest(index))
    order = sorted(keys, key=keys.get)
    n_val = int(round(table.n_examples * val_fraction))
    if n_val == 0 or n_val == table.n_examples:
        raise TrainError(f"a {val_fraction:g} validation share of {table.n_examples} examples leaves one side empty; "
                         "score more examples or pass --train-ids and --val-ids")
    train_index, val_index = order[:-n_val], order[-n_val:]
    return np.array(sorted(train_index), np.int64), np.array(sorted(val_index), np.int64)


def split_from_files(table: ScoreTable, train_file: Path, val_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Split by explicit id lists, one example id per line."""
    position = {example_id: i for i, example_id in enumerate(table.example_ids)}
    result = []
    for path in (train_file, val_file):
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise TrainError(f"{path}: {len(unknown)} ids are not in the score table, first {unknown[0]!r}")
        result.append(np.array(sorted(position[i] for i in ids), np.int64))
    overlap = set(result[0]) & set(result[1])
    if overlap:
        raise TrainError(f"{train_file} and {val_file} share {len(overlap)} examples, "
                         f"like {table.example_ids[min(overlap)]!r}")
    return result[0], result[1]


def evaluate_gates(table: ScoreTable, gates: np.ndarray) -> dict:
    """Return losses (and accuracies for multiple choice) of the gate, uniform weights, each
    expert alone, and the per-example oracle (the best single expert of each example)."""
    n = table.n_experts
    singles = scoretable.single_expert_losses(table)
    uniform = np.full_like(gates, 1.0 / n)
    report = {
        "examples": table.n_examples,
        "loss": {
            "gate": float(scoretable.example_losses(table, gates).mean()),
            "uniform": float(scoretable.example_losses(table, uniform).mean()),
            "oracle": float(singles.min(axis=1).mean()),
            "experts": {name: float(singles[:, i].mean()) for i, name in enumerate(table.experts)},
        },
        "routing": {name: float(np.mean(gates.argmax(axis=1) == i)) for i, name in enumerate(table.experts)},
    }
    if table.is_multiple_choice:
        eye = np.eye(n)
        top1 = eye[gates.argmax(axis=1)] + 1e-12
        report["accuracy"] = {
            "gate": scoretable.accuracy(table, gates),
            "gate_top1": scoretable.accuracy(table, top1),
            "uniform": scoretable.accuracy(table, uniform),
            "experts": {name: scoretable.accuracy(table, np.tile(eye[i] + 1e-12, (table.n_examples, 1)))
                        for i, name in enumerate(table.experts)},
        }
    return report


# --- ONNX export --------------------------------------------------------------------------------

def export_onnx(model, dim: int, path: Path, check_embeddings: np.ndarray) -> float:
    """Export the gate to ONNX and return the max abs difference to PyTorch on `check_embeddings`."""
    import onnx
    import onnxruntime as ort
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter's graph passes log every step at INFO; keep the command's output readable.
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model.eval()
    example = torch.zeros(2, dim)
    partial = path.with_name(path.name + ".partial")
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (example,), str(partial), input_names=["embedding"], output_names=["gate"],
                      dynamic_shapes=({0: batch},), opset_version=18, external_data=False, verbose=False)
    onnx.checker.check_model(onnx.load(str(partial)))
    session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    ours = session.run(["gate"], {"embedding": check_embeddings.astype(np.float32)})[0]
    reference = gate_values(model, check_embeddings)
    partial.replace(path)
    return float(np.abs(ours.astype(np.float64) - reference).max())


# --- command line -------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", type=Path, required=True, help="score table NPZ written by `moe2 score`")
    parser.add_argument("--embedder", type=Path, default=None,
                        help="embedder folder (default: the model cache's embedder folder, see `moe2 export-embedder`)")
    parser.add_argument("--output", type=Path, required=True,
                        help="gate ONNX file to write; the metadata JSON goes beside it with the suffix .json")
    parser.add_argument("--gates-out", type=Path, default=None,
                        help="also write the gate values of every example of the table as NPY [n_examples, N] "
                             "(input of `moe2 select`)")
    parser.add_argument("--train-ids", type=Path, default=None, help="file of training example ids, one per line")
    parser.add_argument("--val-ids", type=Path, default=None, help="file of validation example ids, one per line")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="validation share of the deterministic split, per subject (default: 0.2)")
    defaults = TrainSettings()
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="units per hidden layer (default: 128)")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="hidden layers (default: 2)")
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout probability (default: 0.1)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default: 0.01)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per batch (default: 8)")
    parser.add_argument("--accumulation", type=int, default=defaults.accumulation,
                        help="batches per optimizer step (gradient accumulation, default: 8)")
    parser.add_argument("--clip", type=float, default=defaults.clip, help="gradient norm clip (default: 1.0)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default: 60)")
    parser.add_argument("--plateau-factor", type=float, default=defaults.plateau_factor,
                        help="ReduceLROnPlateau factor (default: 0.8)")
    parser.add_argument("--plateau-patience", type=int, default=defaults.plateau_patience,
                        help="ReduceLROnPlateau patience in epochs (default: 50)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of initialization, shuffling and split")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="PyTorch CPU threads (default: 1)")


def run(args: argparse.Namespace) -> int:
    from coordinator.embedding import Embedder, EmbedderError

    try:
        table = scoretable.load_score_table(args.scores)
        if table.gate_texts is None:
            raise TrainError(f"{args.scores} has no gate_texts; score it again with the current `moe2 score`")
        if (args.train_ids is None) != (args.val_ids is None):
            raise TrainError("pass both --train-ids and --val-ids, or neither for the deterministic split")
        if args.train_ids:
            train_index, val_index = split_from_files(table, args.train_ids, args.val_ids)
        else:
            train_index, val_index = split_examples(table, args.val_fraction, args.seed)
        settings = TrainSettings(**{k: getattr(args, k) for k in asdict(TrainSettings())})

        from coordinator.embedder_export import default_output
        embedder = Embedder(args.embedder or default_output())
        log.info("embedding %d prompts with %s", table.n_examples, embedder.name)
        embeddings = embedder.embed(table.gate_texts)

        log.info("training on %d examples, validating on %d", len(train_index), len(val_index))
        result = train(embeddings, table, train_index, val_index, settings)
        gates = gate_values(result.model, embeddings)
        max_diff = export_onnx(result.model, embedder.dim, args.output, embeddings[:256])
    except (TrainError, EmbedderError, scoretable.ScoreTableError) as exc:
        log.error("%s", exc)
        return 1

    metrics = {
        "train": evaluate_gates(table.subset_examples(train_index), gates[train_index]),
        "validation": evaluate_gates(table.subset_examples(val_index), gates[val_index]),
        "best_epoch": result.best_epoch,
        "epochs": settings.epochs,
        "train_seconds": round(result.seconds, 2),
        "onnx_max_abs_diff": max_diff,
    }
    metadata = {
        "format": GATE_FORMAT,
        "experts": [{"name": n, "fingerprint": f} for n, f in zip(table.experts, table.fingerprints)],
        "embedder": embedder.describe(),
        "input": "embedding", "output": "gate",
        "data": {"scores": str(args.scores), "dataset_hash": table.meta.get("dataset_hash"),
                 "dataset": table.meta.get("dataset"), "prompt_format": table.meta.get("prompt_format"),
                 "train_examples": len(train_index), "val_examples": len(val_index)},
        "settings": asdict(settings),
        "metrics": metrics,
        "command": "moe2 " + shlex.join(sys.argv[1:]),
    }
    metadata_path = args.output.with_suffix(".json")
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if args.gates_out:
        np.save(args.gates_out, gates)

    print_report(metrics, table.experts)
    log.info("wrote %s and %s (ONNX vs PyTorch max abs diff %.2e)", args.output, metadata_path, max_diff)
    return 0


def print_report(metrics: dict, experts: list[str]) -> None:
    """Print train and validation loss and accuracy as a plain table on stdout."""
    print(f"best epoch {metrics['best_epoch'] + 1} of {metrics['epochs']}, "
          f"{metrics['train_seconds']} s, ONNX max abs diff {metrics['onnx_max_abs_diff']:.2e}")
    header = f"{'weights':<22}{'train loss':>12}{'val loss':>12}"
    has_accuracy = "accuracy" in metrics["validation"]
    if has_accuracy:
        header += f"{'val acc':>10}"
    print(header)
    rows = [("gate", "gate"), ("uniform", "uniform"), ("oracle (best expert)", "oracle")]
    rows += [(f"expert {name}", name) for name in experts]
    for label, key in rows:
        losses = [m["loss"].get(key, m["loss"]["experts"].get(key)) for m in (metrics["train"], metrics["validation"])]
        line = f"{label:<22}{losses[0]:>12.4f}{losses[1]:>12.4f}"
        if has_accuracy:
            accuracy = metrics["validation"]["accuracy"]
            value = accuracy.get(key, accuracy["experts"].get(key)) if key != "oracle" else None
            line += f"{value:>10.3f}" if value is not None else f"{'':>10}"
        print(line)
    if has_accuracy:
        print(f"{'gate top-1':<22}{'':>12}{'':>12}{metrics['validation']['accuracy']['gate_top1']:>10.3f}")
