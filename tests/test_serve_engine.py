"""The serving engine on its own (no HTTP): prefix caching, batched and chunked prefill give the
tokens that plain prefills give; deadlines and shutdown end requests and free their slots."""

import threading
import time

import pytest
import torch

from llama2 import Transformer, get_preset
from llama2.generation import SamplingParams, generate
from llama2.serve.engine import Engine, Failure, Request
from llama2.serve.metrics import Histogram


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(get_preset("micro", max_seq_len=256)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4)  # (sharper distributions than init's: the tokens say more)
    return m


class Collect:
    """A request's events; `wait()` returns its Completion (or Failure)."""

    def __init__(self, on_token=None):
        self.pieces, self.end, self.done, self.on_token = [], None, threading.Event(), on_token

    def __call__(self, kind, value):
        if kind == "token":
            self.pieces.append(value[0])
            if self.on_token:
                self.on_token(self)
        else:
            self.end = value
            self.done.set()

    def wait(self, timeout: float = 60):
        assert self.done.wait(timeout=timeout), "the engine never ended the request"
        return self.end


def request(prompt, seed, max_tokens=12, temperature=0.9, timeout=None, **kw):
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    return Request(list(prompt), params, (), Collect(**kw), timeout=timeout)


def engine(model, tok, **kw):
    return Engine(model, tok, max_batch=4, max_queue=16, **kw)


