"""ExpertModel on tiny generated GGUF files, compared with llama-cpp-python's own Llama.

Tolerance: the agent and the reference `Llama(logits_all=True)` run the same llama.cpp
kernels on the same tokens, so their log-probabilities agree to float32 rounding. The
tests allow 1e-4 (measured differences are about 2e-6). Flash attention changes the
logits by about 5e-3 on the tiny model, so every comparison uses the same setting on
both sides.
"""

from __future__ import annotations

import hashlib

import llama_cpp
import numpy as np
import pytest

from agent import protocol
from agent.config import load_config
from agent.model import SCORE_OUTPUTS_PER_DECODE, ExpertModel, ModelError
from agent.protocol import DENSE, DistributionFormat, ProtocolError, decode_distribution
from gguf_factory import OTHER_WORDS, build_vocab

TOLERANCE = 1e-4
PROMPT = "the quick brown fox"
OTHER_PROMPT = "hello world is a"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def make_model():
    """Return a factory: make_model(path, **settings) -> ExpertModel, closed at teardown."""
    models = []

    def make(path, **settings):
        settings.setdefault("n_threads", 1)
        settings.setdefault("n_ctx", 64)
        model = ExpertModel(load_config({"model": path, **settings}))
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


def reference_logprobs(path, tokens, *, flash_attn=False, lora=None, n_real=None) -> np.ndarray:
    """Return float64 log-probabilities after every token, from Llama(logits_all=True)."""
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1,
                          flash_attn=flash_attn, lora_path=None if lora is None else str(lora))
    try:
        llm.eval(list(map(int, tokens)))
        logits = np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    if n_real is not None:
        logits = logits[:, :n_real]
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def dense(measured) -> np.ndarray:
    return decode_distribution(measured.value[1]).logprobs


def greedy_run(model, session, prompt, n_steps) -> tuple[list[int], list[np.ndarray]]:
    """Open `session`, take the argmax token n_steps times; return tokens and distributions."""
    logprobs = dense(model.open(session, prompt, DENSE))
    tokens, dists = [], [logprobs]
    for step in range(1, n_steps + 1):
        token = int(np.argmax(logprobs))
        logprobs = dense(model.step(session, step, token, DENSE))
        tokens.append(token)
        dists.append(logprobs)
    return tokens, dists


# --- logits ----------------------------------------------------------------------------

@pytest.mark.parametrize("flash_attn", ["off", "on"])
def test_open_matches_logits_all_reference(make_model, tiny_model_path, flash_attn):
    model = make_model(tiny_model_path, flash_attn=flash_attn)
    tokens = model.vocab.tokenize(PROMPT, add_special=True)
    expected = reference_logprobs(tiny_model_path, tokens, flash_attn=flash_attn == "on")[-1]

    logprobs = dense(model.open("s", PROMPT, DENSE))

    assert logprobs.dtype == np.float32
    assert logprobs.shape == (model.vocab.n_tokens,)
    assert np.abs(logprobs - expected).max() < TOLERANCE
    assert logprobs.std() > 1.0, "distribution is (nearly) constant: logits were not read"


def test_steps_match_logits_all_reference(make_model, tiny_model_path):
    model = make_model(tiny_model_path, flash_attn="off")
    tokens, dists = greedy_run(model, "s", PROMPT, n_steps=6)
    prompt_tokens = model.vocab.tokenize(PROMPT, add_special=True)
    expected = reference_logprobs(tiny_model_path, np.concatenate([prompt_tokens, tokens]))

    for step, logprobs in enumerate(dists):
        row = len(prompt_tokens) - 1 + step
        assert np.abs(logprobs - expected[row]).max() < TOLERANCE, f"step {step}"


def test_step_decodes_exactly_one_token(make_model, tiny_model_path):
    model = make_model(tiny_model_path)
    session = model.open("s", PROMPT, DENSE).value[0]
    n_prompt = session.n_past
    memory = model._context.memory

    for step in range(1, 5):
        model.step("s", step, 5, DENSE)
        assert session.n_past == n_prompt + step
        # The sequence contains positions 0..n_past-1 once each, so nothing was re-evaluated.
        assert llama_cpp.llama_memory_seq_pos_min(memory, session.slot) == 0
        assert llama_cpp.llama_memory_seq_pos_max(memory, session.slot) == session.n_past - 1


