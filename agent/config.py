"""Agent settings: one table of options read from command-line flags and a TOML file.

Every option has a flag `--NAME-WITH-DASHES` and a TOML key `NAME_WITH_UNDERSCORES`
(the dashed spelling is accepted in TOML too). Flags override the file. Paths in the
file are relative to the file's folder and paths in flags to the working directory.
`load_config` checks every value, reads the domain prompt and checks the GGUF magic of
the model and adapter files, and reports all problems at once, all before any model
is loaded. An unknown key in the file is an error, never ignored.

Example `agent.toml`:

    model = "models/cache/gemma-3-270m-q4_k_m.gguf"
    domain_prompt = "prompts/medicine.txt"
    bind = "tcp://127.0.0.1:5555"
    n_ctx = 4096
    max_sessions = 8
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEFAULT_BIND = "tcp://127.0.0.1:5555"
# Meter names of agent.energy.METER_NAMES, repeated here so validating settings does
# not import the meter backends.
ENERGY_METERS = ("auto", "jtop", "tegrastats", "nvml", "rapl", "estimate", "none")
FLASH_ATTN_MODES = ("auto", "on", "off")
GGUF_MAGIC = b"GGUF"
# llama.cpp's limit on sequence ids (llama_max_parallel_sequences() in llama.cpp of
# llama-cpp-python 0.3.36). The agent uses one sequence per session, one for `score`
# and one for the domain prompt.
MAX_SEQUENCES = 256
RESERVED_SEQUENCES = 2

_TCP_ADDRESS = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:]+\]|[^:/\[\]]+):(?P<port>\*|\d+)$")


class ConfigError(ValueError):
    """Invalid agent settings; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid agent settings:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Option:
    """One setting: its TOML key, value type, default and help text (with its unit)."""

    key: str
    kind: type
    default: Any
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("model", Path, None, "GGUF model file of this expert (required)", "PATH"),
    Option("lora", Path, None, "LoRA adapter GGUF applied on top of the model", "PATH"),
    Option("lora_scale", float, 1.0, "strength of the LoRA adapter (default: 1.0)", "FLOAT"),
    Option("domain_prompt", Path, None,
           "UTF-8 text file whose text precedes every prompt; its KV cache is computed "
           "once at start-up and copied into each session", "FILE"),
    Option("bind", str, DEFAULT_BIND,
           f"ZeroMQ address of the ROUTER socket (default: {DEFAULT_BIND}); a port of * "
           "picks a free port. Traffic is unauthenticated, so any address other than "
           "loopback logs a warning", "ADDR"),
    Option("name", str, None, "expert name reported by `info` (default: the model file name)"),
    Option("n_ctx", int, 4096,
           "context size of each session in tokens, domain prompt included (default: 4096)", "TOKENS"),
    Option("max_sessions", int, 8, "maximum number of concurrent sessions (default: 8)", "N"),
    Option("n_batch", int, 512, "maximum tokens per llama.cpp decode call during prompts (default: 512)", "TOKENS"),
    Option("n_threads", int, None,
           "CPU threads for llama.cpp (default: the CPUs this process may run on)", "N"),
    Option("n_gpu_layers", int, 0, "layers to offload to the GPU; -1 offloads all (default: 0)", "N"),
    Option("flash_attn", str, "auto",
           "flash attention: auto (llama.cpp decides per device), on or off (default: auto). "
           "It changes logits by about 1e-3, so compare experts with the same setting", "MODE"),
    Option("idle_timeout", float, 600.0,
           "seconds after which a session without requests is closed (default: 600)", "SECONDS"),
    Option("max_frame_bytes", int, 4 << 20,
           "largest request frame in bytes; larger frames are rejected before decoding "
           "(default: 4194304)", "BYTES"),
    Option("energy_meter", str, "auto",
           f"energy meter: {', '.join(ENERGY_METERS)} (default: auto, which tries jtop, "
           "tegrastats, NVML and RAPL in that order and reports null energy when none works)", "NAME"),
    Option("energy_interval_ms", int, None,
           "sampling interval of power-sampling meters (jtop, tegrastats, NVML fallback) in "
           "milliseconds (default: the meter's own)", "MS"),
    Option("energy_watts_per_core", float, None,
           "watts per busy CPU core for the `estimate` meter; its energy is labelled "
           "estimated, never measured", "WATTS"),
    Option("energy_device_index", int, None, "NVML index of the GPU to meter (default: 0)", "INDEX"),
    Option("log_level", str, "INFO", "logging level on stderr (default: INFO)", "LEVEL"),
)
OPTION_BY_KEY = {option.key: option for option in OPTIONS}


