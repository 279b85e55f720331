"""Batched generation over a preallocated KV cache.

Prompts of different lengths are right-padded and prefilled together; each row then decodes
at its own position (the cache masks what lies beyond it, so padding is never seen). Sampling
(greedy, temperature, top-k, top-p) uses one seeded generator per row, so a row's tokens do
not depend on the other rows. Text is produced incrementally: a piece never ends inside a
UTF-8 character, stop strings are cut (and text that may begin one is held back), and the
pieces of a stream concatenate to the final text.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import kernels
from .model import Transformer
from .quantize import Int8Linear
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.6  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    echo: bool = False  # also return the prompt tokens' logprobs

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop id or stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float | None] | None = None  # None for the first prompt token


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


class TextStream:
    """Generated ids -> text pieces, for one row."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), continuation: bool = True):
        self.tokenizer, self.stop, self.continuation = tokenizer, tuple(stop), continuation
        self.ids: list[int] = []
        self.text = ""  # decoded text of ids[:decoded]
        self.decoded = 0
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; self.text ends before it

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        pending = self.tokenizer.decode(
            self.ids[self.decoded :], continuation=self.continuation or self.decoded > 0
        )
        if pending.endswith("\ufffd"):  # maybe the first bytes of a character: wait for the rest
            return ""
        self.text += pending
        self.decoded = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text (including bytes that never formed a character)."""
        if not self.stopped and self.decoded < len(self.ids):
            tail = self.ids[self.decoded :]
            self.text += self.tokenizer.decode(
                tail, continuation=self.continuation or self.decoded > 0
            )
            self.decoded = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            lo = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        for n in range(min(len(self.text), max(map(len, self.stop), default=0)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) and s != tail for s in self.stop):
                return n
        return 0


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Temperature, then top-k, then top-p (the smallest set of
    most likely tokens whose probability reaches top_p), then a draw from each row's generator."""
    if temperature <= 0:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax is vectorized: ~4 us over 32,000 logits against torch's ~30 us,
            # in a tiny model's decode step of ~1 ms (same first-maximum and NaN rules)
            return torch.from_numpy(logits.detach().numpy().argmax(-1))
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # One uniform number per row (from the row's own generator), inverted through the row's
    # cumulative distribution. (torch.multinomial draws one exponential per vocabulary entry
    # for a single sample: 32,000 draws, ~1.3 ms a row on a 2-core CPU, most of a batched
    # server step's sampling.)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("invalid probability distribution: the logits hold inf or nan")
    if generators is None:
        u = torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device)
    else:
        u = torch.cat(
            [
                torch.rand(1, dtype=torch.float64, device=probs.device, generator=g)
                for g in generators
            ]
        )
    # the first entry whose cumulative probability passes u * total (one of positive probability)
    picked = torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The logprob of `token` under one row's logits [V], with the k most likely tokens'."""
    logprobs = logits.float().log_softmax(-1)
    top = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.stream.ids[-1]

    def step(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from this row's logits [V]; what it adds to the output."""
        p = self.params
        gens = None if self.generator is None else [self.generator]
        token = int(sample(logits[None], p.temperature, p.top_k, p.top_p, gens)[0])
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


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_forward(model: Transformer) -> Callable:
    """The model's forward under torch.compile, made once per model, for the one-token decode
    steps over a static cache (see `setup_static_cache`): one fused graph instead of hundreds
    of eager ops per token.

    Models whose linear weights are fp32 or quantized are compiled with inductor's `freezing`:
    the weights become constants of the graph, so a call no longer gathers every parameter.
    The weights are read when the step is compiled: this is for inference, not for a model
    that is still being trained. Half-precision weights are not frozen (freezing would fold
    their conversion into fp32 copies). A frozen fp32 weight's single-row product is a fused
    reduction or a library GEMV on a prepacked copy (which doubles those weights' memory), an
    int8 weight's a fused reduction or PyTorch's int8 kernel, whichever measures faster on
    this CPU (`kernels.choose_compiled`)."""
    if model not in _COMPILED:
        # each model (and batch size, cache length) is a graph of its own: allow many
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        freeze = all(m.weight.dtype == torch.float32 for m in linears)
        if freeze:
            int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
            weights = sum(m.weight.numel() * m.weight.element_size() for m in linears + int8)
            for m in linears + int8:
                if isinstance(m, kernels.Linear | Int8Linear) and m.weight.device.type == "cpu":
                    scales = m.scales if isinstance(m, Int8Linear) else None
                    m.compiled = kernels.choose_compiled(m.weight, weights, scales)
        # (with frozen weights, a C++ wrapper also spares the Python calls of the quantized
        # kernels)
        compiled = torch.compile(model, options={"cpp_wrapper": freeze})

        def step(
            tokens: torch.Tensor, start_pos: torch.Tensor, kv_len: int, same_graph: bool = False
        ) -> torch.Tensor:
            """`same_graph`: the caller's previous step ran the graph this one needs (same
            shapes; only values and kv_len change), so its guards are not checked again."""
            if same_graph:
                # no trace happens here, so the settings below, which only a trace reads, are
                # left alone (patching them costs ~45 us a step, 3% of a tiny model's)
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return compiled(tokens, start_pos=start_pos, kv_len=kv_len)
            # both settings are read when dynamo traces (any call may recompile): `freezing`
            # there, not only in inductor's options, is what keeps the parameters out of the
            # graph's inputs and guards; kv_len is a dynamic size from the first compile on.
            # Passing kv_len also spares the model's host-side checks of the positions.
            with (
                torch._inductor.config.patch(freezing=freeze),
                torch.compiler.config.patch(dynamic_sources="L['kv_len']"),
            ):
                return compiled(tokens, start_pos=start_pos, kv_len=kv_len)

        _COMPILED[model] = step
    return _COMPILED[model]


