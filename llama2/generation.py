"""Token generation with the KV cache (single prompt; batching and streaming build on this)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model import Transformer


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator=None
) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 is greedy; top_p keeps the smallest set of
    most likely tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new token ids one at a time; stop after a stop id (not yielded) or the budget."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. BOS)")
    context = model.config.max_seq_len
    if len(prompt) >= context:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room in the context of {context}"
        )
    cache_len = min(len(prompt) + max_new_tokens, context)
    device = model.output.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.setup_cache(batch_size=1, max_seq_len=cache_len)
    try:
        logits = model(torch.tensor([prompt], device=device), start_pos=0)[:, -1]
        pos, n = len(prompt), 0
        while n < max_new_tokens:
            next_id = sample_next(logits, temperature, top_p, generator)
            if int(next_id) in stop_ids:
                return
            yield int(next_id)
            n += 1
            if n == max_new_tokens or pos == cache_len:
                return
            logits = model(next_id[:, None], start_pos=pos)[:, -1]
            pos += 1
    finally:
        model.clear_cache()