@dataclass(frozen=True)
class AgentConfig:
    """Validated settings of one agent. Build it with `load_config`."""

    model: Path
    lora: Path | None = None
    lora_scale: float = 1.0
    domain_prompt: Path | None = None
    bind: str = DEFAULT_BIND
    name: str | None = None
    n_ctx: int = 4096
    max_sessions: int = 8
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    flash_attn: str = "auto"
    idle_timeout: float = 600.0
    max_frame_bytes: int = 4 << 20
    energy_meter: str = "auto"
    energy_interval_ms: int | None = None
    energy_watts_per_core: float | None = None
    energy_device_index: int | None = None
    log_level: str = "INFO"
    # Text of `domain_prompt`, read during validation so the file is read only once.
    domain_prompt_text: str | None = field(default=None, compare=False, repr=False)

    @property
    def expert_name(self) -> str:
        return self.name or self.model.name

    @property
    def threads(self) -> int:
        return self.n_threads or len(os.sched_getaffinity(0))

    @property
    def is_loopback(self) -> bool:
        return is_loopback_address(self.bind)


def is_loopback_address(address: str) -> bool:
    """Return whether a ZeroMQ address is reachable only from this machine."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    match = _TCP_ADDRESS.match(address)
    if not match:
        return False
    host = match.group("host").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:          # an interface name such as eth0, or * for every interface
        return False


def load_config(flags: dict[str, Any] | None = None, config_file: str | Path | None = None) -> AgentConfig:
    """Merge a TOML file and flag values (flags win), validate them, return the config.

    `flags` maps option keys to values given on the command line; keys left out or
    set to None take the file's value or the default. Raises ConfigError.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    if config_file is not None:
        file_values = _read_toml(Path(config_file), problems)
        for key, value in file_values.items():
            values[key] = value
            sources[key] = f"{key} in {config_file}"
        from_file = set(file_values)
    else:
        from_file = set()

    for key, value in (flags or {}).items():
        if key not in OPTION_BY_KEY:
            raise ValueError(f"unknown option key {key!r}")
        if value is not None:
            values[key] = value
            sources[key] = OPTION_BY_KEY[key].flag
            from_file.discard(key)

    settings: dict[str, Any] = {}
    for option in OPTIONS:
        if option.key not in values:
            continue
        value = _convert(option, values[option.key], sources[option.key], problems)
        if value is None:
            continue
        if option.kind is Path and option.key in from_file and not value.is_absolute():
            value = Path(config_file).parent / value
        settings[option.key] = value

    if "model" not in settings:
        problems.append("model is missing: pass --model PATH or set model in the config file")
        raise ConfigError(problems)
    config = AgentConfig(**settings)
    config = _validate(config, sources, problems)
    if problems:
        raise ConfigError(problems)
    return config


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        problems.append(f"config file {path} not found")
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"config file {path} could not be read: {exc}")
        return {}

    values = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in OPTION_BY_KEY:
            known = ", ".join(option.key for option in OPTIONS)
            problems.append(f"unknown key {raw_key!r} in {path}; known keys: {known}")
            continue
        values[key] = value
    return values


def _convert(option: Option, value: Any, source: str, problems: list[str]) -> Any:
    """Check a raw value's type and convert it to the option's type, or record a problem."""
    if option.kind is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value).expanduser()
        problems.append(f"{source} must be a non-empty path string, got {value!r}")
    elif option.kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{source} must be an integer, got {value!r}")
    elif option.kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        problems.append(f"{source} must be a finite number, got {value!r}")
    elif option.kind is str:
        if isinstance(value, str) and value:
            return value
        problems.append(f"{source} must be a non-empty string, got {value!r}")
    return None


