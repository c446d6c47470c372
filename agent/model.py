"""One GGUF expert in llama.cpp: loading, LoRA, domain prompt, sessions, distributions.

Design (llama-cpp-python 0.3.36, low-level `llama_cpp` API):

- One llama context serves every session. Each session owns one sequence id (a slot)
  in a non-unified KV cache (`kv_unified = false`), so llama.cpp gives each sequence
  its own KV stream of `n_ctx_seq = n_ctx / n_seq_max` cells. Sessions cannot see
  each other's cells, and a session's context limit is exact.
- Sequence ids: 0 .. max_sessions - 1 are session slots, `max_sessions` is the scratch
  sequence of `score`, and `max_sessions + 1` stores the domain prompt when there is one.
- The domain prompt is decoded once at start-up. `open` copies its whole KV stream into
  the session's stream (`llama_memory_seq_cp` with p0 = p1 = -1; llama.cpp asserts
  that a copy between streams covers the whole stream) and decodes only the prompt.
- A step decodes exactly one token at the session's next position and requests logits
  for it alone. Logits are read with `llama_get_logits_ith(ctx, -1)`. llama-cpp-python's
  `Llama.scores` stays zero when `logits_all=False`, so the agent never uses it.
- Closing a session removes its sequence from the KV cache, so a reused slot starts
  from an empty stream, exactly like a fresh context.
- LoRA: the adapter is loaded with `llama_adapter_lora_init` and attached with
  `llama_set_adapters_lora`, the calls `Llama(lora_path=...)` makes.

Context limit of a session (`n_ctx` tokens, domain prompt included): `open` accepts at
most n_ctx - 1 tokens, so at least one step fits, and a step that would hold more than
n_ctx tokens is rejected with `context_overflow`.

The class is not thread-safe: the server calls it from one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import llama_cpp._internals as internals
import numpy as np

from agent import distributions, protocol
from agent.config import AgentConfig
from agent.energy import EnergyMeter, EnergyRecord, NoneMeter
from agent.protocol import DistributionFormat, ProtocolError
from agent.vocabulary import Vocabulary

log = logging.getLogger("moe2.agent.model")

# Continuation tokens decoded per llama_decode call in `score`. Each needs an output
# row of n_vocab floats (1 MiB for a 262,144-token vocabulary), which llama.cpp keeps
# allocated afterwards.
SCORE_OUTPUTS_PER_DECODE = 32

# Granularity of a sequence's context in llama.cpp's KV cache.
CONTEXT_PADDING = 256
FLASH_ATTN_TYPES = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}

T = TypeVar("T")


class ModelError(RuntimeError):
    """The model, adapter or context could not be loaded, or llama.cpp failed."""


@dataclass
class Session:
    """State of one open session."""

    session_id: str
    slot: int            # llama.cpp sequence id
    n_past: int          # tokens in the session's KV cache, domain prompt included
    next_step: int       # number the next `step` request must carry
    last_used: float     # time.monotonic() of the last request


@dataclass(frozen=True)
class Measured:
    """A result with its compute time and energy record."""

    value: Any
    compute_s: float
    energy: EnergyRecord


class ExpertModel:
    """A loaded GGUF model with a fixed number of session slots."""

    def __init__(self, config: AgentConfig, meter: EnergyMeter | None = None):
        self.config = config
        self.meter = meter or NoneMeter()
        self.n_ctx = config.n_ctx
        self.max_sessions = config.max_sessions
        self.score_seq = config.max_sessions
        self.domain_seq = config.max_sessions + 1 if config.domain_prompt_text else None
        self.n_seq = config.max_sessions + (2 if self.domain_seq is not None else 1)

        forward_llama_logs()
        llama_cpp.llama_backend_init()

        started = time.monotonic()
        self.model_sha256 = sha256_file(config.model)
        self.lora_sha256 = sha256_file(config.lora) if config.lora else None
        log.info("model %s sha256 %s (%.1f s)", config.model, self.model_sha256, time.monotonic() - started)

        self._model: internals.LlamaModel | None = None
        self._context: internals.LlamaContext | None = None
        self._adapter = None
        self._batch = None
        try:
            self._model = self._load_model()
            self._context = self._create_context()
            self._adapter = self._attach_lora() if config.lora else None
            # llama.cpp may lower n_batch (to the context size), so ask it for the real value.
            self._batch_capacity = int(llama_cpp.llama_n_batch(self._context.ctx))
            self._batch = llama_cpp.llama_batch_init(self._batch_capacity, 0, 1)
            self._finish_loading()
        except BaseException:
            self.close()
            raise

    def _finish_loading(self) -> None:
        config = self.config
        self.vocab = Vocabulary(self._model.vocab)
        self._scratch = np.empty(self.vocab.n_tokens, dtype=np.float32)
        self.model_name = self._model.metadata().get("general.name") or config.model.stem
        self.sessions: dict[str, Session] = {}
        # A stack: the most recently freed slot is reused first; slot 0 is used first.
        self._free_slots = list(range(self.max_sessions - 1, -1, -1))

        self.n_ctx_train = int(self._model.n_ctx_train())
        if self.n_ctx > self.n_ctx_train:
            log.warning("n_ctx %d per session exceeds the %d tokens the model was trained with; "
                        "quality may drop beyond that", self.n_ctx, self.n_ctx_train)

        self.domain_tokens = np.zeros(0, dtype=np.int32)
        self.domain_sha256 = None
        self._domain_logits: np.ndarray | None = None
        if config.domain_prompt_text:
            self._prepare_domain_prompt(config.domain_prompt_text)

        log.info("loaded %s: %d real tokens (n_vocab %d), %d sessions of %d tokens, %d threads%s%s",
                 config.expert_name, self.vocab.n_tokens, self.vocab.n_vocab, self.max_sessions,
                 self.n_ctx, config.threads, f", LoRA {config.lora}" if config.lora else "",
                 f", domain prompt of {len(self.domain_tokens)} tokens" if self.domain_seq is not None else "")

    # --- loading ---------------------------------------------------------------------

    def _load_model(self) -> internals.LlamaModel:
        params = llama_cpp.llama_model_default_params()
        # llama.cpp caps the layer count at the model's own; INT32_MAX means all layers.
        params.n_gpu_layers = 0x7FFFFFFF if self.config.n_gpu_layers == -1 else self.config.n_gpu_layers
        try:
            # verbose=True keeps stderr open; llama.cpp's messages go to `logging`.
            return internals.LlamaModel(path_model=str(self.config.model), params=params, verbose=True)
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not load {self.config.model}: {exc}; "
                             "check that the file is a complete GGUF model") from exc

    def _create_context(self) -> internals.LlamaContext:
        params = llama_cpp.llama_context_default_params()
        # llama.cpp rounds each sequence's context up to a multiple of 256 cells and
        # warns when n_ctx is not a multiple of n_seq_max, so ask for exactly that.
        per_sequence = -(-self.n_ctx // CONTEXT_PADDING) * CONTEXT_PADDING
        params.n_ctx = per_sequence * self.n_seq
        params.n_seq_max = self.n_seq
        params.kv_unified = False
        params.n_batch = self.config.n_batch
        params.n_ubatch = self.config.n_batch
        params.n_threads = self.config.threads
        params.n_threads_batch = self.config.threads
        params.flash_attn_type = FLASH_ATTN_TYPES[self.config.flash_attn]
        params.no_perf = True
        try:
            context = internals.LlamaContext(model=self._model, params=params, verbose=True)
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not create a context of {self.n_seq} sequences x "
                             f"{self.n_ctx} tokens: {exc}; lower n_ctx or max_sessions") from exc
        n_ctx_seq = llama_cpp.llama_n_ctx_seq(context.ctx)
        if n_ctx_seq < self.n_ctx:
            raise ModelError(f"llama.cpp gave each sequence {n_ctx_seq} tokens of context, "
                             f"fewer than n_ctx {self.n_ctx}")
        return context

    def _attach_lora(self) -> Any:
        path = str(self.config.lora)
        adapter = llama_cpp.llama_adapter_lora_init(self._model.model, path.encode("utf-8"))
        if not adapter:
            raise ModelError(f"llama.cpp rejected the LoRA adapter {path}; check that it was "
                             "converted for this model's architecture and shapes (see the log above)")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(self.config.lora_scale)
        if llama_cpp.llama_set_adapters_lora(self._context.ctx, adapters, 1, scales) != 0:
            llama_cpp.llama_adapter_lora_free(adapter)
            raise ModelError(f"llama.cpp could not attach the LoRA adapter {path} to the context")
        return adapter

    def _prepare_domain_prompt(self, text: str) -> None:
        tokens = self.vocab.tokenize(text, add_special=True)
        if len(tokens) > self.n_ctx - 1:
            raise ModelError(f"the domain prompt has {len(tokens)} tokens, but the context of a session "
                             f"is n_ctx = {self.n_ctx}; raise n_ctx above {len(tokens)} or shorten the prompt")
        started = time.monotonic()
        self._decode(self.domain_seq, tokens, 0, outputs=[len(tokens) - 1])
        self._domain_logits = self._logits(-1).copy()
        self.domain_tokens = tokens
        self.domain_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        log.info("domain prompt: %d tokens decoded once in %.2f s", len(tokens), time.monotonic() - started)

    def close(self) -> None:
        """Free the batch, context, adapter and model. Safe to call twice."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._context is not None:
            self._context.close()
            self._context = None
        if self._adapter is not None:
            llama_cpp.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # --- decoding --------------------------------------------------------------------

    def _decode(self, seq: int, tokens: np.ndarray, start: int, outputs: list[int]) -> None:
        """Decode `tokens` into sequence `seq` at positions start, start + 1, ...

        `outputs` lists the indices into `tokens` whose logits are kept. They must all lie
        in the last chunk of n_batch tokens, because each decode call overwrites the
        logits of the previous one.
        """
        batch = self._batch
        capacity = self._batch_capacity
        wanted = set(outputs)
        for chunk_start in range(0, len(tokens), capacity):
            chunk = tokens[chunk_start:chunk_start + capacity]
            count = len(chunk)
            np.ctypeslib.as_array(batch.token, shape=(capacity,))[:count] = chunk
            np.ctypeslib.as_array(batch.pos, shape=(capacity,))[:count] = np.arange(
                start + chunk_start, start + chunk_start + count, dtype=np.int32)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(capacity,))[:count] = 1
            logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
            logits[:count] = 0
            for i in range(count):
                batch.seq_id[i][0] = seq
                if chunk_start + i in wanted:
                    logits[i] = 1
            batch.n_tokens = count
            status = llama_cpp.llama_decode(self._context.ctx, batch)
            if status != 0:
                raise ModelError(f"llama_decode failed with status {status} on sequence {seq} "
                                 f"at positions {start + chunk_start}..{start + chunk_start + count - 1}")

    def _logits(self, index: int) -> np.ndarray:
        """Return a view of the logits of the real tokens for output `index` of the last decode."""
        pointer = llama_cpp.llama_get_logits_ith(self._context.ctx, index)
        if not pointer:
            raise ModelError(f"llama_get_logits_ith returned no logits for output {index}")
        return np.ctypeslib.as_array(pointer, shape=(self.vocab.n_vocab,))[:self.vocab.n_tokens]

    def _distribution(self, logits: np.ndarray, fmt: DistributionFormat) -> dict:
        try:
            return distributions.encode(logits, fmt, self._scratch)
        except distributions.NonFiniteLogits as exc:
            raise ModelError(f"the model produced invalid logits: {exc}") from exc

    def _clear(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._context.memory, seq, -1, -1)

    def _measure(self, work: Callable[[], T]) -> Measured:
        mark = self.meter.start()
        started = time.perf_counter()
        value = work()
        compute_s = time.perf_counter() - started
        return Measured(value, compute_s, self.meter.stop(mark))

    # --- prompts ---------------------------------------------------------------------

    def prompt_tokens(self, prompt: str | np.ndarray, add_bos: bool, field: str = "prompt") -> np.ndarray:
        """Return the tokens that follow the domain prompt for `prompt`.

        Text is tokenized here. BOS is added only when `add_bos` is true, the model's
        metadata requests it and there is no domain prompt (which starts with its own
        BOS). Token ids are used exactly as given after checking their range.
        """
        if isinstance(prompt, str):
            add_special = add_bos and self.domain_seq is None
            return self.vocab.tokenize(prompt, add_special=add_special)
        return self.check_tokens(prompt, field)

    def check_tokens(self, tokens: np.ndarray, field: str) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.size:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab.n_tokens:
                bad = low if low < 0 else high
                raise ProtocolError(protocol.TOKEN_OUT_OF_RANGE,
                                    f"{field} contains token id {bad}, outside 0..{self.vocab.n_tokens - 1}",
                                    field, token=bad, n_tokens=self.vocab.n_tokens)
        return tokens

    def _overflow(self, n_tokens: int, what: str) -> ProtocolError:
        return ProtocolError(protocol.CONTEXT_OVERFLOW,
                             f"{what} needs {n_tokens} tokens of context, but the context of a session is n_ctx = "
                             f"{self.n_ctx}" + (f" ({len(self.domain_tokens)} of them taken by the domain prompt)"
                                                if len(self.domain_tokens) else ""),
                             None, n_tokens=n_tokens, n_ctx=self.n_ctx)

    # --- sessions --------------------------------------------------------------------

    def open(self, session_id: str, prompt: str | np.ndarray, fmt: DistributionFormat,
             add_bos: bool = True) -> Measured:
        """Open a session on `prompt`; the value is (Session, DIST of step 0)."""
        if session_id in self.sessions:
            raise ProtocolError(protocol.SESSION_EXISTS, f"session {session_id!r} is already open; "
                                "close it first or use a new id", "session")
        if not self._free_slots:
            raise ProtocolError(protocol.BUSY, f"all {self.max_sessions} sessions are in use; "
                                "retry after one closes", None, max_sessions=self.max_sessions)

        def work():
            tokens = self.prompt_tokens(prompt, add_bos)
            n_total = len(self.domain_tokens) + len(tokens)
            if n_total == 0:
                raise ProtocolError(protocol.BAD_REQUEST, "prompt is empty and there is no domain prompt", "prompt")
            if n_total > self.n_ctx - 1:
                raise self._overflow(n_total, "the prompt")
            slot = self._free_slots.pop()
            try:
                logits = self._fill(slot, tokens)
                dist = self._distribution(logits, fmt)
            except BaseException:
                self._clear(slot)
                self._free_slots.append(slot)
                raise
            session = Session(session_id, slot, n_total, 1, time.monotonic())
            self.sessions[session_id] = session
            return session, dist

        measured = self._measure(work)
        log.debug("opened session %r in slot %d with %d tokens", session_id, measured.value[0].slot,
                  measured.value[0].n_past)
        return measured

    def _fill(self, seq: int, tokens: np.ndarray, with_logits: bool = True) -> np.ndarray | None:
        """Fill sequence `seq` with the domain prompt and `tokens`.

        Returns the logits after the last token, or None when `with_logits` is false.
        """
        self._clear(seq)
        n_domain = len(self.domain_tokens)
        if n_domain:
            llama_cpp.llama_memory_seq_cp(self._context.memory, self.domain_seq, seq, -1, -1)
        if len(tokens) == 0:
            return self._domain_logits if with_logits else None
        self._decode(seq, tokens, n_domain, outputs=[len(tokens) - 1] if with_logits else [])
        return self._logits(-1) if with_logits else None

    def step(self, session_id: str, step: int, token: int, fmt: DistributionFormat) -> Measured:
        """Decode one token of a session; the value is (Session, DIST of `step`)."""
        session = self._session(session_id)
        if step != session.next_step:
            raise ProtocolError(protocol.BAD_STEP, f"step {step} of session {session_id!r} is out of order; "
                                f"the next step is {session.next_step}", "step",
                                expected=session.next_step, received=step)
        if not 0 <= token < self.vocab.n_tokens:
            raise ProtocolError(protocol.TOKEN_OUT_OF_RANGE, f"token id {token} is outside "
                                f"0..{self.vocab.n_tokens - 1}", "token", token=token, n_tokens=self.vocab.n_tokens)
        if session.n_past + 1 > self.n_ctx:
            raise self._overflow(session.n_past + 1, f"step {step} of session {session_id!r}")

        def work():
            try:
                self._decode(session.slot, np.array([token], dtype=np.int32), session.n_past, outputs=[0])
            except ModelError:
                self._drop(session, "its decode failed")
                raise
            session.n_past += 1
            session.next_step += 1
            session.last_used = time.monotonic()
            return session, self._distribution(self._logits(-1), fmt)

        return self._measure(work)

    def close_session(self, session_id: str) -> None:
        session = self._session(session_id)
        self._drop(session, "the client closed it")

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ProtocolError(protocol.UNKNOWN_SESSION, f"session {session_id!r} is not open "
                                "(never opened, closed, or expired after the idle timeout)", "session")
        return session

    def _drop(self, session: Session, reason: str) -> None:
        self._clear(session.slot)
        del self.sessions[session.session_id]
        self._free_slots.append(session.slot)
        log.debug("closed session %r in slot %d: %s", session.session_id, session.slot, reason)

    def expire_idle(self, idle_timeout: float, now: float | None = None) -> list[str]:
        """Close sessions idle for longer than `idle_timeout` seconds; return their ids."""
        now = time.monotonic() if now is None else now
        expired = [s for s in self.sessions.values() if now - s.last_used > idle_timeout]
        for session in expired:
            self._drop(session, f"idle for more than {idle_timeout:g} s")
            log.info("session %r expired after %.0f s without requests", session.session_id,
                     now - session.last_used)
        return [s.session_id for s in expired]

    # --- scoring ---------------------------------------------------------------------

    def score(self, prompt: str | np.ndarray, continuation: np.ndarray, add_bos: bool = True) -> Measured:
        """Teacher-force `continuation` after `prompt`; the value is (logprobs, n_prompt).

        logprobs[t] = log p(continuation[t] | domain prompt, prompt, continuation[:t]),
        float32. n_prompt counts the domain prompt and prompt tokens. The last
        continuation token is never decoded, so the context must hold
        n_prompt + len(continuation) - 1 tokens.
        """
        continuation = self.check_tokens(continuation, "continuation")
        if continuation.size == 0:
            raise ProtocolError(protocol.BAD_REQUEST, "continuation is empty; send at least one token id",
                                "continuation")

        def work():
            tokens = self.prompt_tokens(prompt, add_bos)
            n_prompt = len(self.domain_tokens) + len(tokens)
            if n_prompt == 0:
                raise ProtocolError(protocol.BAD_REQUEST, "prompt is empty and there is no domain prompt", "prompt")
            n_needed = n_prompt + len(continuation) - 1
            if n_needed > self.n_ctx:
                raise self._overflow(n_needed, "scoring the prompt and continuation")
            try:
                return self._score(tokens, continuation), n_prompt
            finally:
                self._clear(self.score_seq)

        return self._measure(work)

    def _score(self, tokens: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        seq = self.score_seq
        logprobs = np.empty(len(continuation), dtype=np.float32)

        # The prompt is decoded exactly as `open` decodes it, so logprobs[0] equals the
        # step-0 distribution of a session on the same prompt.
        logits = self._fill(seq, tokens)
        logprobs[0] = distributions.token_logprob(logits, int(continuation[0]), self._scratch)

        # NOTE: the continuation is decoded SCORE_OUTPUTS_PER_DECODE tokens per call.
        # llama.cpp's CPU kernels differ with batch size: on the Q4_K_M demo model
        # (llama-cpp-python 0.3.36, x86_64) single tokens then differ by up to 3 nats
        # from one-token steps, while the mean log-likelihood agrees to 0.01 nats.
        forced = continuation[:-1]
        position = len(self.domain_tokens) + len(tokens)
        chunk_size = min(SCORE_OUTPUTS_PER_DECODE, self._batch_capacity)
        for start in range(0, len(forced), chunk_size):
            chunk = forced[start:start + chunk_size]
            self._decode(seq, chunk, position + start, outputs=list(range(len(chunk))))
            for i in range(len(chunk)):
                target = start + i + 1
                logprobs[target] = distributions.token_logprob(self._logits(i), int(continuation[target]),
                                                               self._scratch)
        return logprobs

    # --- description -----------------------------------------------------------------

    def info(self) -> dict:
        """Return the fields of an `info` reply that describe the model."""
        gpu = self.config.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        return {
            "name": self.config.expert_name,
            "model": self.model_name,
            "model_file": self.config.model.name,
            "model_sha256": self.model_sha256,
            "model_desc": self._model.desc(),
            "n_params": int(self._model.n_params()),
            **self.vocab.describe(),
            "n_ctx": self.n_ctx,
            "n_ctx_train": self.n_ctx_train,
            "max_sessions": self.max_sessions,
            "open_sessions": len(self.sessions),
            "device": "gpu" if gpu else "cpu",
            "n_gpu_layers": self.config.n_gpu_layers,
            "n_threads": self.config.threads,
            "flash_attn": self.config.flash_attn,
            "lora": None if self.config.lora is None else {
                "file": self.config.lora.name, "sha256": self.lora_sha256, "scale": self.config.lora_scale},
            "domain_prompt": None if self.domain_seq is None else {
                "sha256": self.domain_sha256, "n_tokens": int(len(self.domain_tokens))},
            "energy_meter": self.meter.describe(),
            "llama_cpp_python": llama_cpp.__version__,
        }


def sha256_file(path: Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(block_size):
            digest.update(block)
    return digest.hexdigest()


# --- llama.cpp log messages ----------------------------------------------------------

_llama_log = logging.getLogger("moe2.llama_cpp")
# enum ggml_log_level of the ggml in llama-cpp-python 0.3.36: 0 none, 1 debug, 2 info,
# 3 warn, 4 error, 5 continuation of the previous message. llama.cpp's info messages
# (hundreds per model load) are logged at DEBUG.
_GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    python_level = _last_level if level == 5 else _GGML_LEVELS.get(level, logging.DEBUG)
    _last_level = python_level
    message = text.decode("utf-8", errors="replace").rstrip()
    if message and _llama_log.isEnabledFor(python_level):
        _llama_log.log(python_level, "%s", message)


def forward_llama_logs() -> None:
    """Send llama.cpp's log messages to the `moe2.llama_cpp` logger instead of stderr."""
    llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