def prompts(n, shared=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = [1] + torch.randint(3, 512, (shared - 1,), generator=g).tolist()
    return [prefix + torch.randint(3, 512, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


def run_all(eng, reqs, together=True, timeout=60):
    """Completions of the requests: submitted at once, or each after the previous ended."""
    try:
        if together:
            eng.submit(reqs)
        out = []
        for r in reqs:
            if not together:
                eng.submit([r])
            out.append(r.emit.wait(timeout))
        return out
    finally:
        eng.shutdown()


def test_prefix_cache_gives_the_tokens_of_a_full_prefill(model, small_tokenizer):
    """Requests sharing a 60-token prefix: with the cache (reused from a free slot, and copied
    from a busy one) they sample what they sample without it, for the same seeds."""
    ps = prompts(4)
    plain = run_all(
        engine(model, small_tokenizer, prefix_cache=False),
        [request(p, seed=i) for i, p in enumerate(ps)],
        together=False,
    )
    cached_eng = engine(model, small_tokenizer)
    cached = run_all(cached_eng, [request(p, seed=i) for i, p in enumerate(ps)], together=False)
    assert [c.token_ids for c in cached] == [c.token_ids for c in plain]
    assert all(len(c.token_ids) == 12 for c in plain)
    # each later request found the 60 shared tokens (and the first's whole prompt at most)
    assert cached_eng.stats.cached_prompt_tokens >= 3 * 60

    # a busy slot: the second request arrives while the first is decoding, from the first's
    # first token on, and copies the prefix from the first's slot
    eng = engine(model, small_tokenizer)
    second = request(ps[1], seed=1)
    submitted = []

    def submit_second(collect):
        if not submitted:
            submitted.append(eng.submit([second]))

    first = request(ps[0], seed=0, max_tokens=40, on_token=submit_second)
    try:
        eng.submit([first])
        assert second.emit.wait().token_ids == plain[1].token_ids
        first.emit.wait()
        assert eng.stats.cached_prompt_tokens == 60
    finally:
        eng.shutdown()


@pytest.mark.parametrize("compiled", [False, True])
def test_where_a_request_goes_when_a_higher_free_slot_holds_its_prefix(
    model, small_tokenizer, compiled
):
    """Eager, a request takes the free slot that holds the longest prefix of its prompt. Under
    --compile it takes the lowest free slot and the prefix is copied into it: in slot 3 one
    stream would run the 4-row compiled step for every token (the width covers the highest
    slot running)."""
    (prompt,) = prompts(1)
    eng = engine(model, small_tokenizer, compile=compiled)
    eng.shutdown()  # (no loop: the admission alone, as the loop would do it)
    eng.slot_tokens[3] = prompt[:40]
    eng.slot_tokens[0] = prompt[:10]
    copies = []
    copy = eng.step.copy
    eng.step.copy = lambda source, slot, n: (
        copies.append((source, slot, n)) or copy(source, slot, n)
    )
    eng._admit(request(prompt, seed=0))
    (seq,) = eng.prefilling
    assert seq.pos == 40 and seq.slot not in eng.free
    if compiled:
        assert seq.slot == 0 and copies == [(3, 0, 40)]
        assert eng.width(max(s.slot for s in eng.prefilling)) == 1
    else:
        assert seq.slot == 3 and copies == []
    assert eng.slot_tokens[seq.slot] == prompt[:40]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_prefix_pool_serves_alternating_system_prompts_across_slots(
    model, small_tokenizer, temperature
):
    """Three 40-token system prompts A, B, C (in 45-47-token prompts: two whole blocks)
    alternate as A B A C A B over one slot, so the slot itself never holds the next one's
    prefix: the pool (4 blocks of 16 tokens: two prompts' whole blocks) gives the 3rd and 5th
    requests A's 32 tokens, C evicts B and B is computed again. Every output is the one
    without any prefix cache, for the same seed; likewise with 2 slots and all six arriving
    together."""
    systems = [prompts(1, shared=40, seed=10 + k)[0][:40] for k in range(3)]
    g = torch.Generator().manual_seed(3)
    order = [0, 1, 0, 2, 0, 1]
    ps = [
        systems[k] + torch.randint(3, 512, (5 + i % 3,), generator=g).tolist()
        for i, k in enumerate(order)
    ]

    def reqs():
        return [request(p, seed=i, temperature=temperature) for i, p in enumerate(ps)]

    plain_eng = Engine(model, small_tokenizer, max_batch=1, prefix_cache=False)
    assert plain_eng.pool is None
    plain = [c.token_ids for c in run_all(plain_eng, reqs(), together=False)]
    assert all(len(t) == 12 for t in plain)

    eng = Engine(model, small_tokenizer, max_batch=1, prefix_pool_blocks=4)
    assert [c.token_ids for c in run_all(eng, reqs(), together=False)] == plain
    assert eng.pool.hit_tokens == 2 * 32  # the 3rd and 5th requests, from the pool
    assert eng.pool.evictions >= 2 and len(eng.pool.entries) == 4  # bounded
    assert eng.stats.cached_prompt_tokens == 2 * 32 + 3  # (+ the BOS the slot held: 2nd, 4th, 6th)

    eng = Engine(model, small_tokenizer, max_batch=2, prefix_pool_blocks=4, prefill_chunk=24)
    assert [c.token_ids for c in run_all(eng, reqs())] == plain
    assert eng.pool.evictions > 0 and len(eng.pool.entries) <= 4


def test_chunked_and_batched_prefill_give_the_tokens_of_a_whole_prefill(model, small_tokenizer):
    """Long prompts prefilled 7 tokens per iteration, between the decode steps of the others,
    and prompts of different lengths prefilled in one batched forward, sample what the library
    samples for each prompt alone."""
    ps = [p[5:] for p in prompts(4, shared=90, seed=1)]  # no shared prefix: all computed
    alone = [
        generate(model, small_tokenizer, [p], SamplingParams(12, 0.9, seed=i))[0].token_ids
        for i, p in enumerate(ps)
    ]
    for chunk in (7, 512):
        eng = engine(model, small_tokenizer, prefill_chunk=chunk, prefix_cache=False)
        widths = []  # (rows, tokens) of each prefill forward
        hook = model.register_forward_pre_hook(
            lambda _, args, w=widths: (
                w.append(tuple(args[0].shape)) if args[0].shape[1] > 1 else None
            )
        )
        try:
            out = run_all(eng, [request(p, seed=i) for i, p in enumerate(ps)])
        finally:
            hook.remove()
        assert [c.token_ids for c in out] == alone, chunk
        if chunk == 7:  # the prompts (88-97 tokens) went 7 tokens at a time
            assert max(t for _, t in widths) <= 7 and len(widths) >= sum(map(len, ps)) // 7
        else:  # all four arrived together: one forward
            assert widths == [(4, max(map(len, ps)))]


def test_a_request_ends_at_the_context_and_at_its_deadline(model, small_tokenizer):
    eng = engine(model, small_tokenizer)
    try:
        # max_tokens past the context: it ends at the context, its slot free again
        long = request([1] * 200, seed=0, max_tokens=10_000)
        eng.submit([long])
        c = long.emit.wait()
        assert c.finish_reason == "length" and len(c.token_ids) == 256 - 200
        # a deadline: held before its first decode step until the deadline has passed
        passed = threading.Event()

        def hold(_, args):
            if args[0].shape[1] == 1 and not passed.is_set():
                passed.wait(timeout=60)

        hook = model.register_forward_pre_hook(hold)
        late = request([1, 5, 6], seed=0, max_tokens=100, timeout=0.05)
        try:
            eng.submit([late])
            threading.Timer(0.1, passed.set).start()  # (the deadline is 0.05 s)
            end = late.emit.wait()
        finally:
            hook.remove()
        assert isinstance(end, Failure) and end.status == 504
        assert len(late.emit.pieces) <= 1  # ended at the next step, not after 100 tokens
        assert eng.num_running == 0 and len(eng.free) == 4
    finally:
        eng.shutdown()


def test_shutdown_fails_running_and_waiting_requests(model, small_tokenizer):
    """Shutdown called while a request decodes (from inside its first decode step) and another
    waits: both end with 503, and the thread ends."""
    eng = Engine(model, small_tokenizer, max_batch=1, max_queue=4)
    stopper = threading.Thread(target=eng.shutdown)

    def stop_during_decode(_, args):
        if args[0].shape[1] == 1 and not stopper.is_alive() and not eng.stopping:
            stopper.start()
            while not eng.stopping:  # (shutdown has told the engine before we go on)
                time.sleep(0.001)

    hook = model.register_forward_pre_hook(stop_during_decode)
    try:
        running, waiting = request([1, 7], 0, max_tokens=50), request([1, 8], 1)
        eng.submit([running, waiting])
        for r in (running, waiting):
            end = r.emit.wait()
            assert isinstance(end, Failure) and end.status == 503, end
        stopper.join(timeout=60)
    finally:
        hook.remove()
    assert len(running.emit.pieces) <= 1 and not waiting.emit.pieces
    assert not eng.alive


def test_histogram_buckets_are_cumulative_and_bounded():
    h = Histogram((0.1, 1.0))
    for v in [0.05, 0.1, 0.5, 3.0] * 1000:
        h.observe(v)
    lines = h.render("x")
    assert lines[:3] == [
        'x_bucket{le="0.1"} 2000',
        'x_bucket{le="1.0"} 3000',
        'x_bucket{le="+Inf"} 4000',
    ]
    assert lines[-1] == "x_count 4000" and len(h.counts) == 3
    assert h.quantile(0.5) == 0.1 and h.quantile(0.75) == 1.0 and h.quantile(1.0) == float("inf")


def test_the_compiled_steps_widths_are_powers_of_two_up_to_max_batch(model, small_tokenizer):
    widths = {
        n: Engine(model, small_tokenizer, max_batch=n, thread=False).widths() for n in (1, 6, 8)
    }
    assert widths == {1: [1], 6: [1, 2, 4, 6], 8: [1, 2, 4, 8]}
    eager = Engine(model, small_tokenizer, max_batch=2, thread=False)
    eager.step.decode = lambda *a: pytest.fail("an eager engine compiles nothing")
    eager.warm_up()


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_eager_tokens(model, small_tokenizer):
    """--compile: the engine decodes through torch.compile over the slots up to the highest one
    running (idle ones among them write past what they hold) and samples what the eager engine
    samples. (Compiling takes ~50 s a graph on a loaded 2-core machine.)"""
    ps = prompts(3)
    eager = run_all(engine(model, small_tokenizer), [request(p, seed=i) for i, p in enumerate(ps)])
    widths = []  # rows of each compiled decode step: the slots up to the highest one running

    def counted(eng):
        step = eng.step.decode
        eng.step.decode = lambda tokens, *rest: widths.append(len(tokens)) or step(tokens, *rest)
        return eng

    try:
        eng = counted(engine(model, small_tokenizer, compile=True))
        eng.warm_up()  # every width's graph before the first request (as `serve` does)
        assert widths == eng.widths() == [1, 2, 4]
        widths.clear()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = run_all(eng, [request(p, seed=i) for i, p in enumerate(ps)], timeout=900)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # none new
        assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
        assert set(widths) <= {1, 2, 4} and 4 in widths  # three together: slots 0-2
        widths.clear()  # one at a time: each takes slot 0, and its steps run one row
        eng = counted(engine(model, small_tokenizer, compile=True))
        one_by_one = [request(p, seed=i) for i, p in enumerate(ps)]
        compiled = run_all(eng, one_by_one, together=False, timeout=900)
        assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
        assert set(widths) == {1}
    finally:
        model.clear_cache()


def test_a_steps_pieces_go_out_after_every_rows_sampling(model, small_tokenizer):
    """Requests decoding together: when one's piece is emitted, every running request has its
    token of that step already (the step's pieces go out back to back, so that a client's
    event loop takes them in one wake-up)."""
    eng = engine(model, small_tokenizer)
    seen = []  # at each emit: how many tokens each running request has sampled

    def note(_):
        seen.append([len(s.decoder.stream.ids) for s in eng.running])

    g = torch.Generator().manual_seed(1)
    ps = [[1] + torch.randint(3, 512, (19,), generator=g).tolist() for _ in range(3)]
    reqs = [request(p, seed=i, max_tokens=6, on_token=note) for i, p in enumerate(ps)]
    done = run_all(eng, reqs)
    assert all(len(c.token_ids) == 6 for c in done)
    assert len(seen) >= 3 * 5 and all(len(set(counts)) == 1 for counts in seen), seen
