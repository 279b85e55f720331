"""The prompt's log-probabilities, for text completions that ask for `echo` with `logprobs`
(what lm-evaluation-harness's `local-completions` model sends to score a continuation).

The engine prefills such a request's prompt from its first token (a cached prefix would leave
positions without logits) and with the logits of every position, chunk by chunk; each chunk's
rows give the entries of the prompt tokens they predict. Its decoding then reports the stop id
that ends it too (the vLLM convention that lm-eval relies on: it drops the last entry as the
generated token), and may be asked for no new token at all (`max_tokens: 0`: only the prompt
is scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..generation import Completion, RowDecoder, StepOutput
from ..sampling import TokenLogprob, sample, token_logprob


@dataclass
class EchoCompletion(Completion):
    """A completion with its prompt tokens' entries (the first token's None)."""

    prompt_entries: list[TokenLogprob | None] = field(default_factory=list)


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprob]:
    """The entries of `targets`, logits[i] [V] being the row before targets[i] (rows past the
    targets are not read), with each row's k most likely tokens. The chosen token's logprob and
    the top ones are read from the same tensor, so a greedy token's equals the top one's."""
    if not targets:
        return []
    lp = logits[: len(targets)].float().log_softmax(-1)
    ids = torch.tensor(list(targets), device=lp.device)
    chosen = lp.gather(-1, ids[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in targets]
    if k:
        values, top_ids = lp.topk(k, dim=-1)
        rows = zip(top_ids.tolist(), values.tolist(), strict=True)
        tops = [list(zip(i, v, strict=True)) for i, v in rows]
    return [TokenLogprob(t, c, top) for t, c, top in zip(targets, chosen, tops, strict=True)]


class ServedDecoder(RowDecoder):
    """RowDecoder as the engine runs it. With `prompt` (the prompt's entries, filled while the
    prompt is prefilled), the answer is an EchoCompletion and the stop id that ends it has its
    entry too; a budget of 0 ends at the first step without drawing a token."""

    def __init__(self, *args, prompt: list[TokenLogprob | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt = prompt

    def step(self, logits: torch.Tensor) -> StepOutput:
        if self.finished:  # (no token was asked for)
            return StepOutput(None, "", self.finish_reason)
        state = None
        if self.prompt is not None and self.generator is not None:
            state = self.generator.get_state()
        out = super().step(logits)
        if self.prompt is not None and out.token_id is None:  # a stop id, which has no entry
            self.logprobs.append(self._drawn(logits, state))
        return out

    def _drawn(self, logits: torch.Tensor, state: torch.Tensor | None) -> TokenLogprob:
        """The entry of the token the last step drew, drawn again from the generator's state
        before it (the same draw)."""
        p, generators = self.params, None
        if state is not None:
            generators = [torch.Generator(device=logits.device)]
            generators[0].set_state(state)
        token = int(sample(logits[None], p.temperature, p.top_k, p.top_p, generators)[0])
        return token_logprob(logits, token, p.logprobs or 0)

    def completion(
        self, prompt_tokens: int, prompt_logprobs: list[float | None] | None = None
    ) -> Completion:
        done = super().completion(prompt_tokens, prompt_logprobs)
        if self.prompt is None:
            return done
        floats = [None if e is None else e.logprob for e in self.prompt]
        return EchoCompletion(
            **vars(done) | {"prompt_logprobs": floats}, prompt_entries=self.prompt
        )
