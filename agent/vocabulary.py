"""A model's vocabulary as the agent reports it: real tokens, special ids, fingerprint.

GGUF files of one model family may pad the embedding matrix with extra rows (Qwen2.5:
n_vocab 151,936 or 152,064 for 151,665 tokenizer tokens). llama.cpp's
`convert_hf_to_gguf.py` names each such row `[PAD<id>]` with its own id (token type
UNUSED, or USER_DEFINED in some of its code paths). The agent counts as padding the
longest run of tokens at the end of the vocabulary whose text is `[PAD<id>]`.
Everything before it is a real token, and `n_tokens` is their count. Distributions
cover the real tokens only. The type alone cannot tell padding apart: Gemma 3 ends
with 6,143 `<unusedN>` tokens of type UNUSED that belong to its tokenizer.

The tokenizer fingerprint is a sha256 over the vocabulary type, every real token's
text and attributes, the special ids and the add-BOS/EOS flags. Two files that differ
only in padding get the same fingerprint. Token scores (SentencePiece merge
priorities) are left out: they change how text is split, not what an id means, and
fusing distributions needs only the same id-to-token mapping.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct

import llama_cpp
import numpy as np

from agent import protocol

FINGERPRINT_VERSION = b"moe2-tokenizer-fingerprint/1"

# Special ids included in the fingerprint and reported by `info`, in this order.
SPECIAL_IDS = {
    "bos": llama_cpp.llama_vocab_bos,
    "eos": llama_cpp.llama_vocab_eos,
    "eot": llama_cpp.llama_vocab_eot,
    "sep": llama_cpp.llama_vocab_sep,
    "nl": llama_cpp.llama_vocab_nl,
    "pad": llama_cpp.llama_vocab_pad,
    "fim_pre": llama_cpp.llama_vocab_fim_pre,
    "fim_suf": llama_cpp.llama_vocab_fim_suf,
    "fim_mid": llama_cpp.llama_vocab_fim_mid,
}


class Vocabulary:
    """Real tokens, special ids, stop ids and fingerprint of a loaded llama.cpp vocab."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p):
        self._vocab = vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.vocab_type = int(llama_cpp.llama_vocab_type(vocab))
        self.attrs = np.array([llama_cpp.llama_vocab_get_attr(vocab, t) for t in range(self.n_vocab)],
                              dtype=np.int32)

        n_tokens = self.n_vocab
        while n_tokens > 0 and self.text(n_tokens - 1) == f"[PAD{n_tokens - 1}]".encode():
            n_tokens -= 1
        self.n_tokens = n_tokens

        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        self.special_ids = {name: int(get(vocab)) for name, get in SPECIAL_IDS.items()}
        self.stop_ids = [t for t in range(self.n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self.fingerprint = self._fingerprint()
        self._pieces: tuple[bytes, np.ndarray] | None = None

    def _fingerprint(self) -> str:
        parts = [FINGERPRINT_VERSION, struct.pack("<ii", self.vocab_type, self.n_tokens)]
        for token in range(self.n_tokens):
            text = self.text(token)
            parts.append(struct.pack("<Ii", len(text), int(self.attrs[token])))
            parts.append(text)
        for name in SPECIAL_IDS:
            parts.append(struct.pack("<i", self.special_ids[name]))
        parts.append(struct.pack("<??", self.add_bos, self.add_eos))
        return hashlib.sha256(b"".join(parts)).hexdigest()

    def text(self, token: int) -> bytes:
        """Return the token's text as stored in the GGUF (`▁the`, `<0x0A>`, `<bos>`)."""
        return llama_cpp.llama_vocab_get_text(self._vocab, token) or b""

    def token_to_piece(self, token: int, buffer: ctypes.Array | None = None) -> bytes:
        """Return the bytes `token` renders to, control tokens included."""
        buffer = buffer if buffer is not None else ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[:size]

    def pieces(self) -> tuple[bytes, np.ndarray]:
        """Return (concatenated pieces, uint32 offsets of length n_tokens + 1), built once."""
        if self._pieces is None:
            buffer = ctypes.create_string_buffer(256)
            pieces = [self.token_to_piece(t, buffer) for t in range(self.n_tokens)]
            offsets = np.zeros(self.n_tokens + 1, dtype=np.uint32)
            np.cumsum([len(p) for p in pieces], out=offsets[1:])
            self._pieces = (b"".join(pieces), offsets)
        return self._pieces

    def vocab_reply_fields(self) -> dict:
        """Return the fields of a `vocab` reply."""
        blob, offsets = self.pieces()
        return {"pieces": blob,
                "offsets": protocol.encode_array(offsets, "<u4"),
                "attrs": protocol.encode_array(self.attrs[:self.n_tokens], "<i4")}

    def tokenize(self, text: str, add_special: bool) -> np.ndarray:
        """Tokenize `text`, parsing special-token text such as `<start_of_turn>`.

        `add_special` adds BOS (and EOS) where the model's metadata requests them.
        """
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        if count < 0:
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
            if count < 0:
                raise RuntimeError(f"llama_tokenize failed on a text of {len(data)} bytes (returned {count})")
        return np.frombuffer(tokens, dtype=np.int32, count=count).copy()

    def describe(self) -> dict:
        """Return the vocabulary fields of an `info` reply."""
        return {
            "n_vocab": self.n_vocab,
            "n_tokens": self.n_tokens,
            "vocab_type": self.vocab_type,
            "tokenizer_fingerprint": self.fingerprint,
            "bos_id": self.special_ids["bos"],
            "eos_id": self.special_ids["eos"],
            "eot_id": self.special_ids["eot"],
            "special_ids": dict(self.special_ids),
            "stop_ids": list(self.stop_ids),
            "add_bos": self.add_bos,
        }
