"""Batched generation over a preallocated KV cache.

Prompts of different lengths are right-padded and prefilled together; each row then decodes
at its own position (the cache masks what lies beyond it, so padding is never seen). The
model runs through CachedModel, the batched prefill and decode step over cache slots that the
serving engine runs too, eager or compiled, and each row through RowDecoder. Sampling
(greedy, temperature, top-k, top-p) uses one seeded generator per row, so a row's tokens do
not depend on the other rows. Text is produced incrementally: a piece never ends inside a
UTF-8 character, stop strings are cut (and text that may begin one is held back), and the
pieces of a stream concatenate to the final text.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import kernels
from .model import Context, Transformer
from .quantize import Int8Linear
from .sampling import SamplingParams, TokenLogprob, sample, token_logprob
from .structured import constraint, wanted
from .textstream import TextStream
from .tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop id or stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float | None] | None = None  # None for the first prompt token
    draft_acceptance: float | None = None  # with a draft: its proposals' share accepted


@dataclass
class StepOutput:
    """One decode step of one row: the token sampled (None when it was a stop id), the text
    piece it releases (maybe empty), its logprobs if asked for, and why the row finished (None
    while it goes on)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RowDecoder:
    """The decoding of one sequence, one token per `step`: sampling with its own generator,
    stop ids, stop strings, logprobs, text assembly and the finish reason. The library's
    batches and the server's requests both decode through it, so a sequence's output does not
    depend on who batched it or with what."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams,
        stop_ids: Sequence[int] = (),
        continuation: bool = True,
        budget: int | None = None,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.params, self.stop_ids = params, frozenset(stop_ids)
        self.budget = params.max_new_tokens if budget is None else budget
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed) if seed is not None else self.generator.seed()
        self.stream = TextStream(tokenizer, params.stop, continuation)
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None if self.budget > 0 else "length"
        self.constraint = constraint(tokenizer, params)  # structured output, if asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.stream.ids[-1]

    def step(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from this row's logits [V]; what it adds to the output. With
        structured output, the logits are masked in place first (logprobs are then those of
        the masked distribution) and the grammar's end (its EOS) ends the row."""
        p = self.params
        gens = None if self.generator is None else [self.generator]
        if self.constraint is not None:
            self.constraint.mask(logits)
        token = int(sample(logits[None], p.temperature, p.top_k, p.top_p, gens)[0])
        if self.constraint is not None and self.constraint.accept(token):
            self.finish_reason = "stop"
            return StepOutput(None, self.stream.finish(), self.finish_reason)
        return self.add(token, logits)

    def add(self, token: int, logits: torch.Tensor) -> StepOutput:
        """Take `token`, chosen elsewhere from these logits [V] (a speculative step's), as the
        next one: stop ids, stop strings, budget, logprobs and text as `step`."""
        p = self.params
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return StepOutput(None, self.stream.finish(), self.finish_reason)
        info = None
        if p.logprobs is not None:
            info = token_logprob(logits, token, p.logprobs)
            self.logprobs.append(info)
        piece = self.stream.add(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.stream.ids) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            piece += self.stream.finish()
        return StepOutput(token, piece, self.finish_reason, info)

    def completion(
        self, prompt_tokens: int, prompt_logprobs: list[float | None] | None = None
    ) -> Completion:
        return Completion(
            text=self.stream.text,
            token_ids=self.stream.ids,
            finish_reason=self.finish_reason,
            prompt_tokens=prompt_tokens,
            logprobs=self.logprobs if self.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
        )


