import copy

import pytest
import torch

from llama2 import Llama, SamplingParams, Transformer, get_preset
from llama2.generation import TextStream, generate, stream
from llama2.sampling import sample


@pytest.fixture(scope="module")
def llm(small_tokenizer):
    torch.manual_seed(3)
    cfg = get_preset("micro")
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper distributions than init, so greedy is not a coin toss
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return Llama(model, small_tokenizer, cfg)


def test_batched_greedy_equals_alone_and_transformers(llm):
    from conftest import hf_model

    tok = llm.tokenizer
    texts = ["def", "import os\nimport sys\n", "class Tokenizer:\n    def encode(self, text", "x"]
    prompts = [tok.encode(t, bos=True) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    params = SamplingParams(max_new_tokens=24, temperature=0)
    batch = generate(llm.model, tok, prompts, params)
    theirs = hf_model(llm.config, llm.model.state_dict())
    for p, out in zip(prompts, batch, strict=True):
        alone = generate(llm.model, tok, [p], params)[0]
        assert out.token_ids == alone.token_ids and len(out.token_ids) == 24
        expected = theirs.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert out.token_ids == expected
        assert out.finish_reason == "length" and out.prompt_tokens == len(p)


def test_sampling_is_reproducible_and_per_row(llm):
    tok = llm.tokenizer
    prompts = [tok.encode("def f", bos=True), tok.encode("import", bos=True)]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = generate(llm.model, tok, prompts, params)
    b = generate(llm.model, tok, prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # row 1 of the batch used seed 7 + 1: the same prompt alone with seed 8 agrees
    alone = generate(llm.model, tok, prompts[1:], SamplingParams(**{**vars(params), "seed": 8}))
    assert alone[0].token_ids == a[1].token_ids
    other = generate(llm.model, tok, prompts, SamplingParams(**{**vars(params), "seed": 9}))
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = [torch.Generator().manual_seed(i) for i in range(200)]
    assert set(sample(logits, 1.0, top_k=2, generators=g).tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps 2 tokens
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample(logits, 1.0, top_p=0.8, generators=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.5, generators=g).tolist()) == {0}
    assert sample(logits[:1], 0.0).tolist() == [0]


def test_greedy_picks_what_torch_argmax_picks():
    """Greedy sampling on CPU fp32 logits (numpy's argmax, for speed) picks torch's token:
    the first of tied maxima, a NaN over any number, for strided rows as for whole ones."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, 300), generator=g).float()  # many ties
    logits[3, 17] = float("nan")
    logits[5] = float("-inf")
    logits[6, [2, 9]] = float("inf")
    for rows in (logits, logits[:, 1::3], logits[::2]):
        picked = sample(rows, 0.0)
        assert picked.dtype == torch.long and picked.tolist() == rows.argmax(-1).tolist()
    assert sample(logits.bfloat16(), 0.0).tolist() == logits.bfloat16().argmax(-1).tolist()


def test_a_draw_follows_the_distribution_and_refuses_nan():
    """One uniform number per row through the cumulative distribution: the frequencies of
    20,000 draws are the probabilities (within 5 standard errors), a zero-probability token is
    never drawn, the same seed draws the same, and NaN logits are an error, not a token."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log()[None].expand(20_000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(20_000)]
    drawn = sample(logits, 1.0, generators=gens)
    freq = torch.bincount(drawn, minlength=6).double() / 20_000
    stderr = (probs * (1 - probs) / 20_000).sqrt()
    assert ((freq - probs).abs() <= 5 * stderr + 1e-12).all(), freq
    assert freq[1] == 0 and freq[5] == 0
    again = sample(
        logits[:50], 1.0, generators=[torch.Generator().manual_seed(i) for i in range(50)]
    )
    assert again.tolist() == drawn[:50].tolist()
    with pytest.raises(ValueError, match="probability"):
        sample(torch.tensor([[0.0, float("nan")]]), 1.0, generators=[torch.Generator()])
    assert sample(torch.tensor([[0.0, 1.0]]), 1.0).item() in (0, 1)  # (no generators: global)


def test_stream_pieces_concatenate_to_text_with_multibyte(llm):
    tok = llm.tokenizer
    # force byte-level pieces: a model that emits the UTF-8 bytes of "日本🦙 ok" one by one
    target = tok.encode("日本🦙 ok")
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in target) >= 6
    s = TextStream(tok)
    pieces = [s.add(i) for i in target] + [s.finish()]
    assert "".join(pieces) == " 日本🦙 ok" == tok.decode([1, *target], continuation=True)
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 4  # bytes of one character wait for each other

    prompt = tok.encode("def main():\n", bos=True)
    params = SamplingParams(max_new_tokens=40, temperature=0.9, seed=1)
    done = generate(llm.model, tok, [prompt], params)[0]
    streamed = list(stream(llm.model, tok, prompt, params))
    assert "".join(streamed) == done.text == tok.decode(done.token_ids, continuation=True)
    assert llm.generate("def main():\n", **vars(params)).text == done.text
    assert "".join(llm.stream("def main():\n", **vars(params))) == done.text


def test_stop_strings_are_cut_and_held_back(llm):
    tok = llm.tokenizer
    s = TextStream(tok, stop=["STOP"])
    ids = tok.encode("abc ST") + tok.encode("OP more", dummy_prefix=False)
    pieces = []
    for i in ids:
        pieces.append(s.add(i))
        if s.stopped:
            break
    pieces.append(s.finish())
    assert s.stopped and "".join(pieces) == s.text == " abc "
    assert not any("ST" in p for p in pieces)  # "ST" was held back, never released

    prompt = tok.encode("import", bos=True)
    free = generate(llm.model, tok, [prompt], SamplingParams(max_new_tokens=30, temperature=0))[0]
    stop = free.text[5:8]
    cut = generate(llm.model, tok, [prompt], SamplingParams(30, 0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    assert len(cut.token_ids) < len(free.token_ids)
    assert "".join(stream(llm.model, tok, prompt, SamplingParams(30, 0, stop=[stop]))) == cut.text


def test_eos_stops_and_is_not_returned(llm):
    tok = llm.tokenizer
    prompt = tok.encode("def", bos=True)
    free = generate(llm.model, tok, [prompt], SamplingParams(max_new_tokens=10, temperature=0))[0]
    eos = free.token_ids[3]  # pretend the 4th generated token is the end of sequence
    out = generate(llm.model, tok, [prompt], SamplingParams(10, 0), stop_ids=(eos,))[0]
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"


def test_logprobs_and_echo_match_the_model(llm):
    tok = llm.tokenizer
    prompt = tok.encode("def main():", bos=True)
    params = SamplingParams(max_new_tokens=5, temperature=0, logprobs=3, echo=True)
    out = generate(llm.model, tok, [prompt], params)[0]
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        lp = llm.model(full)[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for t in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[t] - lp[t - 1, prompt[t]].item()) < 1e-4
    for k, info in enumerate(out.logprobs):
        row = lp[len(prompt) - 1 + k]
        assert info.token_id == out.token_ids[k] == int(row.argmax())
        assert abs(info.logprob - row[info.token_id].item()) < 1e-4
        assert [i for i, _ in info.top] == row.topk(3).indices.tolist()


def test_bad_requests_are_named(llm):
    tok = llm.tokenizer
    with pytest.raises(ValueError, match="leaving no room"):
        generate(llm.model, tok, [[1] * 128], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(llm.model, tok, [[]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("x", temperature=-1)
    # the context caps the budget
    out = generate(llm.model, tok, [[1] * 120], SamplingParams(max_new_tokens=50, temperature=0))
    assert len(out[0].token_ids) == 8 and out[0].finish_reason == "length"


def test_chat_answers_and_streams_alike(llm):
    dialog = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    params = dict(max_new_tokens=12, temperature=0.7, seed=3)
    one = llm.chat(dialog, **params)
    assert one.text == llm.tokenizer.decode(one.token_ids)  # an answer: no leading space
    assert "".join(llm.chat_stream(dialog, **params)) == one.text
    both = llm.chat([dialog, [{"role": "user", "content": "hi"}]], **params)
    assert both[0].token_ids == one.token_ids


def test_static_caches_of_two_shapes_are_kept_for_the_compiled_graphs(llm):
    """Compiled graphs guard on their cache tensors: a generation that needs a longer cache,
    then a shorter one, then the longer again gets the very tensors it had (no recompile at
    each switch); a third shape replaces the least recently used."""
    from llama2.generation import setup_static_cache

    model = copy.deepcopy(llm.model)

    def cache(length: int) -> torch.Tensor:
        setup_static_cache(model, 1, length)
        return model.kv_caches[0].k

    short, long = cache(32), cache(64)
    assert cache(32) is short and cache(64) is long and long.shape[2] == 64
    assert cache(128) is not short  # evicts the 32 (least recently used), keeps the 64
    assert cache(64) is long and cache(32) is not short


@pytest.mark.parametrize("form", ["reduction", "linear", "onednn", "template"])
def test_compiled_decoding_matches_eager(llm, form, monkeypatch):
    """torch.compile over the static cache gives the eager tokens (batched, mixed lengths),
    with products of one and two rows in either form kernels.choose_compiled may pick."""
    from torch._dynamo.utils import counters

    from llama2 import kernels

    monkeypatch.setattr(kernels, "choose_compiled", lambda *a: form)
    model, tok = copy.deepcopy(llm.model), llm.tokenizer  # (compiled_decode keeps its graph)
    prompts = [tok.encode("import os", bos=True), tok.encode("def f(x):\n    return", bos=True)]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    eager = generate(model, tok, prompts, params)
    templates = counters["inductor"]["cpp_templated_kernel_counter"]
    compiled = generate(model, tok, prompts, params, compile=True)
    # inductor's C++ GEMM template wrote the products in that form's graphs, and only there
    made = counters["inductor"]["cpp_templated_kernel_counter"] - templates
    assert made > 0 if form == "template" else made == 0
    linears = [m for m in model.modules() if isinstance(m, kernels.Linear)]
    assert {m.compiled_rows2 for m in linears} == {form}
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    again = generate(model, tok, prompts[:1], params, compile=True)  # B=1: a new graph
    assert again[0].token_ids == eager[0].token_ids
    assert {m.compiled_rows1 for m in linears} == {form}
    with torch.no_grad():  # the model is back to plain forward passes afterwards
        assert model(torch.tensor([prompts[0]])).shape[1] == len(prompts[0])


def test_a_graph_with_templates_has_no_other_library_products(llm, monkeypatch):
    """Inductor's template is a setting of the whole graph, under which the library's
    products on frozen weights are templates too: once one weight's product chooses the
    template, those that chose a library product choose again, between the two forms left."""
    from llama2 import kernels

    asked = []

    def choose(w, working_set, scales, rows, forms=None):
        asked.append((tuple(w.shape), forms))
        if forms is not None:
            return "reduction"
        return "template" if w.shape[0] == w.shape[1] else "onednn"

    monkeypatch.setattr(kernels, "choose_compiled", choose)
    model, tok = copy.deepcopy(llm.model), llm.tokenizer
    prompt = [tok.encode("import os", bos=True)]
    params = SamplingParams(max_new_tokens=4, temperature=0)
    eager = generate(model, tok, prompt, params)
    assert generate(model, tok, prompt, params, compile=True)[0].token_ids == eager[0].token_ids
    linears = [m for m in model.modules() if isinstance(m, kernels.Linear)]
    square = [m for m in linears if m.weight.shape[0] == m.weight.shape[1]]
    assert square and len(square) < len(linears)
    for m in linears:
        assert m.compiled_rows1 == ("template" if m in square else "reduction")
    again = [shape for shape, forms in asked if forms == ("reduction", "template")]
    assert sorted(again) == sorted(tuple(m.weight.shape) for m in linears if m not in square)


def test_batched_steps_name_their_rows_after_some_finish(llm):
    """generate_steps keys each step's outputs by prompt index, so a batched consumer can tell
    rows apart after earlier ones have stopped: each row's pieces add up to its own text."""
    from llama2.generation import generate_steps

    tok = llm.tokenizer
    prompts = [tok.encode(t, bos=True) for t in ("def", "import os", "class A:")]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    free = generate(llm.model, tok, prompts, params)
    ids = free[1].token_ids
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])  # row 1 stops there
    stop_id = ids[k]
    results: list = []
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    seen_after_stop = set()
    for outputs in generate_steps(llm.model, tok, prompts, params, (stop_id,), True, results):
        if 1 not in outputs:
            seen_after_stop |= outputs.keys()
        for i, out in outputs.items():
            pieces[i].append(out.text)
    assert seen_after_stop  # some steps ran without row 1
    assert results[1].finish_reason == "stop" and results[1].token_ids == ids[:k]
    for i, out in enumerate(results):
        assert "".join(pieces[i]) == out.text
