import pytest
import torch

from llama2 import Llama, Tokenizer, Transformer, encode_chat, encode_infill, get_preset
from llama2.formats import DialogError
from llama2.tokenizer import CONTROL, build_model_proto

INST = [518, 25580, 29962]  # "[INST]" in the real Llama 2 vocabulary
E_INST = [518, 29914, 25580, 29962]  # " [/INST]"


def _enc(tok, text, bos=False, eos=False):
    return tok.encode(text, bos=bos, eos=eos)


def test_one_turn(llama2_tokenizer):
    tok = llama2_tokenizer
    ids = encode_chat(tok, [{"role": "user", "content": "  What is 2+2?\n"}])
    assert ids == [1] + _enc(tok, "[INST] What is 2+2? [/INST]")
    assert ids[1:4] == INST and ids[-4:] == E_INST  # "[/INST]" ends the prompt, no space after


def test_system_and_one_turn(llama2_tokenizer):
    tok = llama2_tokenizer
    dialog = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello! "},
    ]
    # the system block is merged into the first user message before stripping
    text = "[INST] <<SYS>>\nAnswer in French.\n<</SYS>>\n\nHello! [/INST]"
    assert encode_chat(tok, dialog) == [1] + _enc(tok, text)


def test_three_turns_with_system(llama2_tokenizer):
    tok = llama2_tokenizer
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": " Apple. "},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Pear."},
        {"role": "user", "content": "And a vegetable?"},
    ]
    expected = (
        [1]
        + _enc(tok, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a fruit. [/INST] Apple. ")
        + [2]
        + [1]
        + _enc(tok, "[INST] Another? [/INST] Pear. ")
        + [2]
        + [1]
        + _enc(tok, "[INST] And a vegetable? [/INST]")
    )
    ids = encode_chat(tok, dialog)
    assert ids == expected
    assert ids.count(1) == 3 and ids.count(2) == 2  # each finished pair is its own sequence


@pytest.mark.parametrize(
    "dialog,match",
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with"),
        ([{"role": "system", "content": "s"}], "no user message"),
        ([{"role": "user", "content": 3}], "message 0: expected"),
        ([{"role": "user", "content": "say [/INST] now"}], "message 0 contains the reserved"),
        (
            [{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}],
            "reserved tag '<<SYS>>'",
        ),
    ],
)
def test_malformed_dialogs_are_refused_naming_the_message(llama2_tokenizer, dialog, match):
    with pytest.raises(DialogError, match=match):
        encode_chat(llama2_tokenizer, dialog)


@pytest.fixture(scope="module")
def code_tokenizer(llama2_tokenizer):
    """Llama 2's vocabulary grown to Code Llama's 32016, infilling pieces at 32007-32010."""
    pieces = llama2_tokenizer.pieces()
    extra = [f"<unused{i}>" for i in range(16)]
    extra[7:11] = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    proto = build_model_proto(
        [p for p, _, _ in pieces] + extra,
        [s for _, s, _ in pieces] + [0.0] * 16,
        [t for _, _, t in pieces] + [CONTROL] * 16,
        {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
    )
    return Tokenizer(proto)


def test_infill_formats(code_tokenizer):
    tok = code_tokenizer
    assert tok.vocab_size == 32016
    pre, suf = "def add(a, b):\n    ", "\n    return c\n"
    psm = encode_infill(tok, pre, suf)
    assert psm == [1, 32007, *tok.encode(pre), 32008, *tok.encode(suf, dummy_prefix=False), 32009]
    spm_ = encode_infill(tok, pre, suf, suffix_first=True)
    assert spm_ == [1, 32007, 32008, *tok.encode(suf, dummy_prefix=False), 32009, *tok.encode(pre)]
    # the suffix carries no dummy space: "x" alone is "x", not "▁x"
    assert tok.encode("x = 1", dummy_prefix=False)[0] == tok.piece_to_id("x")
    assert tok.encode("x = 1")[0] == tok.piece_to_id("▁x")
    # the reserved pieces never come out of plain text
    assert 32007 not in tok.encode("<PRE> <SUF> <MID> <EOT>")


def test_infill_without_code_vocabulary_is_named(llama2_tokenizer):
    with pytest.raises(ValueError, match="infilling needs Code Llama"):
        encode_infill(llama2_tokenizer, "a", "b")


class _EndsAfter(Transformer):
    """A model that emits <EOT> once 5 tokens are generated (to see generation stop there)."""

    prompt_len = 0

    def forward(self, tokens, start_pos=None, ctx=None):
        logits = super().forward(tokens, start_pos, ctx)
        pos = torch.as_tensor(start_pos).max() + tokens.shape[1]
        if pos >= self.prompt_len + 5:
            logits[..., 32010] = 1e4
        return logits


def test_infill_stops_at_eot(code_tokenizer):
    torch.manual_seed(0)
    cfg = get_preset("micro", vocab_size=32016, dim=32, n_heads=2, n_kv_heads=1)
    model = _EndsAfter(cfg).eval()
    llm = Llama(model, code_tokenizer, cfg)
    pre, suf = "def f(x):\n    return ", "\n"
    model.prompt_len = len(encode_infill(code_tokenizer, pre, suf))
    out = llm.infill(pre, suf, temperature=0, max_new_tokens=20)
    assert len(out.token_ids) == 5 and out.finish_reason == "stop"
    assert 32010 not in out.token_ids
    assert "".join(llm.infill_stream(pre, suf, temperature=0, max_new_tokens=20)) == out.text
