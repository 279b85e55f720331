import copy
import itertools

import pytest
import torch

from llama2 import Llama, SamplingParams, Transformer, get_preset
from llama2.generation import generate, generate_steps
from llama2.sampling import probabilities
from llama2.speculative import check_draft

TEXTS = ["def", "import os\nimport sys\n", "class Tokenizer:\n    def encode(self, text", "x"]


def sharp_model(seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset("micro", **overrides)).eval()
    with torch.no_grad():  # sharper distributions than init, so greedy is not a coin toss
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return model


def perturbed(model: Transformer, scale: float, seed: int) -> Transformer:
    """A copy of the model with noise on its weights: a draft that often agrees."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * scale)
    return other


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models run thousands of tiny steps here: a second thread only adds hand-offs
    (and on a busy machine, waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(small_tokenizer):
    return Llama(sharp_model(3), small_tokenizer, get_preset("micro"))


@pytest.mark.parametrize("which", ["itself", "random", "near"])
def test_greedy_with_a_draft_is_greedy_without(target, which):
    tok, model = target.tokenizer, target.model
    draft = {"itself": model, "random": sharp_model(5), "near": perturbed(model, 0.03, 1)}[which]
    prompts = [tok.encode(t, bos=True) for t in TEXTS]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    alone = generate(model, tok, prompts, params)
    for k in (1, 5):
        spec = generate(model, tok, prompts, params, draft=draft, draft_tokens=k)
        for a, s in zip(alone, spec, strict=True):
            assert s.token_ids == a.token_ids and len(s.token_ids) == 40
            assert s.text == a.text and s.finish_reason == "length"
            if which == "itself":
                assert s.draft_acceptance == 1.0  # every proposal is the target's own pick
    rates = [c.draft_acceptance for c in spec]
    if which == "near":  # a draft close to the target is mostly right
        assert sum(rates) / len(rates) > 0.3, rates


def test_llm_generate_and_stream_with_a_draft(target, small_tokenizer):
    draft = Llama(perturbed(target.model, 0.03, 2), small_tokenizer, get_preset("micro"))
    kw = dict(max_new_tokens=30, temperature=0)
    alone = target.generate(TEXTS, **kw)
    spec = target.generate(TEXTS, draft=draft, draft_tokens=3, **kw)
    assert [c.token_ids for c in spec] == [c.token_ids for c in alone]
    assert all(0 <= c.draft_acceptance <= 1 for c in spec)
    assert alone[0].draft_acceptance is None
    assert "".join(target.stream(TEXTS[1], draft=draft, **kw)) == alone[1].text
    # sampled, seeded: reproducible
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=4, logprobs=2)
    a, b = (target.generate(TEXTS[:2], draft=draft, **kw) for _ in range(2))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for c in a:  # the target's logprobs of the tokens taken
        assert [lp.token_id for lp in c.logprobs] == c.token_ids and len(c.logprobs[0].top) == 2


def test_stop_strings_stop_ids_and_budget_as_without_a_draft(target):
    tok, model = target.tokenizer, target.model
    draft = perturbed(model, 0.03, 3)
    prompts = [tok.encode(t, bos=True) for t in TEXTS]
    free = generate(model, tok, prompts, SamplingParams(max_new_tokens=40, temperature=0))
    # a stop string: a piece of each row's free text, from its middle
    for p, full in zip(prompts, free, strict=True):
        stop = full.text[len(full.text) // 2 :][:2]
        if not stop.strip():
            continue
        params = SamplingParams(max_new_tokens=40, temperature=0, stop=(stop,))
        a = generate(model, tok, [p], params)[0]
        s = generate(model, tok, [p], params, draft=draft)[0]
        assert (s.text, s.token_ids, s.finish_reason) == (a.text, a.token_ids, "stop")
        assert stop not in s.text
    # a stop id: the row's 6th token (which may come earlier too)
    for p, full in zip(prompts, free, strict=True):
        stop_id = full.token_ids[5]
        params = SamplingParams(max_new_tokens=40, temperature=0)
        s = generate(model, tok, [p], params, draft=draft, stop_ids=[stop_id])[0]
        first = full.token_ids.index(stop_id)
        assert s.finish_reason == "stop" and s.token_ids == full.token_ids[:first]
    # the budget, also near the end of the context (128)
    for n in (1, 2, 3, 5):
        s = generate(model, tok, prompts, SamplingParams(n, temperature=0), draft=draft)
        assert [c.token_ids for c in s] == [c.token_ids[:n] for c in free]
    long = [1] + [7] * 120
    s = generate(model, tok, [long], SamplingParams(40, temperature=0), draft=draft)[0]
    a = generate(model, tok, [long], SamplingParams(40, temperature=0))[0]
    assert s.token_ids == a.token_ids and len(s.token_ids) == 128 - 121


def test_streamed_steps_concatenate_to_the_completion(target):
    tok = target.tokenizer
    prompts = [tok.encode(t, bos=True) for t in TEXTS[:2]]
    results: list = []
    params = SamplingParams(max_new_tokens=25, temperature=0.8, seed=1)
    draft = perturbed(target.model, 0.03, 4)
    pieces = {0: "", 1: ""}
    steps = generate_steps(target.model, tok, prompts, params, results=results, draft=draft)
    for outputs in steps:
        for i, out in outputs.items():
            pieces[i] += out.text
    assert [pieces[0], pieces[1]] == [c.text for c in results]


def test_a_draft_with_another_tokenizer_is_refused(target, small_tokenizer, llama2_tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        check_draft(small_tokenizer, llama2_tokenizer)
    check_draft(small_tokenizer, small_tokenizer)
    other = Llama(target.model, llama2_tokenizer, target.config)
    with pytest.raises(ValueError, match="the draft's tokenizer has 32000 pieces"):
        target.generate("def", draft=other, max_new_tokens=2)


# --- the sampled tokens have the target's distribution -------------------------------------

VOCAB, NEW, SAMPLES = 16, 3, 3000
PARAMS = dict(temperature=0.9, top_k=5, top_p=0.95)


def exact_distribution(model: Transformer, prompt: list[int]) -> dict[tuple, float]:
    """P(first NEW tokens) under the processed distribution (temperature, top-k, top-p), from
    plain forwards over every prefix in the support."""
    out = {(): 1.0}
    for _ in range(NEW):
        nxt = {}
        for seq, pr in out.items():
            logits = model(torch.tensor([prompt + list(seq)]))[:, -1]
            probs = probabilities(logits, **PARAMS)[0].double()
            probs /= probs.sum()
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[(*seq, t)] = pr * float(probs[t])
        out = nxt
    return out


def chi_square(counts: dict[tuple, int], expected: dict[tuple, float], n: int) -> tuple:
    """Pearson's statistic over cells of expectation >= 5 (the rest pooled in one cell), its
    degrees of freedom, and the count of samples outside the support."""
    outside = sum(c for k, c in counts.items() if k not in expected)
    big = [k for k, p in expected.items() if p * n >= 5]
    cells = [(counts.get(k, 0), expected[k] * n) for k in big]
    rest = n - sum(c for c, _ in cells) - outside, n - sum(e for _, e in cells)
    if rest[1] >= 5:
        cells.append(rest)
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1, outside


@torch.inference_mode()
def test_sampled_tokens_have_the_targets_distribution(small_tokenizer):
    from scipy.stats import chi2

    tok = small_tokenizer
    model = sharp_model(11, vocab_size=VOCAB)
    with torch.no_grad():  # soften: several tokens in play at each step
        model.output.weight.mul_(0.5)
    draft = perturbed(model, 0.3, 12)
    prompt = [1, 5, 9]
    expected = exact_distribution(model, prompt)
    assert len(expected) >= 20  # a distribution, not a near-certain path

    params = SamplingParams(max_new_tokens=NEW, seed=0, **PARAMS)
    prompts = [prompt] * SAMPLES  # seeds 0..SAMPLES-1, one a row
    runs = {
        "target": generate(model, tok, prompts, params),
        "speculative": generate(model, tok, prompts, params, draft=draft, draft_tokens=2),
        "draft": generate(draft, tok, prompts, params),  # what a wrong rule would give
    }
    # a p-value of 1e-4 for the draft's samples to pass by chance, or the right ones to fail
    stats = {}
    for name, out in runs.items():
        counts: dict[tuple, int] = {}
        for c in out:
            counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
        stat, dof, outside = chi_square(counts, expected, SAMPLES)
        stats[name] = (stat, chi2.ppf(1 - 1e-4, dof), outside)
    for name in ("target", "speculative"):
        stat, limit, outside = stats[name]
        assert outside == 0 and stat < limit, (name, stats)
    stat, limit, outside = stats["draft"]
    assert outside > 0 or stat > limit, stats  # the test tells a different distribution apart
    rates = [c.draft_acceptance for c in runs["speculative"]]
    mean = sum(rates) / len(rates)
    assert 0.2 < mean < 1.0, mean  # proposals both accepted and rejected: both rules ran
    print(f"acceptance rate {mean:.2f}; chi-square {stats}")


def test_first_two_tokens_from_many_rows_match_in_total_variation(small_tokenizer):
    """A second view of the same property with a bound from the sample size alone: the total
    variation between the empirical and exact distributions of the first two tokens is at most
    E[TV] + 4 standard deviations (McDiarmid: TV moves by at most 1/n a sample)."""
    tok = small_tokenizer
    model = sharp_model(21, vocab_size=VOCAB)
    with torch.no_grad():
        model.output.weight.mul_(0.5)
    draft = sharp_model(22, vocab_size=VOCAB)  # an unrelated draft: mostly rejected
    prompt, n = [1, 3], 2000
    with torch.inference_mode():
        exact = {}
        for seq, p in exact_distribution(model, prompt).items():
            exact[seq[:2]] = exact.get(seq[:2], 0.0) + p
    params = SamplingParams(max_new_tokens=2, seed=100, **PARAMS)
    out = generate(model, tok, [prompt] * n, params, draft=draft, draft_tokens=3)
    counts: dict[tuple, int] = {}
    for c in out:
        counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in set(counts) | set(exact))
    mean_bound = 0.5 * sum((p * (1 - p) / n) ** 0.5 for p in exact.values())
    assert tv < mean_bound + 4 * (0.5 / n) ** 0.5, (tv, mean_bound)


def test_verification_rule_on_fixed_distributions():
    """The acceptance rule alone, on given p and q: the kept token's frequency is p."""
    from llama2.speculative import verify

    torch.manual_seed(0)
    p_logits = torch.randn(2, 6)
    q = torch.softmax(torch.randn(1, 6).double(), -1)
    params = SamplingParams(temperature=1.0)
    p = torch.softmax(p_logits[0].double(), -1)
    g = torch.Generator().manual_seed(0)
    n, first = 20000, torch.zeros(6)
    for t in itertools.islice(itertools.cycle(range(6)), n):
        # proposals drawn from q: weight each proposal t by q[t] via rejection of the cycle
        if torch.rand(1, generator=g).item() >= q[0, t] / q.max():
            continue
        first[verify([t], q, p_logits, params, g)[0]] += 1
    freq = first / first.sum()
    sd = (p * (1 - p) / first.sum()).sqrt()
    assert ((freq - p.float()).abs() < 5 * sd.float() + 1e-9).all(), (freq, p)


