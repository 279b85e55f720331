"""The fast path by default: `choose_decode` measures the compiled decode step against the
eager one, and `llama2 generate|chat|serve` use whichever is faster unless told."""

import pytest
import torch

from llama2 import Transformer, get_preset, save_hf
from llama2.cli import main as cli
from llama2.generation import SamplingParams, generate
from llama2.llm import DecodeChoice, choose_decode


def test_choose_decode_measures_both_steps_and_keeps_the_compiled_graph(small_tokenizer):
    """The decision comes with its timings; a generation that then compiles for the measured
    shape reuses the graph (no second compile) and gives the eager tokens."""
    torch.manual_seed(0)
    cfg = get_preset("micro")
    model = Transformer(cfg).eval()
    choice = choose_decode(model, slots=1, length=64, steps=4, rounds=2)
    assert choice.compiled == (choice.compiled_ms < choice.eager_ms)
    assert choice.compiled_ms > 0 and choice.eager_ms > 0 and choice.compile_s > 0
    prompt = small_tokenizer.encode("hello there", bos=True)
    params = SamplingParams(max_new_tokens=64 - len(prompt), temperature=0)
    eager = generate(model, small_tokenizer, [prompt], params)
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = generate(model, small_tokenizer, [prompt], params, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before
    assert compiled[0].token_ids == eager[0].token_ids


@pytest.fixture
def saved(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    cfg = get_preset("micro")
    return save_hf(tmp_path / "m", cfg, Transformer(cfg).state_dict(), small_tokenizer)


def test_commands_measure_by_default_and_say_what_they_use(
    saved, small_tokenizer, capsys, monkeypatch
):
    shapes = []

    def measured(model, slots=1, length=None):
        shapes.append((slots, length))
        return DecodeChoice(False, 2.5, 1.25, 3.0)

    monkeypatch.setattr("llama2.llm.choose_decode", measured)
    args = ["generate", str(saved), "hi", "--max-new-tokens", "5", "--temperature", "0"]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "compiling the decode step ... (3 s)" in err
    assert "compiled step: 2.50 ms vs eager 1.25 ms: using eager" in err
    # the cache the generation sets up: the prompt and the new tokens
    assert shapes == [(1, len(small_tokenizer.encode("hi", bos=True)) + 5)]
    import llama2.serve.api

    served = []
    monkeypatch.setattr(llama2.serve.api, "serve", lambda *a, **kw: served.append(kw))
    assert cli(["serve", str(saved), "--max-batch", "3"]) == 0
    assert served[0]["compile"] is False and shapes[-1] == (3, get_preset("micro").max_seq_len)


def test_no_compile_and_compile_skip_the_measurement(saved, capsys, monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measured")

    monkeypatch.setattr("llama2.llm.choose_decode", measured)
    import llama2.serve.api

    served = []
    monkeypatch.setattr(llama2.serve.api, "serve", lambda *a, **kw: served.append(kw))
    args = ["generate", str(saved), "hi", "--max-new-tokens", "5", "--no-compile"]
    assert cli(args) == 0
    assert cli(["serve", str(saved), "--compile"]) == 0
    assert cli(["serve", str(saved), "--no-compile"]) == 0
    assert [kw["compile"] for kw in served] == [True, False]
    assert "compiling" not in capsys.readouterr().err
