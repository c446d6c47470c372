"""Gating at run time: prompt -> tokenizer -> embedder ONNX -> gate MLP ONNX -> N gate values.

A trained gate is `gate.onnx` (input `embedding` float32 [batch, dim], output `gate`
float32 [batch, N], softmax) with `gate.json` beside it. The JSON names the experts in
output order by name and fingerprint, so `Gate.for_experts` can map gate outputs onto
the configured experts. By the gate-of-a-subset property of the MoE² gate, the gate of a
subset of the experts it was trained on is its output renormalized over that subset.

With no gate configured, `Gate.uniform_for` returns equal values and marks every output
with `GateOutput.uniform = True`, so the coordinator can report it in its log and result.

This module never imports PyTorch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.embedding import Embedder, create_session, resolve_providers

log = logging.getLogger("moe2.gating")

GATE_FORMAT = "moe2-gate/1"


class GateError(RuntimeError):
    """A gate file that is missing or does not match the embedder or the configured experts."""


@dataclass(frozen=True)
class GateOutput:
    values: np.ndarray      # float64 [n_experts], positive, summing to 1, in configured order
    uniform: bool           # True when no trained gate produced these values
    seconds: float          # time spent embedding and gating


def gate_metadata_path(gate_path: Path) -> Path:
    return gate_path.with_suffix(".json")


def load_gate_metadata(gate_path: Path) -> dict:
    """Read the JSON beside a gate ONNX file and check its format and expert list."""
    path = gate_metadata_path(gate_path)
    if not path.is_file():
        raise GateError(f"{path} not found; a gate ONNX file needs the metadata JSON that `moe2 train-gate` writes beside it")
    metadata = json.loads(path.read_text(encoding="utf-8"))
    if metadata.get("format") != GATE_FORMAT:
        raise GateError(f"{path}: format is {metadata.get('format')!r}, expected {GATE_FORMAT!r}")
    experts = metadata.get("experts")
    if (not isinstance(experts, list) or not experts
            or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in experts)):
        raise GateError(f"{path}: experts must be a non-empty list of {{name, fingerprint}} objects")
    return metadata


class Gate:
    """Gate values for a prompt, in the order of `names`.

    Build it with `Gate.load` (a trained gate over the experts named in gate.json) or
    `Gate.uniform`, then call `gate.for_experts(...)` to follow the configured experts.
    """

    def __init__(self, names: list[str], fingerprints: list[str | None], embedder: Embedder | None = None,
                 session=None, columns: np.ndarray | None = None):
        self.names = list(names)
        self.fingerprints = list(fingerprints)
        self.embedder = embedder
        self.session = session
        # Gate output column of each expert in `names`.
        self.columns = np.arange(len(names)) if columns is None else np.asarray(columns)
        self.trained_names: list[str] = list(names)

    @property
    def uniform(self) -> bool:
        return self.session is None

    @classmethod
    def uniform_for(cls, names: list[str]) -> Gate:
        """Return a gate that gives every expert in `names` the same value."""
        if not names:
            raise GateError("a gate needs at least one expert")
        log.info("no trained gate configured: using uniform gate values over %d experts", len(names))
        return cls(names, [None] * len(names))

    @classmethod
    def load(cls, gate_path: Path | str, embedder: Embedder | None = None, *,
             embedder_onnx: Path | str | None = None, tokenizer: Path | str | None = None,
             providers: list[str] | str | None = None) -> Gate:
        """Load gate.onnx and its metadata with an embedder (or the embedder's two files).

        Raises GateError when the embedder's dimension differs from the gate's input.
        """
        gate_path = Path(gate_path)
        if not gate_path.is_file():
            raise GateError(f"gate file {gate_path} not found; train one with `moe2 train-gate` "
                            "or remove the [gating] section to use uniform gate values")
        metadata = load_gate_metadata(gate_path)
        if embedder is None:
            if embedder_onnx is None or tokenizer is None:
                raise GateError("Gate.load needs an Embedder or both embedder_onnx and tokenizer paths")
            embedder = Embedder(onnx_path=embedder_onnx, tokenizer_path=tokenizer, providers=providers)

        session = create_session(gate_path, resolve_providers(providers), kind="gate")
        gate_input = session.get_inputs()[0]
        width = gate_input.shape[1] if len(gate_input.shape) == 2 else None
        if width != embedder.dim:
            raise GateError(f"gate {gate_path} takes embeddings of dimension {width}, but embedder "
                            f"{embedder.name} produces {embedder.dim}; train the gate with this embedder")
        trained_with = metadata.get("embedder", {}).get("sha256")
        if trained_with and trained_with != embedder.sha256:
            log.warning("gate %s was trained with embedder sha256 %s, but the configured embedder has %s; "
                        "gate values may be meaningless", gate_path, trained_with, embedder.sha256)
        n_outputs = session.get_outputs()[0].shape[-1]
        experts = metadata["experts"]
        if isinstance(n_outputs, int) and n_outputs != len(experts):
            raise GateError(f"gate {gate_path} has {n_outputs} outputs but {gate_metadata_path(gate_path)} "
                            f"names {len(experts)} experts")
        gate = cls([e["name"] for e in experts], [e.get("fingerprint") for e in experts], embedder, session)
        log.info("gate %s loaded: %d experts (%s), embedder %s on %s", gate_path, len(experts),
                 ", ".join(gate.names), embedder.name, session.get_providers()[0])
        return gate

    def for_experts(self, names: list[str], fingerprints: list[str | None] | None = None) -> Gate:
        """Return a gate whose values follow `names`, matched by fingerprint where given, else by name.

        The returned gate's `fingerprints` are those in gate.json for the matched outputs.

        A configured expert that the gate was not trained on raises GateError. Experts of
        the gate that the configuration lacks are left out, and the values are renormalized
        over the rest.
        """
        if self.uniform:
            return Gate.uniform_for(list(names))
        fingerprints = list(fingerprints) if fingerprints is not None else [None] * len(names)
        if len(fingerprints) != len(names):
            raise GateError(f"{len(names)} expert names but {len(fingerprints)} fingerprints")
        columns = []
        for name, fingerprint in zip(names, fingerprints):
            if fingerprint is not None:
                matches = [i for i, f in enumerate(self.fingerprints) if f == fingerprint]
                if not matches:
                    raise GateError(f"expert {name} has fingerprint {fingerprint}, which the gate was not trained on; "
                                    f"the gate knows {', '.join(f'{n} ({f})' for n, f in zip(self.names, self.fingerprints))}. "
                                    "Score and train the gate again with this expert")
                column = matches[0] if len(matches) == 1 else next(
                    (i for i in matches if self.names[i] == name), matches[0])
            else:
                if name not in self.names:
                    raise GateError(f"expert {name} is not one the gate was trained on ({', '.join(self.names)}); "
                                    "rename it in the configuration or train the gate again")
                column = self.names.index(name)
            columns.append(column)
        if len(set(columns)) != len(columns):
            raise GateError(f"two configured experts map to the same gate output: {list(zip(names, columns))}")
        # Each name gets the fingerprint the gate was trained on for its column, so a
        # caller can compare it with the fingerprint of the expert now serving that name.
        trained_fingerprints = [self.fingerprints[column] for column in columns]
        gate = Gate(list(names), trained_fingerprints, self.embedder, self.session, np.array(columns))
        gate.trained_names = self.trained_names
        return gate

    def __call__(self, prompt: str) -> GateOutput:
        start = time.perf_counter()
        if self.uniform:
            values = np.full(len(self.names), 1.0 / len(self.names))
            return GateOutput(values, True, time.perf_counter() - start)
        embedding = self.embedder.embed([prompt])
        raw = self.session.run(None, {self.session.get_inputs()[0].name: embedding})[0][0].astype(np.float64)
        values = raw[self.columns]
        total = values.sum()
        if not np.isfinite(total) or total <= 0:
            raise GateError(f"gate produced invalid values {raw.tolist()} for the configured experts")
        return GateOutput(values / total, False, time.perf_counter() - start)
