"""/v1/completions with `echo` and `logprobs`: the prompt tokens' log-probabilities, through the
official openai client, against transformers' LlamaForCausalLM on the same random micro model.
The server prefills in chunks of 16 tokens, and holds cached prefixes of the prompts scored."""

import pytest
import torch
from conftest import FIXTURES, hf_model
from test_serve import OpenAI_client, _own_server, _stop


@pytest.fixture(scope="module")
def served(small_tokenizer):
    """(llm, app, base url, transformers' model): a micro model whose weights are scaled up
    (peaked distributions: the top tokens are no near-ties)."""
    llm, app, srv, thread, base = _own_server(small_tokenizer, prefill_chunk=16)
    with torch.no_grad():
        for p in llm.model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    yield llm, app, base, hf_model(llm.config, llm.model.state_dict())
    _stop(srv, thread)


def piece(tok, i: int) -> str:
    return tok.id_to_piece(i).replace("\u2581", " ")


def check_prompt(tok, hf, ids: list[int], lp, k: int) -> None:
    """The prompt's entries of `lp` (the openai client's logprobs) against transformers':
    tokens, logprobs within 1e-4 (the first null), and k top tokens that are transformers' top
    k (each logprob within 1e-4, none below its k-th)."""
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    n = len(ids)
    assert lp.tokens[:n] == [piece(tok, i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = torch.tensor(lp.token_logprobs[1:n])
    assert (got - want[torch.arange(n - 1), torch.tensor(ids[1:])]).abs().max() < 1e-4
    for row, top in zip(want[:-1], lp.top_logprobs[1:n], strict=True):
        kth = row.topk(k).values[-1]
        assert len(top) == k
        for token, value in top.items():
            assert abs(value - row[tok.piece_to_id(token.replace(" ", "\u2581"))]) < 1e-4
            assert value >= kth - 1e-4


def test_prompt_logprobs_equal_transformers(served):
    """A text prompt of several chunks, with max_tokens 0 (the prompt alone) and with greedy
    tokens after it; its prefix cached by an earlier request is recomputed, not reused."""
    llm, app, base, hf = served
    c, tok = OpenAI_client(base), llm.tokenizer
    text = "\n".join((FIXTURES / "corpus.txt").read_text().splitlines()[3:7])
    ids = tok.encode(text, bos=True)
    assert 60 < len(ids) < 120
    c.completions.create(model="micro", prompt=text, max_tokens=1)  # (now cached)
    stats = app.state.engine.stats
    cached = stats.cached_prompt_tokens
    kw = dict(model="micro", prompt=text, echo=True, logprobs=3, temperature=0)
    alone = c.completions.create(**kw, max_tokens=0).choices[0]
    assert alone.text == text and alone.finish_reason == "length"
    assert len(alone.logprobs.tokens) == len(ids)
    check_prompt(tok, hf, ids, alone.logprobs, 3)
    # offsets into the text: where the text of each token's predecessors ends
    assert alone.logprobs.text_offset == [len(tok.decode(ids[:i])) for i in range(len(ids))]

    more = c.completions.create(**kw, max_tokens=4).choices[0]
    check_prompt(tok, hf, ids, more.logprobs, 3)
    lib = llm.generate(text, max_new_tokens=4, temperature=0)
    assert more.text == text + lib.text
    assert more.logprobs.tokens[len(ids) :] == [piece(tok, i) for i in lib.token_ids]
    with torch.no_grad():  # the generated tokens' entries: transformers' too
        every = ids + lib.token_ids
        want = hf(torch.tensor([every])).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
    got = torch.tensor(more.logprobs.token_logprobs[len(ids) :])
    assert (got - want[torch.arange(4), torch.tensor(lib.token_ids)]).abs().max() < 1e-4
    assert more.logprobs.text_offset[len(ids)] == len(text)
    assert stats.cached_prompt_tokens == cached  # (echo requests reuse no cached prefix)


def test_token_id_prompts_in_a_batch(served):
    """A list of token-id prompts (what lm_eval sends): one choice each, in order, each as
    if alone; ids are taken as they are (no BOS added: the first is the null one)."""
    llm, _, base, hf = served
    c, tok = OpenAI_client(base), llm.tokenizer
    prompts = [tok.encode("import torch\nimport os", bos=True), tok.encode("def load(path):")]
    got = c.completions.create(
        model="micro", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    assert [ch.index for ch in got.choices] == [0, 1]
    assert got.usage.prompt_tokens == sum(map(len, prompts))
    for ids, choice in zip(prompts, got.choices, strict=True):
        check_prompt(tok, hf, ids, choice.logprobs, 1)
        assert len(choice.logprobs.tokens) == len(ids) + 1
        assert choice.text.startswith(tok.decode(ids))
        # the generated (greedy) token: its logprob is the top one, as lm_eval's is_greedy reads
        last, top = choice.logprobs.token_logprobs[-1], choice.logprobs.top_logprobs[-1]
        assert last == max(top.values())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_stop_id_has_its_entry(served, temperature):
    """A request that ends on EOS reports it last (vLLM's layout: lm_eval's loglikelihood
    drops the last entry as the generated token), greedy or drawn; the text leaves it out."""
    llm, _, base, _ = served
    c, tok = OpenAI_client(base), llm.tokenizer

    def eos_first(_, args, out):  # EOS the most likely token everywhere
        out[..., tok.eos_id] += 50
        return out

    hook = llm.model.register_forward_hook(eos_first)
    kw = dict(model="micro", prompt="import os", echo=True, logprobs=1, max_tokens=5, seed=3)
    try:
        got = c.completions.create(**kw, temperature=temperature).choices[0]
    finally:
        hook.remove()
    ids = tok.encode("import os", bos=True)
    assert got.finish_reason == "stop" and got.text == "import os"
    assert got.logprobs.tokens == [piece(tok, i) for i in ids] + [piece(tok, tok.eos_id)]
    assert got.logprobs.token_logprobs[-1] > -1e-3
    assert list(got.logprobs.top_logprobs[-1]) == [piece(tok, tok.eos_id)]