DRAFT_TOKENS = 4  # a draft model's proposals a step (speculative decoding)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
RECOMPILE_LIMIT = 64
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode(model: Transformer) -> Callable:
    """The model's decode step under torch.compile, made once per model, over a static cache
    (see `setup_static_cache`): `step(tokens [B, T], positions [B], kv_len, same_graph=False)
    -> logits [B, T, V]` for the cache's rows 0..B-1, each row's T tokens from its position
    (one token a row when decoding; a draft's proposals to verify), one fused graph instead of
    hundreds of eager ops per token, a graph per shape.

    Models whose linear weights are fp32 or quantized are compiled with inductor's `freezing`:
    the weights become constants of the graph, so a call does not gather every parameter.
    The weights are read when the step is compiled: this is for inference, not for a model
    that is still being trained. Half-precision weights are not frozen (freezing would fold
    their conversion into fp32 copies). A frozen fp32 weight's product of a few rows is a
    fused reduction, MKL's GEMV/GEMM on a prepacked copy (which doubles those weights' memory),
    oneDNN's inner product or inductor's C++ GEMM template (`kernels.TEMPLATE`; its packed copy
    doubles them too), an int8 weight's a fused reduction or PyTorch's int8 kernel,
    whichever measures faster on this CPU for that many rows (`kernels.choose_compiled`),
    chosen before the first graph of each row count is traced."""
    if model not in _COMPILED:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        freeze = all(m.weight.dtype == torch.float32 for m in linears)
        int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
        weights = sum(m.weight.numel() * m.weight.element_size() for m in linears + int8)
        chosen: set[int] = set()
        templates: set[int] = set()  # the row counts whose graph has template products

        def choose_forms(rows: int) -> None:
            chosen.add(rows)
            if not freeze:
                return
            modules = [
                m
                for m in linears + int8
                if isinstance(m, kernels.Linear | Int8Linear) and m.weight.device.type == "cpu"
            ]
            forms = {}
            for m in modules:
                scales = m.scales if isinstance(m, Int8Linear) else None
                forms[m] = kernels.choose_compiled(m.weight, weights, scales, rows)
            if "template" in forms.values():
                # the template is a setting of the whole graph, under which the library's
                # products are templates too: those weights choose between the two forms left
                templates.add(rows)
                for m, form in forms.items():
                    if form in ("linear", "onednn"):
                        pair = ("reduction", "template")
                        forms[m] = kernels.choose_compiled(m.weight, weights, None, rows, pair)
            for m, form in forms.items():
                kernels.set_compiled_form(m, rows, form)

        def forward(tokens: torch.Tensor, positions: torch.Tensor, kv_len: int):
            return model(tokens, positions, Context(kv_len=kv_len))

        # (with frozen weights, a C++ wrapper also spares the Python calls of the quantized
        # kernels)
        compiled = torch.compile(forward, options={"cpp_wrapper": freeze})

        def step(
            tokens: torch.Tensor, positions: torch.Tensor, kv_len: int, same_graph: bool = False
        ) -> torch.Tensor:
            """`same_graph`: the caller's previous step ran the graph this one needs (same
            shapes; only values and kv_len change), so its guards are not checked again."""
            if same_graph:
                # no trace happens here, so the settings below, which only a trace reads, are
                # left alone (patching them costs more than a tiny model's step can spare)
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return compiled(tokens, positions, kv_len)
            if tokens.numel() not in chosen:
                choose_forms(tokens.numel())
            # these settings are read when dynamo traces (any call may recompile): `freezing`
            # there, not only in inductor's options, is what keeps the parameters out of the
            # graph's inputs and guards; kv_len is a dynamic size from the first compile on.
            # Passing kv_len also spares the model's host-side checks of the positions.
            template = kernels.TEMPLATE if tokens.numel() in templates else {}
            with (
                torch._inductor.config.patch(freezing=freeze, **template),
                torch.compiler.config.patch(dynamic_sources="L['kv_len']"),
                # each model (and batch size, cache) is a graph of its own: allow many. Set
                # here, in the thread that steps (dynamo's settings are per thread: a server
                # steps in a thread of its own)
                torch._dynamo.config.patch(cache_size_limit=RECOMPILE_LIMIT),
            ):
                return compiled(tokens, positions, kv_len)

        _COMPILED[model] = step
    return _COMPILED[model]


STATIC_CACHES_KEPT = 2
STATIC_CACHE_STEP = 256  # static caches come in multiples of this (few shapes, short reads)


def setup_static_cache(model: Transformer, batch_size: int, max_seq_len: int) -> None:
    """Set up the model's cache for compiled steps. A compiled graph guards on the identity of
    the cache tensors it was traced with, so the last STATIC_CACHES_KEPT static caches (of
    different shapes) are kept and reused when the shape and dtype match: a new one would
    recompile, and keeping two lets requests that alternate between a short and a long cache
    (a 512-token prompt, then a short one) reuse both graphs."""
    kept = _STATIC_CACHES.setdefault(model, [])
    shape = (batch_size, model.config.n_kv_heads, max_seq_len)
    for caches in kept:
        if caches[0].k.shape[:3] == shape and caches[0].k.dtype == model.compute_dtype:
            kept.remove(caches)
            break
    else:
        if len(kept) == STATIC_CACHES_KEPT:
            del kept[0]  # (the least recently used)
        model.setup_cache(batch_size, max_seq_len)
        caches = model.kv_caches
    kept.append(caches)
    model.kv_caches = caches


