"""Llama 2 -> Code Llama's vocabulary: `llama2 convert --add-infill-tokens` and
`llama2 tokenizer train --infill-pieces`, against the real Llama 2 vocabulary and Code Llama's
published ids."""

import json

import pytest
import sentencepiece as spm
import torch
from conftest import FIXTURES, LLAMA2_GGUF

from llama2 import ModelConfig, Tokenizer, Transformer, encode_infill, load, save_hf
from llama2.cli import main as cli
from llama2.tokenizer import CODE_LLAMA_PIECES, NORMAL, add_infill_pieces

# Meta's reference code (codellama/llama/generation.py) on its own example, as reported in
# llama.cpp issue #3503: the PSM prompt of Code Llama 7B, token by token.
PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """ '
SUFFIX = "\n    return result\n"
CODE_LLAMA_PSM = [1, 32007, 822, 3349, 29918, 5464, 29918, 294, 18869, 29898, 29879, 29901, 851]
CODE_LLAMA_PSM += [29897, 1599, 851, 29901, 13, 1678, 9995, 29871, 32008, 13, 1678, 736, 1121]
CODE_LLAMA_PSM += [13, 32009]


@pytest.fixture(scope="module")
def code_tok(llama2_tokenizer):
    return add_infill_pieces(llama2_tokenizer)


def test_code_llama_ids(llama2_tokenizer, code_tok):
    assert code_tok.vocab_size == 32016
    assert [code_tok.id_to_piece(i) for i in range(32000, 32016)] == list(CODE_LLAMA_PIECES)
    ids = {p: code_tok.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")}
    assert ids == {"▁<PRE>": 32007, "▁<SUF>": 32008, "▁<MID>": 32009, "▁<EOT>": 32010}
    assert encode_infill(code_tok, PREFIX, SUFFIX) == CODE_LLAMA_PSM
    # the old pieces are untouched, and so is the encoding of llama.cpp's test strings
    assert code_tok.pieces()[:32000] == llama2_tokenizer.pieces()
    assert all(kind == NORMAL for _, _, kind in code_tok.pieces()[32000:])
    texts = (FIXTURES / "ggml-vocab-llama-spm.gguf.inp").read_text()
    for text in texts.split("\n__ggml_vocab_test__\n")[:-1]:
        assert code_tok.encode(text) == llama2_tokenizer.encode(text), repr(text)
    # ordinary BPE pieces, as released: a marker typed in text is that piece
    assert code_tok.encode("x <PRE>") == [code_tok.piece_to_id("▁x"), 32007]
    with pytest.raises(ValueError, match="already has the infilling piece '▁<SU'"):
        add_infill_pieces(code_tok)


def test_model_file_is_read_by_sentencepiece_and_protobuf(code_tok, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    code_tok.save(tmp_path / "tokenizer.model")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    assert len(proto.pieces) == 32016 and proto.trainer_spec.vocab_size == 32016
    assert proto.pieces[32007].piece == "▁<PRE>" and proto.pieces[32007].type == NORMAL
    assert proto.normalizer_spec.add_dummy_prefix and proto.trainer_spec.byte_fallback
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    # Meta's encoding of the suffix: sp.encode("☺" + s)[2:]
    suffix = sp.encode("☺" + SUFFIX)[2:]
    assert [1, 32007, *sp.encode(PREFIX), 32008, *suffix, 32009] == CODE_LLAMA_PSM


@pytest.fixture(scope="module")
def llama2_shaped(llama2_tokenizer, tmp_path_factory):
    """A tiny random model on Llama 2's real 32000-piece vocabulary, as an HF directory."""
    cfg = ModelConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
        max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    path = tmp_path_factory.mktemp("llama2") / "hf"
    save_hf(path, cfg, model.state_dict(), llama2_tokenizer)
    return path, model