def test_sparse_matches_dense(make_model, tiny_model_path):
    model = make_model(tiny_model_path)
    full = dense(model.open("a", PROMPT, DENSE))
    top = decode_distribution(model.open("b", PROMPT, DistributionFormat("sparse", 16)).value[1])

    order = np.argsort(full)[::-1][:16]
    assert top.kind == "sparse"
    assert np.array_equal(np.sort(top.ids), np.sort(order))
    assert np.allclose(top.logprobs, full[top.ids], atol=1e-5)
    assert np.all(np.diff(top.logprobs) <= 0), "sparse ids are not sorted by probability"
    assert top.tail == pytest.approx(1.0 - np.exp(full[order].astype(np.float64)).sum(), abs=1e-5)


# --- sessions --------------------------------------------------------------------------

def test_interleaved_sessions_equal_sequential(make_model, tiny_model_path):
    interleaved = make_model(tiny_model_path)
    sequential = make_model(tiny_model_path)
    n_steps = 5

    # Interleaved: A and B alternate, in different slots of one context.
    a = dense(interleaved.open("a", PROMPT, DENSE))
    b = dense(interleaved.open("b", OTHER_PROMPT, DENSE))
    interleaved_a, interleaved_b = [a], [b]
    for step in range(1, n_steps + 1):
        a = dense(interleaved.step("a", step, int(np.argmax(a)), DENSE))
        b = dense(interleaved.step("b", step, int(np.argmax(b)), DENSE))
        interleaved_a.append(a)
        interleaved_b.append(b)

    # Sequential: A to the end, closed, then B (in A's freed slot).
    _, sequential_a = greedy_run(sequential, "a", PROMPT, n_steps)
    sequential.close_session("a")
    _, sequential_b = greedy_run(sequential, "b", OTHER_PROMPT, n_steps)

    for step in range(n_steps + 1):
        np.testing.assert_array_equal(interleaved_a[step], sequential_a[step], err_msg=f"session a, step {step}")
        np.testing.assert_array_equal(interleaved_b[step], sequential_b[step], err_msg=f"session b, step {step}")


def test_reused_slot_equals_fresh_context(make_model, tiny_model_path):
    used = make_model(tiny_model_path, max_sessions=1)
    greedy_run(used, "old", OTHER_PROMPT, n_steps=8)
    used.close_session("old")
    reused = dense(used.open("new", PROMPT, DENSE))
    reused_slot = used.sessions["new"].slot

    fresh = dense(make_model(tiny_model_path, max_sessions=1).open("new", PROMPT, DENSE))

    assert reused_slot == 0
    np.testing.assert_array_equal(reused, fresh)


def test_open_beyond_max_sessions_is_busy(make_model, tiny_model_path):
    model = make_model(tiny_model_path, max_sessions=2)
    model.open("a", PROMPT, DENSE)
    model.open("b", PROMPT, DENSE)

    with pytest.raises(ProtocolError) as raised:
        model.open("c", PROMPT, DENSE)
    assert raised.value.code == protocol.BUSY
    assert raised.value.details["max_sessions"] == 2

    model.close_session("a")
    assert model.open("c", PROMPT, DENSE).value[0].session_id == "c"


def test_open_existing_session_is_rejected(make_model, tiny_model_path):
    model = make_model(tiny_model_path)
    model.open("a", PROMPT, DENSE)

    with pytest.raises(ProtocolError) as raised:
        model.open("a", PROMPT, DENSE)
    assert raised.value.code == protocol.SESSION_EXISTS
    assert raised.value.field == "session"


def test_step_with_wrong_number_is_rejected(make_model, tiny_model_path):
    model = make_model(tiny_model_path)
    model.open("a", PROMPT, DENSE)
    model.step("a", 1, 5, DENSE)

    for wrong in (1, 3, 0, -1):
        with pytest.raises(ProtocolError) as raised:
            model.step("a", wrong, 5, DENSE)
        assert raised.value.code == protocol.BAD_STEP
        assert raised.value.field == "step"
        assert raised.value.details["expected"] == 2
    assert model.sessions["a"].n_past == len(model.vocab.tokenize(PROMPT, True)) + 1


def test_token_out_of_range_is_rejected(make_model, tiny_gguf):
    model = make_model(tiny_gguf(n_pad=20))
    model.open("a", PROMPT, DENSE)

    for token in (-1, model.vocab.n_tokens, model.vocab.n_vocab - 1, 1 << 30):
        with pytest.raises(ProtocolError) as raised:
            model.step("a", 1, token, DENSE)
        assert raised.value.code == protocol.TOKEN_OUT_OF_RANGE
        assert raised.value.field == "token"
    with pytest.raises(ProtocolError) as raised:
        model.open("b", np.array([1, model.vocab.n_tokens], dtype=np.int32), DENSE)
    assert raised.value.field == "prompt"


