"""Sentence embeddings at run time: `tokenizers` + ONNX Runtime, no PyTorch.

An embedder folder contains `model.onnx` and `tokenizer.json` (and optionally
`embedder.json`, written by `moe2 export-embedder`). Any ONNX model with int64 inputs
`input_ids` and `attention_mask` (and optionally `token_type_ids`, fed with zeros) of
shape [batch, seq] and one float32 output [batch, dim] works; the dimension is read
from the model.

Execution providers are always passed explicitly. onnxruntime-gpu falls back to the CPU
without an error when the CUDA libraries are missing, so the providers the session
actually uses are read back, logged, and kept in `Embedder.providers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("moe2.embedding")

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "embedder.json"
DEFAULT_MAX_LENGTH = 512

# Names accepted by --providers and config files, mapped to ONNX Runtime provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class EmbedderError(RuntimeError):
    """The embedder folder is incomplete, or its model does not have the expected interface."""


def resolve_providers(requested: list[str] | str | None) -> list[str]:
    """Turn provider names or aliases into ONNX Runtime names, checking they are available.

    None means CPU only. "auto" means CUDA when this ONNX Runtime build has it, then CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        return ["CPUExecutionProvider"]
    if isinstance(requested, str):
        requested = [p.strip() for p in requested.split(",") if p.strip()]
    if requested == ["auto"]:
        preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
        return preferred + ["CPUExecutionProvider"]
    providers = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise EmbedderError(f"execution provider {name!r} is not available in this ONNX Runtime build; "
                                f"available: {', '.join(available)}")
        providers.append(full)
    return providers


def create_session(path: Path, providers: list[str], threads: int | None = None, kind: str = "model"):
    """Create an ONNX Runtime session with explicit providers and log the ones in use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    in_use = session.get_providers()
    if in_use[0] != providers[0]:
        log.warning("%s %s: requested provider %s but ONNX Runtime is using %s "
                    "(for CUDA, check that the CUDA and cuDNN libraries are installed)",
                    kind, path, providers[0], in_use[0])
    else:
        log.info("%s %s runs on %s", kind, path, in_use[0])
    return session


class Embedder:
    """Embed texts with an ONNX sentence-embedding model.

    `embed(texts)` returns float32 [len(texts), dim]. Texts are sorted by length and
    batched, so each batch pads only to its own longest text; results come back in the
    input order.
    """

    def __init__(self, folder: Path | str | None = None, providers: list[str] | str | None = None,
                 batch_size: int = 32, threads: int | None = None, *,
                 onnx_path: Path | str | None = None, tokenizer_path: Path | str | None = None):
        from tokenizers import Tokenizer

        if folder is None and (onnx_path is None or tokenizer_path is None):
            raise EmbedderError("pass an embedder folder, or both onnx_path and tokenizer_path")
        onnx_path = Path(onnx_path) if onnx_path is not None else Path(folder) / ONNX_FILE
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else Path(folder) / TOKENIZER_FILE
        self.folder = Path(folder) if folder is not None else onnx_path.parent
        self.onnx_path = onnx_path
        for path in (onnx_path, tokenizer_path):
            if not path.is_file():
                raise EmbedderError(f"{path} not found; create the embedder folder with `moe2 export-embedder`")
        if batch_size < 1:
            raise EmbedderError(f"batch_size must be at least 1, got {batch_size}")

        metadata_path = self.folder / METADATA_FILE
        self.metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
        self.name = str(self.metadata.get("name", self.folder.name))
        self.batch_size = batch_size

        self.session = create_session(onnx_path, resolve_providers(providers), threads, "embedder")
        self.providers = self.session.get_providers()
        self._input_names = self._check_inputs()
        self._output_name = self.session.get_outputs()[0].name

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.max_length = self._max_length()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        padding = self.tokenizer.padding or {}
        self.tokenizer.no_padding()
        self.tokenizer.enable_padding(pad_id=int(padding.get("pad_id", 0)), pad_token=padding.get("pad_token", "[PAD]"))

        self.dim = self._dimension()
        self.sha256 = self.metadata.get("onnx_sha256") or _sha256(onnx_path)

    def _check_inputs(self) -> list[str]:
        names = [i.name for i in self.session.get_inputs()]
        for required in ("input_ids", "attention_mask"):
            if required not in names:
                raise EmbedderError(f"{self.onnx_path} has inputs {names}; an embedder needs "
                                    "input_ids and attention_mask (and optionally token_type_ids)")
        unknown = set(names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise EmbedderError(f"{self.onnx_path} has unsupported inputs {sorted(unknown)}")
        return names

    def _max_length(self) -> int:
        if isinstance(self.metadata.get("max_length"), int):
            return self.metadata["max_length"]
        truncation = self.tokenizer.truncation
        if truncation and truncation.get("max_length"):
            return int(truncation["max_length"])
        return DEFAULT_MAX_LENGTH

    def _dimension(self) -> int:
        shape = self.session.get_outputs()[0].shape
        if len(shape) != 2:
            raise EmbedderError(f"{self.onnx_path} output {self._output_name!r} has shape {shape}; "
                                "an embedder returns [batch, dim]")
        if isinstance(shape[1], int):
            return shape[1]
        # A symbolic dimension: run one text through the model to read it.
        return int(self._run(["dimension probe"]).shape[1])

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids,
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return self.session.run([self._output_name], feeds)[0]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return float32 [len(texts), dim] embeddings."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts; wrap a single text in a list")
        result = np.empty((len(texts), self.dim), dtype=np.float32)
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), self.batch_size):
            batch = order[start:start + self.batch_size]
            result[batch] = self._run([texts[i] for i in batch])
        return result

    def describe(self) -> dict:
        """Identify the embedder for metadata files: name, dimension, ONNX sha256."""
        return {"name": self.name, "dim": self.dim, "sha256": self.sha256, "max_length": self.max_length}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