def test_convert_add_infill_tokens(llama2_shaped, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    src, model = llama2_shaped
    dst = tmp_path / "code"
    assert cli(["convert", str(src), str(dst), "--to", "hf", "--add-infill-tokens"]) == 0
    assert "vocabulary grown to 32016 (▁<PRE> = 32007)" in capsys.readouterr().err
    assert json.loads((dst / "config.json").read_text())["vocab_size"] == 32016

    ours = load(dst)
    emb, out = ours.model.tok_embeddings.weight, ours.model.output.weight
    assert emb.shape == out.shape == (32016, 32)
    assert torch.equal(emb[:32000], model.tok_embeddings.weight)
    assert torch.allclose(emb[32000:], model.tok_embeddings.weight.mean(0).expand(16, -1))
    assert torch.allclose(out[32000:], model.output.weight.mean(0).expand(16, -1))

    # transformers opens it; on inputs made of old tokens, the old tokens' logits are unchanged
    theirs = LlamaForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    ids = torch.tensor([ours.tokenizer.encode("def f(x):\n    return x + 1", bos=True)])
    with torch.no_grad():
        before, after, hf = model(ids), ours.model(ids), theirs(ids).logits
    assert after.shape[-1] == hf.shape[-1] == 32016
    assert torch.equal(after[..., :32000], before)
    assert (hf - after).abs().max() < 1e-4

    # its tokenizer, in sentencepiece and in transformers, lays out Code Llama's prompt
    sp = spm.SentencePieceProcessor(model_file=str(dst / "tokenizer.model"))
    assert sp.piece_to_id("▁<EOT>") == 32010
    assert encode_infill(ours.tokenizer, PREFIX, SUFFIX) == CODE_LLAMA_PSM
    hf_tok = AutoTokenizer.from_pretrained(dst)
    assert type(hf_tok).__name__.startswith("CodeLlamaTokenizer")
    markers = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    assert hf_tok.convert_tokens_to_ids(markers) == [32007, 32008, 32009, 32010]
    # transformers 5 converts tokenizer.model to a `tokenizers` BPE that splits runs of spaces
    # before a word differently from sentencepiece, on Llama 2's own vocabulary too ("\n    x"),
    # and gives a suffix starting with a newline a dummy space: prompts without those agree
    for prefix, suffix in [("x = [1, 2,", " 4]\n"), ("def add(a, b): return a", " + b")]:
        for spm_order in (False, True):
            want = encode_infill(ours.tokenizer, prefix, suffix, suffix_first=spm_order)
            assert hf_tok.encode(prefix, suffix=suffix, suffix_first=spm_order) == want
    assert hf_tok.encode("Hello world") == [1, 15043, 3186]


def test_convert_refuses_twice_and_mismatched_vocabulary(
    llama2_shaped, small_tokenizer, tmp_path, capsys
):
    src, _ = llama2_shaped
    cli(["convert", str(src), str(tmp_path / "code"), "--to", "hf", "--add-infill-tokens"])
    capsys.readouterr()
    rc = cli(["convert", str(tmp_path / "code"), str(tmp_path / "x"), "--to", "hf",
              "--add-infill-tokens"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 1 and len(err) == 1
    assert "already has the infilling piece '▁<SU'" in err[0] and str(tmp_path / "code") in err[0]
    assert not (tmp_path / "x").exists()

    # a tokenizer that is not the model's vocabulary (here 512 pieces for 32000 rows)
    _, model = llama2_shaped
    save_hf(tmp_path / "odd", model.config, model.state_dict(), small_tokenizer)
    rc = cli(["convert", str(tmp_path / "odd"), str(tmp_path / "y"), "--to", "hf",
              "--add-infill-tokens"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 1 and len(err) == 1
    assert "the tokenizer has 512 pieces but the model 32000 embeddings" in err[0]
    assert not (tmp_path / "y").exists()


def test_tokenizer_train_reserves_infill_pieces(tmp_path, capsys):
    out = tmp_path / "tokenizer.model"
    args = ["tokenizer", "train", str(FIXTURES / "corpus.txt"), "--vocab-size", "512"]
    assert cli([*args, "--out", str(out), "--infill-pieces"]) == 0
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 512
    assert [tok.id_to_piece(i) for i in range(496, 512)] == list(CODE_LLAMA_PIECES)
    pre, suf, mid = 496 + 7, 496 + 8, 496 + 9
    ids = encode_infill(tok, "def f(x):\n    ", "\n    return y\n")
    assert ids[:2] == [1, pre] and suf in ids and ids[-1] == mid
    # below the reserved ids it is the tokenizer trained without them, 16 pieces smaller
    plain = tmp_path / "plain.model"
    assert cli(["tokenizer", "train", str(FIXTURES / "corpus.txt"), "--vocab-size", "496",
                "--out", str(plain)]) == 0  # fmt: skip
    assert Tokenizer.from_file(plain).pieces() == tok.pieces()[:496]


def test_llama2_gguf_fixture_is_the_real_vocabulary():
    # (the extension above is checked against Llama 2's own 32000 pieces, not a stand-in)
    assert Tokenizer.from_file(LLAMA2_GGUF).encode("Hello world") == [15043, 3186]