def test_idle_sessions_expire(make_model, tiny_model_path):
    model = make_model(tiny_model_path, max_sessions=1)
    opened_at = model.open("a", PROMPT, DENSE).value[0].last_used

    assert model.expire_idle(10.0, now=opened_at + 5.0) == []
    assert model.expire_idle(10.0, now=opened_at + 11.0) == ["a"]
    assert "a" not in model.sessions
    with pytest.raises(ProtocolError) as raised:
        model.step("a", 1, 5, DENSE)
    assert raised.value.code == protocol.UNKNOWN_SESSION
    model.open("b", PROMPT, DENSE)


# --- context limit ---------------------------------------------------------------------

def test_prompt_of_n_ctx_minus_one_is_accepted(make_model, tiny_model_path):
    model = make_model(tiny_model_path, n_ctx=32)
    prompt = np.full(31, 5, dtype=np.int32)

    session = model.open("a", prompt, DENSE).value[0]

    assert session.n_past == 31


@pytest.mark.parametrize("length", [32, 33, 100])
def test_prompt_of_n_ctx_or_more_overflows(make_model, tiny_model_path, length):
    model = make_model(tiny_model_path, n_ctx=32)

    with pytest.raises(ProtocolError) as raised:
        model.open("a", np.full(length, 5, dtype=np.int32), DENSE)

    assert raised.value.code == protocol.CONTEXT_OVERFLOW
    assert raised.value.details == {"n_tokens": length, "n_ctx": 32}
    assert model.sessions == {}
    assert model.open("b", PROMPT, DENSE).value[0].session_id == "b", "model unusable after overflow"


def test_steps_to_end_of_context_overflow(make_model, tiny_model_path):
    model = make_model(tiny_model_path, n_ctx=32)
    model.open("a", np.full(29, 5, dtype=np.int32), DENSE)
    model.step("a", 1, 5, DENSE)
    model.step("a", 2, 5, DENSE)
    model.step("a", 3, 5, DENSE)          # the session now contains n_ctx = 32 tokens

    with pytest.raises(ProtocolError) as raised:
        model.step("a", 4, 5, DENSE)

    assert raised.value.code == protocol.CONTEXT_OVERFLOW
    assert raised.value.details == {"n_tokens": 33, "n_ctx": 32}
    assert model.sessions["a"].n_past == 32
    model.close_session("a")
    assert model.open("b", PROMPT, DENSE).value[0].n_past > 0


def test_text_prompt_longer_than_batch(make_model, tiny_model_path):
    model = make_model(tiny_model_path, n_ctx=200, n_batch=16, flash_attn="off")
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    tokens = model.vocab.tokenize(text, add_special=True)
    assert 16 < len(tokens) < 200

    logprobs = dense(model.open("a", text, DENSE))

    expected = reference_logprobs(tiny_model_path, tokens)[-1]
    assert np.abs(logprobs - expected).max() < TOLERANCE


# --- domain prompt ---------------------------------------------------------------------

def write_domain_prompt(tmp_path, text="hello world the capital of France is Paris"):
    path = tmp_path / "domain.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_domain_prompt_equals_concatenated_prompt(make_model, tiny_model_path, tmp_path):
    domain_path, domain_text = write_domain_prompt(tmp_path)
    model = make_model(tiny_model_path, domain_prompt=domain_path, flash_attn="off")
    domain_tokens = model.vocab.tokenize(domain_text, add_special=True)
    prompt_tokens = model.vocab.tokenize(PROMPT, add_special=False)
    expected = reference_logprobs(tiny_model_path, np.concatenate([domain_tokens, prompt_tokens]))

    session, dist = model.open("a", PROMPT, DENSE).value
    logprobs = decode_distribution(dist).logprobs

    assert np.array_equal(model.domain_tokens, domain_tokens)
    assert session.n_past == len(domain_tokens) + len(prompt_tokens)
    assert np.abs(logprobs - expected[-1]).max() < TOLERANCE
    after_step = dense(model.step("a", 1, 7, DENSE))
    expected_step = reference_logprobs(tiny_model_path, np.concatenate([domain_tokens, prompt_tokens, [7]]))
    assert np.abs(after_step - expected_step[-1]).max() < TOLERANCE


def test_domain_prompt_is_decoded_once(make_model, tiny_model_path, tmp_path, monkeypatch):
    domain_path, _ = write_domain_prompt(tmp_path)
    model = make_model(tiny_model_path, domain_prompt=domain_path)
    decoded = []
    original = model._decode

    def counting_decode(seq, tokens, start, outputs):
        decoded.append(len(tokens))
        original(seq, tokens, start, outputs)

    monkeypatch.setattr(model, "_decode", counting_decode)
    prompt_tokens = model.vocab.tokenize(PROMPT, add_special=False)

    for index in range(3):
        model.open(f"s{index}", PROMPT, DENSE)

    assert decoded == [len(prompt_tokens)] * 3