def _validate(config: AgentConfig, sources: dict[str, str], problems: list[str]) -> AgentConfig:
    def where(key: str) -> str:
        return sources.get(key, key)

    _check_gguf(config.model, where("model"), problems)
    if config.lora is not None:
        _check_gguf(config.lora, where("lora"), problems)
    elif "lora_scale" in sources:
        problems.append(f"{where('lora_scale')} is set but no LoRA adapter is: add --lora PATH or remove it")

    domain_text = None
    if config.domain_prompt is not None:
        domain_text = _read_domain_prompt(config.domain_prompt, where("domain_prompt"), problems)

    bind_problem = address_problem(config.bind)
    if bind_problem is not None:
        problems.append(f"{where('bind')} {config.bind!r} {bind_problem}")
    if config.n_ctx < 8:
        problems.append(f"{where('n_ctx')} must be at least 8 tokens, got {config.n_ctx}")
    max_sessions = MAX_SEQUENCES - RESERVED_SEQUENCES
    if not 1 <= config.max_sessions <= max_sessions:
        problems.append(f"{where('max_sessions')} must be between 1 and {max_sessions}, got {config.max_sessions}")
    if config.n_batch < 1:
        problems.append(f"{where('n_batch')} must be at least 1, got {config.n_batch}")
    if config.n_threads is not None and config.n_threads < 1:
        problems.append(f"{where('n_threads')} must be at least 1, got {config.n_threads}")
    if config.n_gpu_layers < -1:
        problems.append(f"{where('n_gpu_layers')} must be -1 (all layers) or more, got {config.n_gpu_layers}")
    if config.flash_attn not in FLASH_ATTN_MODES:
        problems.append(f"{where('flash_attn')} {config.flash_attn!r} is not one of: {', '.join(FLASH_ATTN_MODES)}")
    if config.idle_timeout <= 0:
        problems.append(f"{where('idle_timeout')} must be positive seconds, got {config.idle_timeout}")
    if not 4096 <= config.max_frame_bytes <= 1 << 30:
        problems.append(f"{where('max_frame_bytes')} must be between 4096 and {1 << 30}, got {config.max_frame_bytes}")
    if config.energy_meter not in ENERGY_METERS:
        problems.append(f"{where('energy_meter')} {config.energy_meter!r} is not one of: {', '.join(ENERGY_METERS)}")
    if config.energy_interval_ms is not None and not 1 <= config.energy_interval_ms <= 60_000:
        problems.append(f"{where('energy_interval_ms')} must be between 1 and 60000 ms, got {config.energy_interval_ms}")
    if config.energy_device_index is not None and config.energy_device_index < 0:
        problems.append(f"{where('energy_device_index')} must be 0 or more, got {config.energy_device_index}")
    if config.energy_watts_per_core is not None and not (
            math.isfinite(config.energy_watts_per_core) and config.energy_watts_per_core > 0):
        problems.append(f"{where('energy_watts_per_core')} must be positive watts, got {config.energy_watts_per_core}")
    if config.energy_meter == "estimate" and config.energy_watts_per_core is None:
        problems.append(f"{where('energy_meter')} 'estimate' needs --energy-watts-per-core "
                        "(energy_watts_per_core in the config file): the watts of one busy CPU core, "
                        "for example 4.5")
    if not isinstance(logging.getLevelName(config.log_level.upper()), int):
        problems.append(f"{where('log_level')} {config.log_level!r} is not a logging level "
                        "(DEBUG, INFO, WARNING, ERROR)")
    return replace(config, domain_prompt_text=domain_text)


def address_problem(address: str) -> str | None:
    """Return what is wrong with a ZeroMQ bind address, or None when it is valid."""
    not_an_address = ("is not a ZeroMQ address like tcp://127.0.0.1:5555, tcp://127.0.0.1:* "
                      "or ipc:///run/moe2/agent.sock")
    if address.startswith(("ipc://", "inproc://")):
        return None if address.split("://", 1)[1] else not_an_address
    match = _TCP_ADDRESS.match(address)
    if not match:
        return not_an_address
    port = match.group("port")
    if port != "*" and not 1 <= int(port) <= 65535:
        return f"has port {port}, which is out of range 1-65535 (use * for a free port)"
    return None


def _check_gguf(path: Path, source: str, problems: list[str]) -> None:
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        problems.append(f"{source}: file {path} not found")
        return
    except IsADirectoryError:
        problems.append(f"{source}: {path} is a folder, expected a GGUF file")
        return
    except OSError as exc:
        problems.append(f"{source}: file {path} could not be read: {exc}")
        return
    if magic != GGUF_MAGIC:
        problems.append(f"{source}: {path} is not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r})")


def _read_domain_prompt(path: Path, source: str, problems: list[str]) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{source}: file {path} not found")
        return None
    except UnicodeDecodeError as exc:
        problems.append(f"{source}: {path} is not UTF-8 text ({exc})")
        return None
    except OSError as exc:
        problems.append(f"{source}: file {path} could not be read: {exc}")
        return None
    if not text.strip():
        problems.append(f"{source}: {path} is empty; remove the option or write the domain prompt into it")
        return None
    return text
