"""Llama 2's SentencePiece BPE tokenizer.

Loads a SentencePiece `tokenizer.model` or the vocabulary inside a GGUF file (llama.cpp's
`llama` tokenizer kind: pieces, scores, token types), and trains new ones with Llama 2's
settings. Encoding itself is SentencePiece's: a GGUF vocabulary is rebuilt into the
SentencePiece model file it came from, so both paths run the identical algorithm.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import tempfile
from pathlib import Path

import sentencepiece as spm

from .gguf_format import GGUFError, read_gguf
from .io import write_atomic

# SentencePiece piece types; llama.cpp's token_type numbering is the same.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Llama 2's trainer settings, as recorded in its tokenizer.model (byte fallback, split digits,
# identity normalizer, dummy prefix, whitespace kept as is).
LLAMA2_TRAINER = dict(
    model_type="bpe",
    character_coverage=0.99995,
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


# Code Llama's vocabulary is Llama 2's 32000 pieces plus these 16, in this order (ids
# 32000-32015 of the released tokenizer): BPE merges that spell the infilling markers, so that
# `▁<PRE>`=32007, `▁<SUF>`=32008, `▁<MID>`=32009, `▁<EOT>`=32010.
CODE_LLAMA_PIECES = (
    "▁<SU",
    "▁<SUF",
    "▁<PRE",
    "▁<M",
    "▁<MID",
    "▁<E",
    "▁<EOT",
    "▁<PRE>",
    "▁<SUF>",
    "▁<MID>",
    "▁<EOT>",
    *("▁" + "<EOT>" * n for n in range(2, 7)),
)


class Tokenizer:
    """encode/decode with Llama 2's conventions: BOS 1 and EOS 2 added only on request."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self.source = source
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a valid SentencePiece model: {e}") from e
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ValueError(f"cannot read tokenizer {path}: {e.strerror}") from e
        if magic == b"GGUF":
            return cls.from_gguf(path)
        return cls(path.read_bytes(), source=str(path))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        meta, _ = read_gguf(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "llama":
            raise GGUFError(
                f"{path}: tokenizer.ggml.model is {kind!r}; only 'llama' (SentencePiece) is read"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            if key not in meta:
                raise GGUFError(f"{path}: missing {key}")
        tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
        types = meta["tokenizer.ggml.token_type"]
        if not len(tokens) == len(scores) == len(types):
            raise GGUFError(f"{path}: tokens, scores and token_type differ in length")
        special = {
            "unk": meta.get("tokenizer.ggml.unknown_token_id", 0),
            "bos": meta.get("tokenizer.ggml.bos_token_id", 1),
            "eos": meta.get("tokenizer.ggml.eos_token_id", 2),
        }
        for name, i in special.items():
            if not 0 <= i < len(tokens):
                raise GGUFError(
                    f"{path}: {name} token id {i} is outside the {len(tokens)}-piece vocabulary"
                )
        proto = build_model_proto(tokens, scores, types, {k: tokens[i] for k, i in special.items()})
        return cls(proto, source=str(path))

    def save(self, path: str | Path) -> None:
        write_atomic(path, self.model_proto)

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, dummy_prefix: bool = True
    ) -> list[int]:
        """Token ids of `text`. `dummy_prefix=False` skips SentencePiece's implicit leading
        space, for text that continues other text (Code Llama's infilling suffix)."""
        sp = self.sp if dummy_prefix else self._sp_no_prefix
        ids = sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, continuation: bool = False) -> str:
        """Text of `ids`. SentencePiece drops the space that starts the text (the dummy prefix);
        `continuation=True` keeps it, for ids that follow other text (generated tokens)."""
        ids = [int(i) for i in ids]
        text = self.sp.decode(ids)
        if continuation:
            first = next((i for i in ids if not self.sp.is_control(i)), None)
            if first is not None and self.sp.id_to_piece(first).startswith("\u2581"):
                text = " " + text
        return text

    @functools.cached_property
    def _sp_no_prefix(self) -> spm.SentencePieceProcessor:
        # A later occurrence of an embedded message merges into the earlier one (protobuf):
        # this overrides normalizer_spec.add_dummy_prefix alone.
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(self.model_proto + _field(3, _field(3, False)))
        return sp

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def pieces(self) -> list[tuple[str, float, int]]:
        """(piece, score, type) for every id, read from the model file itself."""
        return parse_pieces(self.model_proto)

    def sha256(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def train_tokenizer(
    files: list[str | Path],
    vocab_size: int,
    out: str | Path,
    max_sentences: int = 2_000_000,
    infill_pieces: bool = False,
) -> Tokenizer:
    """Train a BPE tokenizer with Llama 2's settings on text files; write it to `out`.
    `infill_pieces` reserves the last 16 ids for Code Llama's pieces (as `add_infill_pieces`
    lays them out), so the vocabulary is still `vocab_size` pieces."""
    files = [str(f) for f in files]
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"training text {f} does not exist")
    out = Path(out)
    if infill_pieces:
        vocab_size -= len(CODE_LLAMA_PIECES)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spm.SentencePieceTrainer.train(
                input=files,
                model_prefix=os.path.join(tmp, "tok"),
                vocab_size=vocab_size,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=1 << 16,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                **LLAMA2_TRAINER,
            )
        except RuntimeError as e:
            raise ValueError(f"tokenizer training failed: {e}") from e
        tok = Tokenizer(Path(tmp, "tok.model").read_bytes(), source=str(out))
    if infill_pieces:
        tok = add_infill_pieces(tok)
        tok.source = str(out)
    tok.save(out)
    return tok