class CachedModel:
    """The model over a KV cache of `slots` rows of `length` positions, one batched step at a
    time: `prefill` writes rows of prompt tokens into their slots, `decode` feeds one token per
    row, each at its own position, and both give next-token logits. `generate` drives it for
    one batch (slots 0..B-1); the serving engine for requests that come and go, each in a slot
    of its own. `close` returns the model to plain forward passes.

    With `compile`, decode steps run through `compiled_decode` over a static cache, whose
    length is rounded up to a multiple of STATIC_CACHE_STEP (every step reads all of it: short,
    in few sizes); they run the cache's rows 0..B-1, so a caller whose rows sit in scattered
    slots runs the slots up to the highest. Prefills stay eager (every prompt length would be
    a graph of its own)."""

    def __init__(self, model: Transformer, slots: int, length: int, compile: bool = False):
        self.model, self.compile = model, compile
        self.device = model.tok_embeddings.weight.device
        if compile:
            step = STATIC_CACHE_STEP
            length = min(model.config.max_seq_len, -(-length // step) * step)
            setup_static_cache(model, slots, length)
            self._compiled = compiled_decode(model)
        else:
            model.setup_cache(slots, length)
        self.caches = model.kv_caches
        self._shape: torch.Size | None = None  # tokens of the last compiled step

    def prefill(
        self,
        rows: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
        slots: Sequence[int] | None = None,
        every_position: bool = False,
    ) -> torch.Tensor:
        """Rows of tokens written from positions `starts` (default 0) of `slots` (default
        0..B-1) -> the logits after each row's last token [B, V] (or, with `every_position`,
        after each of its tokens: [B, T, V], the rows right-padded to the longest, T)."""
        tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        # all from 0: plain causal attention over the fresh keys
        start_pos = 0 if not starts or not any(starts) else torch.tensor(starts, device=self.device)
        ctx = Context(slots=slots)
        if not every_position:  # the output head on one row per sequence
            ctx.output_index = torch.tensor([len(row) - 1 for row in rows], device=self.device)
        logits = self.model(tokens.to(self.device), start_pos, ctx)
        return logits if every_position else logits[:, 0]

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One token per row, each at its position (of its slot; default 0..B-1) -> next-token
        logits [B, V]."""
        if not self.compile:
            feed = torch.tensor(tokens, device=self.device)
            start = torch.tensor(positions, device=self.device)
            return self.model(feed[:, None], start, Context(slots=slots))[:, 0]
        return self.extend([[t] for t in tokens], positions, slots)[:, 0]

    def extend(
        self,
        rows: Sequence[Sequence[int]],
        positions: Sequence[int],
        slots: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """T tokens per row (the same T for all), from each row's position -> the logits after
        each of them [B, T, V]: a decode step of T tokens, such as a draft's proposals to
        verify. Compiled (a graph per B and T) with `compile`, as `decode` is."""
        if not self.compile:
            return self.prefill(rows, positions, slots, every_position=True)
        if slots is not None:
            raise ValueError("compiled decode steps run the cache's rows 0..B-1, not slots")
        feed = torch.tensor(rows, device=self.device)
        start = torch.tensor(positions, device=self.device)
        kv_len = max(positions) + feed.shape[1]
        # the graph is picked (and guarded) when the batch's shape changes; the steps after
        # it only change values
        logits = self._compiled(feed, start, kv_len, same_graph=self._shape == feed.shape)
        self._shape = feed.shape
        return logits

    def copy(self, source: int, slot: int, n: int) -> None:
        """Copy the first n positions of a slot's keys and values into another slot."""
        for cache in self.caches:
            cache.k[slot, :, :n] = cache.k[source, :, :n]
            cache.v[slot, :, :n] = cache.v[source, :, :n]

    def close(self) -> None:
        self.model.clear_cache()


def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]]) -> None:
    context = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        if len(p) >= context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; the context is {context}, leaving no room"
            )
        if max(p) >= model.config.vocab_size or min(p) < 0:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary")