def test_empty_prompt_after_domain_prompt(make_model, tiny_model_path, tmp_path):
    domain_path, domain_text = write_domain_prompt(tmp_path)
    model = make_model(tiny_model_path, domain_prompt=domain_path, flash_attn="off")
    expected = reference_logprobs(tiny_model_path, model.vocab.tokenize(domain_text, add_special=True))[-1]

    logprobs = dense(model.open("a", "", DENSE))

    assert np.abs(logprobs - expected).max() < TOLERANCE


def test_domain_prompt_counts_toward_context(make_model, tiny_model_path, tmp_path):
    domain_path, _ = write_domain_prompt(tmp_path)
    model = make_model(tiny_model_path, domain_prompt=domain_path, n_ctx=32)
    n_domain = len(model.domain_tokens)

    model.open("a", np.full(31 - n_domain, 5, dtype=np.int32), DENSE)
    with pytest.raises(ProtocolError) as raised:
        model.open("b", np.full(32 - n_domain, 5, dtype=np.int32), DENSE)

    assert raised.value.code == protocol.CONTEXT_OVERFLOW
    assert raised.value.details == {"n_tokens": 32, "n_ctx": 32}


# --- LoRA ------------------------------------------------------------------------------

def test_lora_changes_logits(make_model, tiny_model_path, tiny_lora_path):
    base = dense(make_model(tiny_model_path).open("a", PROMPT, DENSE))
    adapted_model = make_model(tiny_model_path, lora=tiny_lora_path, flash_attn="off")
    adapted = dense(adapted_model.open("a", PROMPT, DENSE))
    tokens = adapted_model.vocab.tokenize(PROMPT, add_special=True)
    expected = reference_logprobs(tiny_model_path, tokens, lora=tiny_lora_path)[-1]

    assert np.abs(adapted - base).max() > 1.0
    assert np.abs(adapted - expected).max() < TOLERANCE
    assert adapted_model.info()["lora"]["sha256"] == adapted_model.lora_sha256


def test_lora_scale_zero_equals_base(make_model, tiny_model_path, tiny_lora_path):
    base = dense(make_model(tiny_model_path).open("a", PROMPT, DENSE))
    scaled = dense(make_model(tiny_model_path, lora=tiny_lora_path, lora_scale=0.0).open("a", PROMPT, DENSE))

    assert np.abs(scaled - base).max() < TOLERANCE


# --- score -----------------------------------------------------------------------------

def test_score_equals_step_distributions(make_model, tiny_model_path):
    model = make_model(tiny_model_path, n_ctx=128)
    continuation = np.array([408, 416, 9, 42, 2], dtype=np.int32)
    expected = []
    logprobs = dense(model.open("s", PROMPT, DENSE))
    for step, token in enumerate(continuation, start=1):
        expected.append(logprobs[token])
        logprobs = dense(model.step("s", step, int(token), DENSE))

    scored, n_prompt = model.score(PROMPT, continuation).value

    assert scored.dtype == np.float32
    assert n_prompt == len(model.vocab.tokenize(PROMPT, True))
    assert np.abs(scored - np.array(expected)).max() < TOLERANCE


def test_score_longer_than_one_decode(make_model, tiny_model_path):
    model = make_model(tiny_model_path, n_ctx=128, flash_attn="off")
    rng = np.random.default_rng(0)
    continuation = rng.integers(3, model.vocab.n_tokens, SCORE_OUTPUTS_PER_DECODE + 9).astype(np.int32)
    prompt = model.vocab.tokenize(PROMPT, add_special=True)
    reference = reference_logprobs(tiny_model_path, np.concatenate([prompt, continuation]))
    expected = reference[len(prompt) - 1 + np.arange(len(continuation)), continuation]

    scored, _ = model.score(prompt, continuation).value

    assert np.abs(scored - expected).max() < TOLERANCE


