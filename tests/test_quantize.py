import copy

import pytest
import torch
from conftest import perplexity

from llama2 import load, save_hf
from llama2.cli import main as cli
from llama2.generation import SamplingParams, generate
from llama2.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8, replace_linears

# The bounds leave room above the errors measured on the `trained` fixture (benchmarks/README.md)
BOUNDS = {"int8": (0.01, 0.01), "int4": (0.05, 0.02)}  # (relative logit error, perplexity)


def _decode_logits(model, ids):
    """Logits computed token by token through the KV cache (the fused one-row kernels)."""
    model.setup_cache(1, len(ids))
    try:
        with torch.no_grad():
            return torch.cat(
                [model(torch.tensor([[t]]), start_pos=i) for i, t in enumerate(ids)], 1
            )
    finally:
        model.clear_cache()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_and_perplexity(trained, mode):
    model, held_out = trained
    quant = replace_linears(copy.deepcopy(model), mode)
    assert not any(isinstance(m, torch.nn.Linear) for m in quant.modules())
    max_err, max_ppl = BOUNDS[mode]
    x = held_out[:64]
    with torch.no_grad():
        ref = model(torch.tensor([x]))
        full = quant(torch.tensor([x]))  # many rows: dequantized GEMM
    step = _decode_logits(quant, x)  # one row at a time: fused kernels
    for out in (full, step):
        assert (out - ref).norm() / ref.norm() < max_err
    ppl, ppl_q = perplexity(model, held_out), perplexity(quant, held_out)
    assert ppl < 60  # a trained model (a uniform guess is 512)
    assert abs(ppl_q / ppl - 1) < max_ppl


def test_quantizers_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s = quantize_int8(w)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    packed, scales, zeros = quantize_int4(w, 32)
    lin = Int4Linear(128, 64, 32)
    lin.weight, lin.scales, lin.zeros = packed, scales, zeros
    step = scales.repeat_interleave(32, dim=1)
    assert ((lin.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    x = torch.randn(3, 128)
    exact = x @ lin.dequantize().T
    assert (lin(x) - exact).norm() / exact.norm() < 0.01  # the kernel computes in bf16
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        Int4Linear(100, 8, 32)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_command_saves_what_load_reads(trained, small_tokenizer, tmp_path, mode):
    model, held_out = trained
    src = save_hf(tmp_path / "fp32", model.config, model.state_dict(), small_tokenizer)
    assert cli(["quantize", str(src), str(tmp_path / mode), "--mode", mode]) == 0
    llm = load(tmp_path / mode)
    assert llm.quantization["mode"] == mode
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(llm.model.layers[0].feed_forward.w1, kind)
    expected = replace_linears(copy.deepcopy(model), mode)
    x = torch.tensor([held_out[:32]])
    with torch.no_grad():
        assert torch.equal(llm.model(x), expected(x))
    on_disk = sum(f.stat().st_size for f in (tmp_path / mode).glob("*.safetensors"))
    fp32 = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert on_disk < fp32 * (0.45 if mode == "int8" else 0.35)  # embeddings stay fp32
    out = llm.generate("def load(", max_new_tokens=8, temperature=0)
    assert len(out.token_ids) == 8
    with pytest.raises(ValueError, match="quantized model cannot be written in Meta"):
        from llama2 import read_checkpoint, save_meta

        ckpt = read_checkpoint(tmp_path / mode)
        save_meta(tmp_path / "meta", ckpt.config, ckpt.state_dict)


@pytest.mark.parametrize("mode", ["int8", "int8-int8pack", "int4"])
def test_compiled_quantized_decoding_matches_eager(trained, small_tokenizer, mode, monkeypatch):
    """The compiled decode step (frozen quantized weights, attention over a dynamic number of
    cached positions) picks the eager tokens, for a batch of mixed lengths and for one row,
    with an int8 weight's single row in either form kernels.choose_compiled may pick."""
    from llama2 import kernels

    mode, _, form = mode.partition("-")
    if form:
        monkeypatch.setattr(kernels, "choose_compiled", lambda *a: form)
    model, held_out = trained
    quant = replace_linears(copy.deepcopy(model), mode)
    prompts = [[1] + held_out[:4], [1] + held_out[100:111]]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    eager = generate(quant, small_tokenizer, prompts, params)
    compiled = generate(quant, small_tokenizer, prompts, params, compile=True)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    alone = generate(quant, small_tokenizer, prompts[1:], params, compile=True)
    assert alone[0].token_ids == eager[1].token_ids
    if mode == "int8":  # (the fixture's weights are small: reductions, unmeasured)
        assert {m.compiled_rows1 for m in quant.modules() if isinstance(m, Int8Linear)} == {
            form or "reduction"
        }
