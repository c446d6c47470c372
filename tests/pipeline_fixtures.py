"""Small real inputs for the offline-pipeline tests.

A tiny BERT has random weights and a word-level vocabulary of a few domains, in the same
files as a Hugging Face sentence-transformers folder. A numpy forward pass of it is
independent of the ONNX graph. A small MMLU-layout data set uses the same domains.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Four domains with disjoint words, so their texts embed apart even with random weights.
DOMAIN_WORDS = {
    "algebra": ["equation", "variable", "polynomial", "root", "integer", "sum", "product", "solve"],
    "anatomy": ["muscle", "bone", "nerve", "artery", "organ", "tissue", "cell", "skull"],
    "law": ["court", "contract", "statute", "plaintiff", "tort", "judge", "appeal", "liability"],
    "astronomy": ["planet", "star", "orbit", "galaxy", "comet", "telescope", "moon", "nebula"],
}
COMMON_WORDS = ["the", "of", "a", "which", "is", "what", "following", "true", "?", "."]

TINY_CONFIG = {
    "model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
    "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
    "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "pad_token_id": 0,
}


def tiny_vocabulary() -> list[str]:
    words = [w for domain in DOMAIN_WORDS.values() for w in domain]
    return SPECIAL_TOKENS + COMMON_WORDS + words


def write_tiny_bert(folder: Path, seed: int = 0, prefix: str = "") -> Path:
    """Write config.json, model.safetensors, tokenizer.json and the pooling config."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocabulary()
    config = dict(TINY_CONFIG, vocab_size=len(vocab))
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": config["hidden_size"], "pooling_mode_mean_tokens": True}), encoding="utf-8")

    rng = np.random.default_rng(seed)
    hidden, inner = config["hidden_size"], config["intermediate_size"]

    def normal(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": normal(len(vocab), hidden, scale=1.0),
        "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], hidden, scale=0.1),
        "embeddings.token_type_embeddings.weight": normal(2, hidden, scale=0.1),
        "embeddings.LayerNorm.weight": 1.0 + normal(hidden, scale=0.1),
        "embeddings.LayerNorm.bias": normal(hidden, scale=0.1),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name, (rows, cols) in {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
                                   "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
                                   "intermediate.dense": (inner, hidden), "output.dense": (hidden, inner)}.items():
            weights[f"{p}.{name}.weight"] = normal(rows, cols, scale=1.0 / math.sqrt(cols))
            weights[f"{p}.{name}.bias"] = normal(rows, scale=0.05)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[f"{p}.{norm}.weight"] = 1.0 + normal(hidden, scale=0.1)
            weights[f"{p}.{norm}.bias"] = normal(hidden, scale=0.1)
    save_file({prefix + k: v for k, v in weights.items()}, str(folder / "model.safetensors"))

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def reference_embed(folder: Path, token_ids: list[list[int]]) -> np.ndarray:
    """Embed token id lists (no padding) with a numpy BERT forward pass, in float64."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))

    out = []
    for ids in token_ids:
        n = len(ids)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = layer_norm(x, "embeddings.LayerNorm")
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            d = x.shape[1] // heads
            q = linear(x, f"{p}.attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
            k = linear(x, f"{p}.attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
            v = linear(x, f"{p}.attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
            x = layer_norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            inner = gelu(linear(x, f"{p}.intermediate.dense"))
            x = layer_norm(linear(inner, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        pooled = x.mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.array(out)


def domain_question(domain: str, rng: np.random.Generator, length: int = 8) -> str:
    words = rng.choice(DOMAIN_WORDS[domain], size=length)
    return "which of the following is true of the " + " ".join(words) + " ?"


def write_mmlu(root: Path, per_subject: dict[str, int], seed: int = 0) -> Path:
    """Write an MMLU-layout folder (dev/val/test CSVs, no header) with domain questions."""
    rng = np.random.default_rng(seed)
    for split, count in (("dev", 5), ("val", None), ("test", None)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, n in per_subject.items():
            rows = count if count is not None else n
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for _ in range(rows):
                    options = [" ".join(rng.choice(DOMAIN_WORDS[subject], size=2)) for _ in range(4)]
                    writer.writerow([domain_question(subject, rng), *options, "ABCD"[rng.integers(4)]])
    return root
