"""Choosing the next token from logits: the sampling parameters, the draw (greedy,
temperature, top-k, top-p, one seeded generator per row) and the logprobs reported."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


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
    # structured output (see structured.py; at most one): the text follows a JSON Schema (a
    # mapping or JSON text), is a JSON object, or follows a GBNF grammar
    json_schema: Mapping | str | None = None
    json_object: bool = False
    grammar: str | None = None

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
        given = [self.json_schema is not None, self.json_object, self.grammar is not None]
        if sum(given) > 1:
            raise ValueError("give at most one of json_schema, json_object and grammar")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy, or a draw from `probabilities` with each row's
    generator."""
    if temperature <= 0:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax is vectorized, several times faster than torch's over a 32,000-token
            # vocabulary: a visible share of a tiny model's decode step (same first-maximum and
            # NaN rules)
            return torch.from_numpy(logits.detach().numpy().argmax(-1))
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, temperature, top_k, top_p), generators)


def probabilities(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """logits [B, V] -> the distribution [B, V] that sampling draws from: temperature, then
    top-k, then top-p (the smallest set of most likely tokens whose probability reaches top_p;
    not renormalised after that cut: `draw` scales by the total). Speculative decoding compares
    these, the draft's and the target's."""
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
    return probs


def uniform(n: int, generators: Sequence[torch.Generator] | None, device) -> torch.Tensor:
    """n uniform numbers in [0, 1) (float64), one from each row's generator when given."""
    if generators is None:
        return torch.rand(n, dtype=torch.float64, device=device)
    return torch.cat(
        [torch.rand(1, dtype=torch.float64, device=device, generator=g) for g in generators]
    )


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row [B] from (not necessarily normalised) probabilities [B, V]."""
    # One uniform number per row (from the row's own generator), inverted through the row's
    # cumulative distribution. (torch.multinomial draws one exponential per vocabulary entry
    # for a single sample, 32,000 draws a row: most of a batched server step's sampling.)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("invalid probability distribution: the logits hold inf or nan")
    u = uniform(probs.shape[0], generators, probs.device)
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
