"""Coordinator configuration: a TOML file, validated in full before anything connects.

Example (every section except `experts` is optional; the values shown are the defaults
where a default exists):

    [[experts]]
    name = "science"
    endpoint = "tcp://127.0.0.1:5555"
    # curve_server_key = "..."   # reserved for ZeroMQ CURVE; rejected until supported

    [[experts]]
    name = "law"
    endpoint = "tcp://10.0.0.12:5555"      # plain TCP: only on a trusted network

    [gating]                     # absent: uniform gate values
    gate = "models/demo/gate.onnx"          # with gate.json beside it
    embedder = "models/cache/embedder"      # folder with model.onnx and tokenizer.json
    providers = ["CPUExecutionProvider"]

    [selection]
    subset = ["science", "law"]  # S; default: every expert, in file order
    top_k = 2                    # default: all of S

    [distribution]
    format = "sparse"            # "sparse" (top-m), "dense_prob" or "dense"
    top_m = 256                  # sparse only

    [sampling]
    temperature = 0.8            # 0 selects greedy decoding
    top_p = 0.95
    max_tokens = 256
    # seed = 1234                # default: a fresh seed per request, reported in the result
    stop = []

    [timeouts]
    handshake_s = 10.0           # info, vocab, ping
    open_s = 120.0               # prompt prefill up to the first distribution
    step_deadline_s = 2.0        # a later step reply is left out of that step's fusion
    step_s = 30.0                # an expert owing a step reply this long is dropped
    close_s = 2.0

    [cache]
    vocab_dir = "~/.cache/moe2/vocab"   # absent: vocabularies are cached in memory only

Distribution formats: "sparse" sends the top_m most likely tokens and their tail mass.
"dense_prob" sends the probabilities of every real token and "dense" their
log-probabilities, 4 bytes per token each (1 MiB per step for a 262,144-token
vocabulary). "dense_prob" is the recommended dense format: the coordinator fuses
probabilities without exp(), which saved 0.05 to 0.3 ms of coordinator work per step
against "dense" on the demo model (benchmarks/generate.py), while the agents' cost is
the same. "dense" stays supported.

Relative paths resolve against the directory of the configuration file. Every error
names the key (such as `experts[1].endpoint` or `selection.top_k`) and the bad value.
"""

from __future__ import annotations

import math
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.protocol import DistributionFormat

DISTRIBUTION_FORMATS = ("sparse", "dense_prob", "dense")
DEFAULT_TOP_M = 256
# Files of an embedder folder, as `moe2 export-embedder` writes them.
EMBEDDER_ONNX = "model.onnx"
EMBEDDER_TOKENIZER = "tokenizer.json"

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TCP_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]+)$")


class ConfigError(ValueError):
    """An invalid configuration value; `key` names it in dotted form."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key = key
        self.value = value
        self.problem = problem
        super().__init__(f"invalid configuration: {key} = {value!r}: {problem}")


@dataclass(frozen=True)
class ExpertConfig:
    name: str
    endpoint: str
    curve_server_key: str | None = None

    @property
    def is_loopback(self) -> bool:
        """Whether the endpoint is reachable only from this machine (ipc or a loopback host)."""
        if self.endpoint.startswith("ipc://"):
            return True
        match = _TCP_ENDPOINT.match(self.endpoint)
        return bool(match) and match.group("host") in _LOOPBACK_HOSTS


@dataclass(frozen=True)
class GatingConfig:
    """Gate ONNX file and embedder folder; both are set, or the gate values are uniform."""

    gate: Path | None = None
    embedder: Path | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @property
    def enabled(self) -> bool:
        return self.gate is not None


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimeoutConfig:
    """Seconds. No wait in the coordinator is longer than one of these."""

    handshake_s: float = 10.0
    open_s: float = 120.0
    step_deadline_s: float = 2.0
    step_s: float = 30.0
    close_s: float = 2.0


@dataclass(frozen=True)
class Config:
    experts: tuple[ExpertConfig, ...]
    subset: tuple[str, ...]
    top_k: int
    distribution_format: str = "sparse"
    top_m: int = DEFAULT_TOP_M
    gating: GatingConfig = field(default_factory=GatingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    vocab_cache_dir: Path | None = None
    source: Path | None = None

    def expert(self, name: str) -> ExpertConfig:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(name)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(expert.name for expert in self.experts)

    @property
    def wire_format(self) -> DistributionFormat:
        """The distribution format requested from the agents."""
        if self.distribution_format == "sparse":
            return DistributionFormat("sparse", self.top_m)
        return DistributionFormat(self.distribution_format)

    def with_overrides(self, *, top_k: int | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       seed: int | None = None, stop: list[str] | None = None) -> Config:
        """Return a copy with command-line values applied; errors name the option."""
        sampling = self.sampling
        if max_tokens is not None:
            sampling = replace(sampling, max_tokens=_positive_int("--max-tokens", max_tokens))
        if temperature is not None:
            sampling = replace(sampling, temperature=_temperature("--temperature", temperature))
        if top_p is not None:
            sampling = replace(sampling, top_p=_top_p("--top-p", top_p))
        if seed is not None:
            sampling = replace(sampling, seed=_seed("--seed", seed))
        if stop is not None:
            sampling = replace(sampling, stop=_stop_strings("--stop", stop))
        config = replace(self, sampling=sampling)
        if top_k is not None:
            config = replace(config, top_k=_top_k("--top-k", top_k, len(self.subset)))
        return config


# --- loading ---------------------------------------------------------------------------

def load_config(path: str | Path) -> Config:
    """Read and validate a TOML configuration file."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found; pass --config FILE or set MOE2_CONFIG") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.parent, source=path)