def test_generate_command_with_a_draft(target, tmp_path, capsys):
    from llama2 import save_hf
    from llama2.cli import main as cli

    tok, model = target.tokenizer, target.model
    t = save_hf(tmp_path / "target", target.config, model.state_dict(), tok)
    draft = perturbed(model, 0.03, 5)
    d = save_hf(tmp_path / "draft", target.config, draft.state_dict(), tok)
    args = ["generate", str(t), "def", "--max-new-tokens", "20", "--temperature", "0"]
    args += ["--no-compile"]
    assert cli([*args, "--draft", str(d), "--draft-tokens", "3"]) == 0
    printed = capsys.readouterr()
    prompt = tok.encode("def", bos=True)
    ids = generate(model, tok, [prompt], SamplingParams(20, temperature=0), (tok.eos_id,))
    assert printed.out.rstrip("\n") == tok.decode(prompt + ids[0].token_ids)
    assert "of the draft's tokens accepted" in printed.err


def test_compiled_draft_steps_give_the_same_greedy_tokens(target):
    tok, model = target.tokenizer, target.model
    draft = perturbed(model, 0.03, 6)
    prompts = [tok.encode(t, bos=True) for t in TEXTS[:2]]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    alone = generate(model, tok, prompts, params)
    spec = generate(model, tok, prompts, params, draft=draft, compile=True)
    assert [c.token_ids for c in spec] == [c.token_ids for c in alone]