STATIC_CACHES_KEPT = 2


def setup_static_cache(model: Transformer, batch_size: int, max_seq_len: int) -> None:
    """Set up the model's cache for compiled steps. A compiled graph guards on the identity of
    the cache tensors it was traced with, so the last STATIC_CACHES_KEPT static caches (of
    different shapes) are kept and reused when the shape and dtype match: a new one would
    recompile, and requests that alternate between a short and a long cache (a 512-token
    prompt, then a short one) recompiled at every switch when only the last one was kept."""
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


STATIC_CACHE_STEP = 256  # static caches come in multiples of this (few shapes, short reads)


@torch.inference_mode()
def generate_steps(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    continuation: bool = True,
    results: list[Completion] | None = None,
    compile: bool = False,
) -> Iterator[dict[int, StepOutput]]:
    """Generate for a batch of token-id prompts, yielding each step's outputs keyed by prompt
    index (the rows still running); when done, `results` (if given) holds one Completion per
    prompt. `compile` runs the decode steps through torch.compile over a static cache (the
    first call of a shape compiles)."""
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
    B, lens = len(prompts), [len(p) for p in prompts]
    device = model.tok_embeddings.weight.device
    budget = [min(params.max_new_tokens, context - n) for n in lens]
    needed = max(n + b for n, b in zip(lens, budget, strict=True))
    if compile:
        # every step reads the whole static cache: keep it short, in a few sizes
        size = min(context, -(-needed // STATIC_CACHE_STEP) * STATIC_CACHE_STEP)
        setup_static_cache(model, B, size)
        step = compiled_forward(model)
    else:
        model.setup_cache(B, needed)
        step = model
    try:
        rows = [
            RowDecoder(
                tokenizer,
                params,
                stop_ids,
                continuation,
                budget=budget[i],
                seed=None if params.seed is None else params.seed + i,
                device=device,
            )
            for i in range(B)
        ]
        tokens = torch.zeros(B, max(lens), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        if params.echo:
            logits = model(tokens, start_pos=0)
            last = logits[torch.arange(B), torch.tensor(lens) - 1]
            lp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
            prompt_lps = [[None] + lp[i, : n - 1].tolist() for i, n in enumerate(lens)]
        else:
            last = model(tokens, start_pos=0, output_index=torch.tensor(lens) - 1)[:, 0]
            prompt_lps = [None] * B
        pos = list(lens)
        n_steps = 0
        while True:
            active = [i for i, row in enumerate(rows) if not row.finished]
            if not active:
                break
            yield {i: rows[i].step(last[i]) for i in active}
            if all(row.finished for row in rows):
                break
            # finished rows idle at their position (rewriting one harmless cache slot)
            feed = [0 if row.finished else row.last_token for row in rows]
            feed = torch.tensor(feed, device=device)[:, None]
            start = torch.tensor(pos, device=device)
            if compile:
                # the graph was picked (and guarded) on the first step; later steps only
                # change values
                last = step(feed, start, max(pos) + 1, same_graph=n_steps > 0)[:, 0]
            else:
                last = step(feed, start_pos=start)[:, 0]
            n_steps += 1
            pos = [p + (not row.finished) for p, row in zip(pos, rows, strict=True)]
        if results is not None:
            results[:] = [row.completion(lens[i], prompt_lps[i]) for i, row in enumerate(rows)]
    finally:
        model.clear_cache()


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    continuation: bool = True,
    compile: bool = False,
) -> list[Completion]:
    results: list[Completion] = []
    steps = generate_steps(
        model, tokenizer, prompts, params, stop_ids, continuation, results, compile
    )
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
) -> Iterator[str]:
    """Text pieces of one prompt's completion, as they are generated."""
    steps = generate_steps(
        model, tokenizer, [prompt], params, stop_ids, continuation, None, compile
    )
    for outputs in steps:
        if outputs[0].text:
            yield outputs[0].text