def test_score_with_domain_prompt(make_model, tiny_model_path, tmp_path):
    domain_path, domain_text = write_domain_prompt(tmp_path)
    model = make_model(tiny_model_path, domain_prompt=domain_path, flash_attn="off")
    domain_tokens = model.vocab.tokenize(domain_text, add_special=True)
    continuation = np.array([408, 416, 5], dtype=np.int32)

    for prompt in ("", PROMPT):
        prompt_tokens = model.vocab.tokenize(prompt, add_special=False)
        context = np.concatenate([domain_tokens, prompt_tokens])
        reference = reference_logprobs(tiny_model_path, np.concatenate([context, continuation]))
        expected = reference[len(context) - 1 + np.arange(3), continuation]

        scored, n_prompt = model.score(prompt, continuation).value

        assert n_prompt == len(context)
        assert np.abs(scored - expected).max() < TOLERANCE, f"prompt {prompt!r}"


def test_score_overflow_and_empty_continuation(make_model, tiny_model_path):
    model = make_model(tiny_model_path, n_ctx=32)
    prompt = np.full(20, 5, dtype=np.int32)

    assert model.score(prompt, np.full(13, 5, dtype=np.int32)).value[0].shape == (13,)
    with pytest.raises(ProtocolError) as raised:
        model.score(prompt, np.full(14, 5, dtype=np.int32))
    assert raised.value.code == protocol.CONTEXT_OVERFLOW
    assert raised.value.details == {"n_tokens": 33, "n_ctx": 32}
    with pytest.raises(ProtocolError) as raised:
        model.score(prompt, np.zeros(0, dtype=np.int32))
    assert raised.value.field == "continuation"


def test_score_leaves_sessions_untouched(make_model, tiny_model_path):
    model = make_model(tiny_model_path)
    first = dense(model.open("a", PROMPT, DENSE))
    model.score(OTHER_PROMPT, np.array([5, 6, 7], dtype=np.int32))
    after_score = dense(model.step("a", 1, int(np.argmax(first)), DENSE))

    other = make_model(tiny_model_path)
    other.open("a", PROMPT, DENSE)
    expected = dense(other.step("a", 1, int(np.argmax(first)), DENSE))

    np.testing.assert_array_equal(after_score, expected)


# --- vocabulary ------------------------------------------------------------------------

def test_padded_vocab_has_same_fingerprint(make_model, tiny_gguf):
    plain = make_model(tiny_gguf())
    padded = make_model(tiny_gguf(n_pad=37))

    assert padded.vocab.n_vocab == plain.vocab.n_vocab + 37
    assert padded.vocab.n_tokens == plain.vocab.n_tokens == plain.vocab.n_vocab
    assert padded.vocab.fingerprint == plain.vocab.fingerprint
    # The real tokens' weights do not depend on the padding, so neither do the distributions.
    np.testing.assert_allclose(dense(padded.open("a", PROMPT, DENSE)), dense(plain.open("a", PROMPT, DENSE)),
                               atol=TOLERANCE)


def test_different_tokens_have_different_fingerprints(make_model, tiny_gguf):
    default = make_model(tiny_gguf())
    other = make_model(tiny_gguf(words=OTHER_WORDS))
    other_padded = make_model(tiny_gguf(words=OTHER_WORDS, n_pad=5))

    assert other.vocab.fingerprint != default.vocab.fingerprint
    assert other_padded.vocab.fingerprint == other.vocab.fingerprint
    assert other.vocab.n_tokens != default.vocab.n_tokens


def test_info_describes_model(make_model, tiny_gguf, tiny_lora_path, tmp_path):
    domain_path, domain_text = write_domain_prompt(tmp_path)
    model = make_model(tiny_gguf(), lora=tiny_lora_path, domain_prompt=domain_path, n_ctx=48,
                       max_sessions=3, name="tiny-expert")

    info = model.info()

    assert info["name"] == "tiny-expert"
    assert info["model"] == "tiny-llama"
    assert info["n_vocab"] == info["n_tokens"] == len(build_vocab()[0])
    assert info["bos_id"] == 1
    assert info["eos_id"] == 2
    assert info["stop_ids"] == [2]
    assert info["n_ctx"] == 48
    assert info["max_sessions"] == 3
    assert info["device"] == "cpu"
    assert len(info["model_sha256"]) == 64
    assert info["lora"]["file"] == tiny_lora_path.name
    assert info["domain_prompt"]["n_tokens"] == len(model.domain_tokens)
    assert info["domain_prompt"]["sha256"] == hashlib.sha256(domain_text.encode()).hexdigest()
    assert info["energy_meter"]["name"] == "none"
    assert info["tokenizer_fingerprint"] == model.vocab.fingerprint


def test_lora_for_other_shapes_is_rejected(tiny_gguf, tiny_lora_path):
    config = load_config({"model": tiny_gguf(n_pad=3), "lora": tiny_lora_path, "n_threads": 1})

    with pytest.raises(ModelError, match="rejected the LoRA adapter"):
        ExpertModel(config)
