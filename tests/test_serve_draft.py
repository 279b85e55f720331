"""`llama2 serve --draft`: speculative decoding in the engine, through the openai client."""

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import FIXTURES
from test_serve import _start, _stop

from llama2 import Llama, Transformer, get_preset, save_hf
from llama2.serve.engine import Engine

KEY = "sk-test"


def peaky(cfg, seed: int) -> Transformer:
    """A random model whose distributions have a few likely tokens (random weights at their
    initial scale give nearly flat ones)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return model


@pytest.fixture(scope="module")
def servers(small_tokenizer):
    """The same target served alone, with a smaller draft (one layer of its own) and with
    a copy of itself as its draft."""
    from llama2.serve.api import create_app

    cfg = get_preset("micro")
    target = peaky(cfg, 0)
    small = peaky(dataclasses.replace(cfg, n_layers=1), 1)
    started = {}
    for name, draft in [("alone", None), ("small", small), ("itself", target)]:
        llm = Llama(copy.deepcopy(target), small_tokenizer, cfg)
        opts = {} if draft is None else {"draft": draft, "draft_tokens": 3}
        app = create_app(llm, "micro", api_key=KEY, max_batch=4, max_queue=32, **opts)
        started[name] = _start(app)
    yield {name: base for name, (_, _, base) in started.items()}
    for srv, thread, _ in started.values():
        _stop(srv, thread)


def client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)


PROMPTS = ["def main", "import os\n", "class Foo:", "for i in range(", "x = ", "return"]


def answers(base: str, temperature: float = 0.0, seed: int | None = None) -> list:
    """Six concurrent requests: chat and text completions, streamed and not, one with
    logprobs: (text, finish reason, logprobs) each."""
    c = client(base)

    def one(i: int):
        kw = dict(model="micro", max_tokens=20, temperature=temperature, seed=seed)
        if i % 2:
            msgs = [{"role": "user", "content": PROMPTS[i]}]
            if i == 3:
                chunks = c.chat.completions.create(messages=msgs, stream=True, **kw)
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                return text, None, None
            lp = dict(logprobs=True, top_logprobs=2) if i == 1 else {}
            r = c.chat.completions.create(messages=msgs, **lp, **kw)
            lps = r.choices[0].logprobs
            lps = lps and [(e.token, round(e.logprob, 4)) for e in lps.content]
            return r.choices[0].message.content, r.choices[0].finish_reason, lps
        if i == 4:
            chunks = c.completions.create(prompt=PROMPTS[i], stream=True, **kw)
            return "".join(ch.choices[0].text for ch in chunks), None, None
        r = c.completions.create(prompt=PROMPTS[i], **kw)
        return r.choices[0].text, r.choices[0].finish_reason, None

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, range(len(PROMPTS))))


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("llama2_draft")
    }


def test_greedy_answers_with_a_draft_are_the_answers_without(servers):
    """Concurrent greedy requests (streamed and not, with logprobs): the same text token for
    token whether a small draft, the model itself or no draft proposes; the metrics count the
    proposals and what was accepted (all of them when the model drafts for itself)."""
    alone = answers(servers["alone"])
    assert all(len(text) > 5 for text, _, _ in alone)
    assert answers(servers["small"]) == alone
    assert answers(servers["itself"]) == alone
    assert "llama2_draft_acceptance_rate" not in metrics(servers["alone"])
    small, itself = metrics(servers["small"]), metrics(servers["itself"])
    assert small["llama2_draft_proposed_tokens_total"] > 0
    assert 0 <= small["llama2_draft_acceptance_rate"] < 1
    assert itself["llama2_draft_acceptance_rate"] == 1.0
    assert itself["llama2_draft_accepted_tokens_total"] > 40


def test_sampled_answers_with_a_draft_are_seeded_and_complete(servers):
    """Sampling through the draft: a seed gives the same answers again, every answer runs to
    its stop or its budget, and a request echoing its prompt's logprobs (no proposals) is the
    one without a draft."""
    first = answers(servers["small"], temperature=0.9, seed=3)
    assert answers(servers["small"], temperature=0.9, seed=3) == first
    assert all(reason in ("stop", "length", None) for _, reason, _ in first)
    kw = dict(model="micro", prompt="import os\n", max_tokens=8, temperature=0.8, seed=2)
    kw |= dict(echo=True, logprobs=2)
    echoed = [client(servers[n]).completions.create(**kw) for n in ("alone", "small")]
    assert echoed[0].choices[0].text == echoed[1].choices[0].text
    assert echoed[0].choices[0].logprobs.tokens == echoed[1].choices[0].logprobs.tokens


def test_a_draft_must_share_the_tokenizer_and_cover_the_context(small_tokenizer, tmp_path, capsys):
    from llama2 import train_tokenizer
    from llama2.cli import main as cli

    cfg = get_preset("micro")
    target = save_hf(tmp_path / "t", cfg, peaky(cfg, 0).state_dict(), small_tokenizer)
    other_tok = train_tokenizer([FIXTURES / "corpus.txt"], 400, tmp_path / "other.model")
    other = dataclasses.replace(cfg, vocab_size=400)
    draft = save_hf(tmp_path / "d", other, peaky(other, 1).state_dict(), other_tok)
    assert cli(["serve", str(target), "--draft", str(draft), "--no-compile"]) == 1
    assert "the draft's tokenizer has 400 pieces, the target's 512" in capsys.readouterr().err
    short = peaky(dataclasses.replace(cfg, max_seq_len=64), 1)
    with pytest.raises(ValueError, match=r"the draft's context \(64 tokens\) is shorter"):
        Engine(peaky(cfg, 0), small_tokenizer, max_batch=2, draft=short)


def test_sampled_tokens_through_the_engine_have_the_target_distribution(small_tokenizer):
    """Many seeded requests through an engine whose unrelated draft is mostly rejected: the
    first three tokens (the first from the prefill, the second a verified proposal or the
    residual's draw, the third a bonus or a correction) follow the target's distribution
    within the total-variation bound of the library's test."""
    from test_serve_engine import request, run_all
    from test_speculative import NEW, PARAMS, exact_distribution, sharp_model

    from llama2.sampling import SamplingParams

    vocab, prompt, n = 16, [1, 3], 1500
    model = sharp_model(21, vocab_size=vocab, max_seq_len=64)
    with torch.no_grad():
        model.output.weight.mul_(0.5)
    draft = sharp_model(22, vocab_size=vocab, max_seq_len=64)
    with torch.inference_mode():
        exact = exact_distribution(model, prompt)
    eng = Engine(model, small_tokenizer, max_batch=8, max_queue=n, draft=draft, draft_tokens=3)
    reqs = [request(prompt, seed=i, max_tokens=NEW) for i in range(n)]
    for r in reqs:
        r.params = SamplingParams(max_new_tokens=NEW, seed=r.params.seed, **PARAMS)
    counts: dict[tuple, int] = {}
    for c in run_all(eng, reqs, timeout=120):
        counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
    assert eng.stats.draft_proposed_tokens == n  # one proposal each: a budget of 3
    assert 0 < eng.stats.draft_accepted_tokens < n
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in set(counts) | set(exact))
    mean_bound = 0.5 * sum((p * (1 - p) / n) ** 0.5 for p in exact.values())
    assert tv < mean_bound + 4 * (0.5 / n) ** 0.5, (tv, mean_bound)
