"""Tiny GGUF models and LoRA adapters for tests, written with the `gguf` package.

The model is a 2-layer llama-architecture transformer with random float32 weights. Its
SentencePiece ("llama") vocabulary has a few hundred tokens: `<unk>`, `<s>`, `</s>`,
the 256 byte tokens `<0x00>`..`<0xFF>`, single characters, and every prefix of `▁WORD`
for a list of words, so that words merge into single tokens. llama.cpp's SentencePiece
tokenizer falls back to the byte tokens for any character outside the vocabulary. The
model loads in milliseconds with the real llama.cpp, so agent tests run real code.

Variants for the vocabulary rules:
- `words`: a different word list gives a different token list (a different tokenizer).
- `n_pad`: appends `[PAD<id>]` tokens of type UNUSED, as `convert_hf_to_gguf.py` does when
  a model's embedding matrix has more rows than its tokenizer has tokens. The weights
  of the real tokens do not depend on `n_pad`, so a padded file gives exactly the same
  logits over the real tokens as the unpadded one.

Weights are drawn from a generator seeded by `seed` and a fixed stream per tensor, so
a spec always produces the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# Words merged into single tokens (with every prefix) in the default vocabulary.
DEFAULT_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
                 "hello", "world", "capital", "of", "France", "is", "Paris", "a")
# A vocabulary of the same construction with different words: a different tokenizer.
OTHER_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARACTERS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
              " .,!?'-:;()\n")
SPACE = "\u2581"   # SentencePiece's word-boundary marker


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape, vocabulary and seed of a tiny llama GGUF."""

    words: tuple[str, ...] = DEFAULT_WORDS
    n_pad: int = 0                 # padding tokens appended after the real tokens
    seed: int = 0
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    context_length: int = 8192
    name: str = "tiny-llama"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def build_vocab(words: tuple[str, ...] = DEFAULT_WORDS, n_pad: int = 0):
    """Return (tokens, scores, token_types) of the tiny SentencePiece vocabulary.

    Longer pieces get higher scores, so llama.cpp's tokenizer merges a word's
    characters up to the whole `▁WORD` piece.
    """
    tokens: list[str] = list(SPECIAL_TOKENS)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]

    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)

    seen = set(tokens)

    def add(piece: str) -> None:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
            scores.append(-100.0 + len(piece))

    add(SPACE)
    for char in CHARACTERS.replace(" ", ""):
        add(char)
        add(SPACE + char)
    for word in words:
        for end in range(1, len(word) + 1):
            add(SPACE + word[:end])
            add(word[:end])

    n_real = len(tokens)
    for pad_id in range(n_real, n_real + n_pad):
        tokens.append(f"[PAD{pad_id}]")
        types.append(gguf.TokenType.UNUSED)
        scores.append(-1000.0)
    return tokens, scores, types


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _vocab_rows(spec: TinyModelSpec, n_real: int, stream: int, std: float) -> np.ndarray:
    """Rows for the real tokens from one stream, then padding rows from another."""
    real = _normal(_rng(spec.seed, stream), (n_real, spec.n_embd), std)
    if spec.n_pad == 0:
        return real
    pad = _normal(_rng(spec.seed, stream + 1), (spec.n_pad, spec.n_embd), std)
    return np.concatenate([real, pad])


def write_tiny_llama(path: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a tiny llama GGUF for `spec` to `path` and return the path."""
    path = Path(path)
    tokens, scores, types = build_vocab(spec.words, spec.n_pad)
    n_real = len(tokens) - spec.n_pad
    n_kv = spec.n_head_kv * spec.head_dim

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(spec.name)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    # numpy shapes are (rows, columns) = the reverse of ggml's (ne0, ne1).
    writer.add_tensor("token_embd.weight", _vocab_rows(spec, n_real, stream=1, std=1.0))
    writer.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    # A large output scale gives peaked, clearly non-uniform distributions.
    writer.add_tensor("output.weight", _vocab_rows(spec, n_real, stream=3, std=0.5))

    rng = _rng(spec.seed, 10)
    d, f = spec.n_embd, spec.n_ff
    for layer in range(spec.n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", _normal(rng, (d, d), d ** -0.5))
        writer.add_tensor(f"{prefix}.attn_k.weight", _normal(rng, (n_kv, d), d ** -0.5))
        writer.add_tensor(f"{prefix}.attn_v.weight", _normal(rng, (n_kv, d), d ** -0.5))
        writer.add_tensor(f"{prefix}.attn_output.weight", _normal(rng, (d, d), d ** -0.5))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", _normal(rng, (f, d), d ** -0.5))
        writer.add_tensor(f"{prefix}.ffn_up.weight", _normal(rng, (f, d), d ** -0.5))
        writer.add_tensor(f"{prefix}.ffn_down.weight", _normal(rng, (d, f), f ** -0.5))

    _finish(writer)
    return path


def write_tiny_lora(path: str | Path, spec: TinyModelSpec = TinyModelSpec(), *,
                    rank: int = 4, alpha: float = 8.0, seed: int = 1) -> Path:
    """Write a LoRA adapter GGUF for the model of `spec` to `path` and return the path.

    The adapter changes the query and value projections of every layer and the output
    projection. llama.cpp expects `X.lora_a` with ggml shape (n_in, rank) and `X.lora_b`
    with (rank, n_out), and scales the product by alpha / rank.
    """
    path = Path(path)
    tokens, _, _ = build_vocab(spec.words, spec.n_pad)
    d = spec.n_embd
    n_kv = spec.n_head_kv * spec.head_dim
    rng = _rng(seed, 100)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))

    targets = {"output.weight": (d, len(tokens))}
    for layer in range(spec.n_layer):
        targets[f"blk.{layer}.attn_q.weight"] = (d, d)
        targets[f"blk.{layer}.attn_v.weight"] = (d, n_kv)
    for name, (n_in, n_out) in targets.items():
        writer.add_tensor(f"{name}.lora_a", _normal(rng, (rank, n_in), n_in ** -0.5))
        writer.add_tensor(f"{name}.lora_b", _normal(rng, (n_out, rank), 1.0))

    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