def parse_config(data: dict[str, Any], base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Validate a configuration mapping (the parsed TOML) and build a Config."""
    base_dir = Path.cwd() if base_dir is None else base_dir
    _check_keys("", data, {"experts", "gating", "selection", "distribution", "sampling", "timeouts", "cache"})

    experts = _parse_experts(data.get("experts"))
    names = tuple(expert.name for expert in experts)

    selection = _section(data, "selection", {"subset", "top_k"})
    subset = _parse_subset(selection.get("subset"), names)
    top_k = _top_k("selection.top_k", selection.get("top_k", len(subset)), len(subset))

    distribution = _section(data, "distribution", {"format", "top_m"})
    distribution_format = distribution.get("format", "sparse")
    if distribution_format not in DISTRIBUTION_FORMATS:
        raise ConfigError("distribution.format", distribution_format,
                          "must be \"sparse\", \"dense_prob\" or \"dense\"")
    top_m = _positive_int("distribution.top_m", distribution.get("top_m", DEFAULT_TOP_M))
    if distribution_format != "sparse" and "top_m" in distribution:
        raise ConfigError("distribution.top_m", top_m, "applies only to format = \"sparse\"; remove it or set format = \"sparse\"")

    return Config(
        experts=experts,
        subset=subset,
        top_k=top_k,
        distribution_format=distribution_format,
        top_m=top_m,
        gating=_parse_gating(_section(data, "gating", {"gate", "embedder", "providers"}), base_dir),
        sampling=_parse_sampling(_section(data, "sampling", {"temperature", "top_p", "max_tokens", "seed", "stop"})),
        timeouts=_parse_timeouts(_section(data, "timeouts", {"handshake_s", "open_s", "step_deadline_s", "step_s", "close_s"})),
        vocab_cache_dir=_parse_cache(_section(data, "cache", {"vocab_dir"}), base_dir),
        source=source,
    )


def _parse_experts(value: Any) -> tuple[ExpertConfig, ...]:
    if value is None:
        raise ConfigError("experts", None, "missing; add one [[experts]] table with name and endpoint per agent")
    if not isinstance(value, list) or not value:
        raise ConfigError("experts", value, "must be a non-empty array of tables ([[experts]])")
    experts = []
    seen: set[str] = set()
    for index, entry in enumerate(value):
        key = f"experts[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, entry, "must be a table with name and endpoint")
        _check_keys(key, entry, {"name", "endpoint", "curve_server_key"})
        name = _required_str(f"{key}.name", entry)
        if not _NAME_PATTERN.match(name):
            raise ConfigError(f"{key}.name", name, "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if name in seen:
            raise ConfigError(f"{key}.name", name, "is used by another expert; names must be unique")
        seen.add(name)
        endpoint = _parse_endpoint(f"{key}.endpoint", _required_str(f"{key}.endpoint", entry))
        curve_key = entry.get("curve_server_key")
        if curve_key is not None:
            # NOTE: the agents do not serve CURVE yet, so a key cannot be honoured. Reject
            # it rather than silently connecting over plain TCP.
            raise ConfigError(f"{key}.curve_server_key", curve_key,
                              "ZeroMQ CURVE encryption is not supported yet; remove the key and use loopback or a private network")
        experts.append(ExpertConfig(name=name, endpoint=endpoint))
    return tuple(experts)


def _parse_endpoint(key: str, endpoint: str) -> str:
    if endpoint.startswith("ipc://"):
        if len(endpoint) == len("ipc://"):
            raise ConfigError(key, endpoint, "ipc endpoint needs a path, like ipc:///run/moe2/agent.sock")
        return endpoint
    match = _TCP_ENDPOINT.match(endpoint)
    if not match:
        raise ConfigError(key, endpoint, "must be tcp://HOST:PORT (like tcp://127.0.0.1:5555) or ipc://PATH")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ConfigError(key, endpoint, f"port {port} is outside 1-65535")
    return endpoint


def _parse_subset(value: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return names
    if not isinstance(value, list) or not value:
        raise ConfigError("selection.subset", value, "must be a non-empty list of expert names")
    subset = []
    for index, name in enumerate(value):
        if not isinstance(name, str) or name not in names:
            raise ConfigError(f"selection.subset[{index}]", name, f"is not a configured expert; known: {', '.join(names)}")
        if name in subset:
            raise ConfigError(f"selection.subset[{index}]", name, "is listed twice")
        subset.append(name)
    # Keep the file order of the experts: it breaks ties between equal gate values.
    return tuple(name for name in names if name in subset)


def _parse_gating(section: dict[str, Any], base_dir: Path) -> GatingConfig:
    if not section:
        return GatingConfig()
    providers = section.get("providers", ["CPUExecutionProvider"])
    if (not isinstance(providers, list) or not providers
            or not all(isinstance(p, str) and p for p in providers)):
        raise ConfigError("gating.providers", providers, "must be a non-empty list of ONNX Runtime execution provider names, like [\"CPUExecutionProvider\"]")

    for key in ("gate", "embedder"):
        if key not in section:
            raise ConfigError(f"gating.{key}", None, "missing; set both gating.gate and gating.embedder, "
                              "or remove the [gating] section to use uniform gate values")
    gate = _path("gating.gate", section["gate"], base_dir)
    if not gate.is_file():
        raise ConfigError("gating.gate", str(gate), "file not found; train a gate with `moe2 train-gate`")
    if not gate.with_suffix(".json").is_file():
        raise ConfigError("gating.gate", str(gate), f"its metadata {gate.with_suffix('.json').name} is missing beside it; "
                          "`moe2 train-gate` writes both files")
    embedder = _path("gating.embedder", section["embedder"], base_dir)
    for name in (EMBEDDER_ONNX, EMBEDDER_TOKENIZER):
        if not (embedder / name).is_file():
            raise ConfigError("gating.embedder", str(embedder), f"has no {name}; create the folder with `moe2 export-embedder`")
    return GatingConfig(gate=gate, embedder=embedder, providers=tuple(providers))


def _parse_sampling(section: dict[str, Any]) -> SamplingConfig:
    defaults = SamplingConfig()
    seed = section.get("seed")
    return SamplingConfig(
        temperature=_temperature("sampling.temperature", section.get("temperature", defaults.temperature)),
        top_p=_top_p("sampling.top_p", section.get("top_p", defaults.top_p)),
        max_tokens=_positive_int("sampling.max_tokens", section.get("max_tokens", defaults.max_tokens)),
        seed=None if seed is None else _seed("sampling.seed", seed),
        stop=_stop_strings("sampling.stop", section.get("stop", [])),
    )


def _parse_timeouts(section: dict[str, Any]) -> TimeoutConfig:
    defaults = TimeoutConfig()
    values = {name: _positive_float(f"timeouts.{name}", section.get(name, getattr(defaults, name)))
              for name in ("handshake_s", "open_s", "step_deadline_s", "step_s", "close_s")}
    if values["step_deadline_s"] > values["step_s"]:
        raise ConfigError("timeouts.step_deadline_s", values["step_deadline_s"],
                          f"must not exceed timeouts.step_s ({values['step_s']}): a reply later than step_s drops the expert")
    return TimeoutConfig(**values)


def _parse_cache(section: dict[str, Any], base_dir: Path) -> Path | None:
    if "vocab_dir" not in section:
        return None
    return _path("cache.vocab_dir", section["vocab_dir"], base_dir)


# --- value checks ------------------------------------------------------------------------

def _section(data: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(name, section, f"must be a table ([{name}])")
    _check_keys(name, section, allowed)
    return section


def _check_keys(prefix: str, table: dict[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(full, table[key], f"unknown key; allowed here: {', '.join(sorted(allowed))}")


def _required_str(key: str, table: dict[str, Any]) -> str:
    name = key.rsplit(".", 1)[-1]
    if name not in table:
        raise ConfigError(key, None, "missing")
    value = table[name]
    if not isinstance(value, str) or not value:
        raise ConfigError(key, value, "must be a non-empty string")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(key: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(key, value, "must be an integer >= 1")
    return int(value)


def _positive_float(key: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise ConfigError(key, value, "must be a number of seconds > 0")
    return float(value)


def _top_k(key: str, value: Any, subset_size: int) -> int:
    if not _is_int(value) or not 1 <= value <= subset_size:
        raise ConfigError(key, value, f"must be an integer from 1 to the size of the subset S ({subset_size})")
    return int(value)


def _temperature(key: str, value: Any) -> float:
    if not _is_number(value) or value < 0:
        raise ConfigError(key, value, "must be a number >= 0 (0 selects greedy decoding)")
    return float(value)


def _top_p(key: str, value: Any) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise ConfigError(key, value, "must be a number in (0, 1]")
    return float(value)


def _seed(key: str, value: Any) -> int:
    if not _is_int(value) or not 0 <= value < 2**63:
        raise ConfigError(key, value, "must be an integer from 0 to 2**63 - 1")
    return int(value)


def _stop_strings(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, value, "must be a list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{key}[{index}]", item, "must be a non-empty string")
    return tuple(value)


def _path(key: str, value: Any, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, value, "must be a non-empty path string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path