def add_infill_pieces(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with Code Llama's 16 pieces appended (ids vocab_size ... vocab_size+15; on
    Llama 2's vocabulary exactly Code Llama's ids). They are ordinary BPE pieces, as in the
    released tokenizer, scored below every existing merge so that no other text encodes
    differently; everything else in the model file (trainer and normalizer specs) is kept."""
    have = [p for p in CODE_LLAMA_PIECES if tokenizer.piece_to_id(p) != tokenizer.unk_id]
    if have:
        raise ValueError(f"{tokenizer.source}: already has the infilling piece {have[0]!r}")
    lowest = min(score for _, score, kind in tokenizer.pieces() if kind == NORMAL)
    new = b"".join(
        _field(1, _field(1, piece) + _field(2, float(lowest - 1 - i)) + _field(3, NORMAL))
        for i, piece in enumerate(CODE_LLAMA_PIECES)
    )
    proto = tokenizer.model_proto
    end = _end_of_pieces(proto)
    size = tokenizer.vocab_size + len(CODE_LLAMA_PIECES)
    # a later trainer_spec merges into the first (protobuf): it overrides vocab_size alone
    proto = proto[:end] + new + proto[end:] + _field(2, _field(4, size))
    return Tokenizer(proto, source=tokenizer.source)


# --- the SentencePiece model file (a protobuf ModelProto), by hand --------------------------
# Field numbers from sentencepiece_model.proto: ModelProto{pieces=1, trainer_spec=2,
# normalizer_spec=3}; SentencePiece{piece=1, score=2, type=3}.


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, bool | int):
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def build_model_proto(pieces, scores, types, special: dict[str, str]) -> bytes:
    """A SentencePiece BPE model with Llama 2's trainer and normalizer settings."""
    body = bytearray()
    for piece, score, ptype in zip(pieces, scores, types, strict=True):
        body += _field(1, _field(1, piece) + _field(2, float(score)) + _field(3, int(ptype)))
    trainer = [
        (3, 2),
        (4, len(pieces)),
        (25, True),
        (35, True),
        (26, True),  # BPE, size, digits, bytes
        (40, pieces.index(special["unk"])),
        (41, pieces.index(special["bos"])),
        (42, pieces.index(special["eos"])),
        (43, -1),
        (45, special["unk"]),
        (46, special["bos"]),
        (47, special["eos"]),
    ]
    body += _field(2, b"".join(_field(n, v) for n, v in trainer))
    normalizer = [(1, "identity"), (3, True), (4, False), (5, True)]
    body += _field(3, b"".join(_field(n, v) for n, v in normalizer))
    return bytes(body)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _messages(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _end_of_pieces(buf: bytes) -> int:
    """Offset just past the last piece (field 1) of a serialized ModelProto."""
    end = pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        if key & 7 != 2:  # ModelProto's top-level fields are all messages
            raise ValueError(f"unexpected wire type {key & 7} in a SentencePiece model")
        n, pos = _read_varint(buf, pos)
        pos += n
        if key >> 3 == 1:
            end = pos
    return end


def parse_pieces(model_proto: bytes) -> list[tuple[str, float, int]]:
    out = []
    for number, _, value in _messages(model_proto):
        if number != 1:
            continue
        piece, score, ptype = "", 0.0, NORMAL
        for n, _, v in _messages(value):
            if n == 1:
                piece = v.decode("utf-8")
            elif n == 2:
                (score,) = struct.unpack("<f", v)
            elif n == 3:
                ptype = v
        out.append((piece, score, ptype))
    return out