def prefill_prompts(
    cached: CachedModel, prompts: Sequence[Sequence[int]], echo: bool
) -> tuple[torch.Tensor, list]:
    """Prefill slots 0..B-1 with the prompts -> (next-token logits [B, V], each prompt's
    logprobs (None for its first token) with `echo`, else None)."""
    if not echo:
        return cached.prefill(prompts), [None] * len(prompts)
    logits = cached.prefill(prompts, every_position=True)
    last = logits[torch.arange(len(prompts)), torch.tensor([len(p) for p in prompts]) - 1]
    prompt_lps = []
    for row, p in zip(logits, prompts, strict=True):
        ids = torch.tensor(p[1:], device=logits.device)[:, None]
        lp = row[: len(p) - 1].log_softmax(-1).gather(-1, ids)[:, 0]
        prompt_lps.append([None] + lp.tolist())
    return last, prompt_lps


@torch.inference_mode()
def generate_steps(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    stop_ids: Sequence[int] = (),
    continuation: bool = True,
    results: list[Completion] | None = None,
    compile: bool = False,
    draft: Transformer | None = None,
    draft_tokens: int = DRAFT_TOKENS,
) -> Iterator[dict[int, StepOutput]]:
    """Generate for a batch of token-id prompts, yielding each step's outputs keyed by prompt
    index (the rows still running); when done, `results` (if given) holds one Completion per
    prompt. `params`: the rows' sampling parameters, or one per prompt (a batch may mix, say,
    structured and free rows). `compile` runs the decode steps through torch.compile over a
    static cache (the first call of a shape compiles). `draft`: a model with the same
    vocabulary proposing `draft_tokens` tokens a step for speculative decoding (see
    `speculative`; the prompts then run one after another)."""
    context = model.config.max_seq_len
    check_prompts(model, prompts)
    B, lens = len(prompts), [len(p) for p in prompts]
    each = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(each) != B:
        raise ValueError(f"{len(each)} sampling parameters for {B} prompts")
    if draft is not None:
        if not isinstance(params, SamplingParams) or wanted(params):
            raise ValueError("a draft model runs one set of params, without structured output")
        from .speculative import draft_steps

        args = (stop_ids, continuation, results, compile, draft, draft_tokens)
        yield from draft_steps(model, tokenizer, prompts, params, *args)
        return
    device = model.tok_embeddings.weight.device
    budget = [min(p.max_new_tokens, context - n) for p, n in zip(each, lens, strict=True)]
    cached = CachedModel(model, B, max(n + b for n, b in zip(lens, budget, strict=True)), compile)
    try:
        rows = [
            RowDecoder(
                tokenizer,
                p,
                stop_ids,
                continuation,
                budget=budget[i],
                seed=None if p.seed is None else p.seed + i,
                device=device,
            )
            for i, p in enumerate(each)
        ]
        last, prompt_lps = prefill_prompts(cached, prompts, any(p.echo for p in each))
        pos = list(lens)
        while True:
            active = [i for i, row in enumerate(rows) if not row.finished]
            if not active:
                break
            yield {i: rows[i].step(last[i]) for i in active}
            if all(row.finished for row in rows):
                break
            # finished rows idle at their position (rewriting one harmless cache slot)
            last = cached.decode([0 if row.finished else row.last_token for row in rows], pos)
            pos = [p + (not row.finished) for p, row in zip(pos, rows, strict=True)]
        if results is not None:
            results[:] = [
                row.completion(lens[i], prompt_lps[i] if each[i].echo else None)
                for i, row in enumerate(rows)
            ]
    finally:
        cached.close()


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    stop_ids: Sequence[int] = (),
    continuation: bool = True,
    compile: bool = False,
    draft: Transformer | None = None,
    draft_tokens: int = DRAFT_TOKENS,
) -> list[Completion]:
    results: list[Completion] = []
    args = (stop_ids, continuation, results, compile, draft, draft_tokens)
    steps = generate_steps(model, tokenizer, prompts, params, *args)
    for _ in steps:
        pass
    return results


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    continuation: bool = True,
    compile: bool = False,
    draft: Transformer | None = None,
    draft_tokens: int = DRAFT_TOKENS,
) -> Iterator[str]:
    """Text pieces of one prompt's completion, as they are generated."""
    args = (stop_ids, continuation, None, compile, draft, draft_tokens)
    steps = generate_steps(model, tokenizer, [prompt], params, *args)
    for outputs in steps:
        if outputs[0].text:
            yield outputs[0].text
