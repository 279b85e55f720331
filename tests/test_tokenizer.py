import pytest
import sentencepiece as spm
from conftest import FIXTURES, LLAMA2_GGUF

from llama2 import Tokenizer

SAMPLE = [
    "Hello world",
    " Hello world",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 23456))",
    "Ünïcödé: 日本語のテキスト, emoji 🦙🔥, Ελληνικά, русский",
    "   leading and trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\nand \u00a0nbsp",
    "<s> [INST] tags are just text [/INST] </s>",
    "1234567890 3.14159 0x1F",
    "",
    " ",
    "\n",
    "𝓯𝓪𝓷𝓬𝔂 𝔩𝔢𝔱𝔱𝔢𝔯𝔰 and \x00 control \x07 chars",
]


def test_llamacpp_vectors(llama2_tokenizer):
    inputs = (
        (FIXTURES / "ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    )
    outputs = (FIXTURES / "ggml-vocab-llama-spm.gguf.out").read_text().splitlines()
    cases = [
        (text, [int(i) for i in ids.split()])
        for text, ids in zip(inputs[:-1], outputs, strict=True)
    ]
    assert len(cases) == 46
    for text, expected in cases:
        assert llama2_tokenizer.encode(text) == expected, repr(text)


def test_llama2_special_ids(llama2_tokenizer):
    tok = llama2_tokenizer
    assert tok.encode("Hello world") == [15043, 3186]
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 0, 1, 2, -1)
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert tok.id_to_piece(3) == "<0x00>"  # byte fallback pieces
    assert [tok.id_to_piece(i) for i in tok.encode("2023")] == ["▁", "2", "0", "2", "3"]


def test_saved_model_file_is_llama2s(llama2_tokenizer, tmp_path):
    """The tokenizer.model rebuilt from GGUF is read by sentencepiece itself (and by protobuf)
    as Llama 2's: BPE, byte fallback, identity normalizer, dummy prefix, whitespace kept."""
    from sentencepiece import sentencepiece_model_pb2

    path = tmp_path / "tokenizer.model"
    llama2_tokenizer.save(path)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity"
    assert proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    assert len(proto.pieces) == 32000 and proto.pieces[15043].piece == "▁Hello"

    reference = spm.SentencePieceProcessor(model_file=str(path))
    reloaded = Tokenizer.from_file(path)
    for text in SAMPLE:
        assert reloaded.encode(text) == reference.encode(text) == llama2_tokenizer.encode(text)
        assert reloaded.decode(reloaded.encode(text)) == reference.decode(reference.encode(text))


def test_trained_tokenizer_round_trips(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == 512 and (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    unseen = [
        "class Ünïcode:\n\tdef __init__(self):  # 日本語 🦙\n\t\tself.x = {'k': [1, 2, 3]}\n",
        "  two leading spaces, trailing  \n\n",
        'zürich → αβγ ∑ ≠ ∞; printf("%d\\n", 42);',
    ]
    for text in unseen:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # digits are split one per piece, like Llama 2's
    assert all(len(tok.id_to_piece(i).strip("▁")) <= 1 for i in tok.encode("9876543210"))


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_file(bad)
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "missing.model")
    assert LLAMA2_GGUF.exists()
