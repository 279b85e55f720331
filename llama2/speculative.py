"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model with the
target's tokenizer proposes k tokens, one at a time; the target scores all of them in one
forward over the k+1 positions (`CachedModel.extend` from the row's position, every position's
logits, compiled like a decode step), and keeps the longest prefix it agrees with plus one
token of its own, so each target forward yields 1..k+1 tokens.

Sampling: proposal i (drawn from the draft's distribution q_i) is accepted with probability
min(1, p_i / q_i), p_i being the target's; at the first rejection the token is drawn from
norm(max(0, p_i - q_i)) instead, and when all k are accepted a bonus token is drawn from
p_{k+1}. Both p and q are the distributions after temperature, top-k and top-p
(`sampling.probabilities`), so the tokens have exactly the distribution that sampling from the
target alone gives. Greedy decoding is the case where p and q put all their mass on the argmax:
proposals are kept while the target's argmax agrees, so the output is the target's own greedy
output. All draws of a row come from its RowDecoder's seeded generator.

Each accepted token goes through the row's RowDecoder (`add`, the logic of `step`), with the
target's logits at its position: stop ids, stop strings, the token budget, logprobs (the
target's) and text are handled as without a draft. Neither cache is rolled back by copying:
positions past the accepted length are rewritten by the next forwards, and attention reads
only positions up to each query's own.

Rows run one at a time (a batch of prompts is generated prompt after prompt): rows of one batch
would accept different numbers of tokens at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .generation import CachedModel, RowDecoder, prefill_prompts
from .sampling import SamplingParams, draw, probabilities, sample, uniform
from .tokenizer import Tokenizer


def check_draft(target: Tokenizer, draft: Tokenizer) -> None:
    """A draft must share the target's vocabulary: the same pieces under the same ids."""
    if target.sha256() == draft.sha256():
        return
    if target.vocab_size != draft.vocab_size:
        raise ValueError(
            f"the draft's tokenizer has {draft.vocab_size} pieces, the target's "
            f"{target.vocab_size}: a draft needs the target's tokenizer"
        )
    ours, theirs = target.pieces(), draft.pieces()
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a[0] != b[0]:
            raise ValueError(
                f"the draft's tokenizer differs from the target's: id {i} is {b[0]!r} in the "
                f"draft's, {a[0]!r} in the target's; a draft needs the target's tokenizer"
            )


@dataclass
class _Seat:
    """One model's row in a cache: slot 0 of its own cache, or (a model drafting for itself)
    a slot of the target's."""

    cached: CachedModel
    slot: int = 0

    def prefill(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        slots = None if self.slot == 0 else [self.slot]
        return self.cached.prefill([tokens], [start], slots)[0]

    def extend(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        slots = None if self.slot == 0 else [self.slot]
        return self.cached.extend([tokens], [start], slots)[0]

    def decode(self, token: int, position: int) -> torch.Tensor:
        slots = None if self.slot == 0 else [self.slot]
        return self.cached.decode([token], [position], slots)[0]


def _fit(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The draft's logits over the target's embedding rows (ids past the tokenizer's are
    padding: cut, or never proposed)."""
    if logits.shape[-1] >= vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat((logits, pad), dim=-1)


def _distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    probs = probabilities(logits, params.temperature, params.top_k, params.top_p).double()
    return probs / probs.sum(-1, keepdim=True)


def propose(
    q_logits: torch.Tensor, vocab: int, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """The draft's next proposal from its logits [V'] over the target's `vocab` ids: the argmax
    when greedy, else a draw from its distribution (returned too, for `verify`)."""
    q = _fit(q_logits[None], vocab)
    if params.temperature <= 0:
        return int(sample(q, 0)[0]), None
    probs = _distribution(q, params)[0]
    return int(draw(probs[None], None if generator is None else [generator])[0]), probs


def verify(
    proposed: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens a verification keeps: the accepted prefix of the k `proposed` tokens, then
    one token of the target's (at the first rejection, or the bonus after all k).
    `draft_probs` [k, V]: the distributions they were drawn from (None when greedy);
    `target_logits` [k+1, V]: the target's after the last kept token and after each proposal."""
    if params.temperature <= 0:
        best = sample(target_logits, 0).tolist()
        n = next((i for i, t in enumerate(proposed) if t != best[i]), len(proposed))
        return [*proposed[:n], best[n]]
    p = _distribution(target_logits, params)
    gens = None if generator is None else [generator]
    for i, t in enumerate(proposed):
        q_t, p_t = float(draft_probs[i, t]), float(p[i, t])
        if p_t >= q_t or float(uniform(1, gens, p.device)[0]) * q_t < p_t:
            continue
        residual = (p[i] - draft_probs[i]).clamp_min(0)
        if not residual.sum() > 0:  # (p == q up to rounding: then p is the residual)
            residual = p[i]
        return [*proposed[:i], int(draw(residual[None], gens)[0])]
    return [*proposed, int(draw(p[-1:], gens)[0])]


def draft_steps(
    model, tokenizer, prompts, params, stop_ids, continuation, results, compile, draft, k
):
    """`generation.generate_steps` with a draft model proposing k tokens a target forward
    (the prompts one after another): the same outputs, one token a yield, and the same
    Completions, each with its `draft_acceptance`. `compile` compiles the draft's decode
    steps and the target's verifications (a graph per k; eager where the target drafts for
    itself, in a second slot of its cache)."""
    if k < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {k}")
    done = []
    for i, prompt in enumerate(prompts):
        seed = None if params.seed is None else params.seed + i
        args = (stop_ids, continuation, compile, k, seed, i)
        done.append((yield from _one_row(model, draft, tokenizer, prompt, params, *args)))
    if results is not None:
        results[:] = done


def _one_row(
    model, draft, tokenizer, prompt, params, stop_ids, continuation, compile, k_max, seed, index
):
    n = len(prompt)
    budget = min(params.max_new_tokens, model.config.max_seq_len - n)
    if n + budget > draft.config.max_seq_len:
        raise ValueError(
            f"prompt {index}: {n} + {budget} tokens pass the draft's context "
            f"({draft.config.max_seq_len}); lower max_new_tokens or use no draft"
        )
    device = model.tok_embeddings.weight.device
    vocab = model.config.vocab_size
    row = RowDecoder(tokenizer, params, stop_ids, continuation, budget, seed, device)
    # a model drafting for itself shares its cache, in a second slot
    same = draft is model
    target_cache = CachedModel(model, 2 if same else 1, n + budget, compile and not same)
    drafter = _Seat(target_cache, 1) if same else None
    proposed_n = accepted_n = 0
    try:
        target = _Seat(target_cache)
        _, prompt_lps = prefill_prompts(target_cache, [prompt], params.echo)
        if drafter is None:
            drafter = _Seat(CachedModel(draft, 1, n + budget, compile))
        q_logits = drafter.prefill(prompt, 0)
        tokens = list(prompt)  # the prompt and the tokens taken
        fed = n  # tokens the draft's cache holds
        while not row.finished:
            # catch the draft up on the tokens it has not seen (the target's last pick, and
            # after a full acceptance its last proposal too)
            for pos in range(fed, len(tokens)):
                q_logits = drafter.decode(tokens[pos], pos)
            fed = len(tokens)
            k = min(k_max, budget - len(row.stream.ids) - 1)
            proposals, q_probs = [], []
            for j in range(k):
                token, probs = propose(q_logits, vocab, params, row.generator)
                proposals.append(token)
                if probs is not None:
                    q_probs.append(probs)
                if j < k - 1:
                    q_logits = drafter.decode(proposals[-1], fed)
                    fed += 1
            # the target: its logits after the last token taken and after each proposal
            logits = target.extend([tokens[-1], *proposals], len(tokens) - 1)
            draft_probs = torch.stack(q_probs) if q_probs else None
            kept = verify(proposals, draft_probs, logits, params, row.generator)
            proposed_n += k
            accepted_n += len(kept) - 1
            # the draft's cache is right up to the first proposal not kept
            fed = min(fed, len(tokens) + len(kept) - 1)
            for j, token in enumerate(kept):
                out = row.add(token, logits[j])
                tokens.append(token)
                yield {index: out}
                if row.finished:
                    break
    finally:
        target_cache.close()
        if not same:
            draft.clear_cache()
    done = row.completion(n, prompt_lps[0])
    done.draft_acceptance = accepted_n / proposed_n if proposed_n else None
    return done
