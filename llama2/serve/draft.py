"""Speculative decoding in the engine (`llama2 serve --draft MODEL`): a draft model with the
target's tokenizer proposes up to k tokens for every running request, and the target verifies
all of them in one batched forward over k+1 positions a row (`speculative.verify`: greedy
exact, Leviathan et al. 2023 acceptance when sampling). Each row accepts its own number of
tokens: cache positions are per slot, so rows advance independently.

The draft keeps a cache of the engine's slots, slot for slot, and the tokens each slot holds
(`held`): before proposing it is caught up on what it has not seen (a new request's prompt,
or only its part past what the slot held for the previous request; after a verification the
target's own token and any proposal it never fed), in one forward for the rows one or two
tokens behind and one per longer row. Positions past what a slot holds are rewritten before
they are read, so neither cache is ever rolled back.

A row's first token comes from its prefill's logits (RowDecoder.step), as without a draft.
After that each iteration takes the row's accepted proposals (RowDecoder.add with the target's
logits at their positions: stop ids, stop strings, logprobs and the budget as usual), then one
token of the target's: at the first rejection the verification's draw, else a step on the
logits after the last proposal. Requests that `echo` their prompt's logprobs, and rows with no
budget left for a proposal, verify no proposal: that is a plain decode step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch

from ..generation import CachedModel
from ..model import Transformer
from ..speculative import propose, verify

CATCH_UP_TOGETHER = 2  # draft catch-ups of at most this many tokens share a forward


def prefills(
    cached: CachedModel,
    rows: Sequence[Sequence[int]],
    starts: Sequence[int],
    slots: Sequence[int],
    together: int,
    every_position: bool = False,
) -> list[torch.Tensor]:
    """`cached.prefill` of each row at its start in its slot -> each row's logits (after its
    last token [V], or after each of its tokens [T, V]). The rows of at most `together` tokens
    share one forward, padded to the widest of them, where that padding stays in the cache;
    every other row has a forward of its own."""
    length = cached.caches[0].k.shape[2]
    short = [i for i, r in enumerate(rows) if len(r) <= together]
    width = max((len(rows[i]) for i in short), default=0)
    group = [i for i in short if starts[i] + width <= length]
    alone = [[i] for i in range(len(rows)) if i not in group]
    out: list[torch.Tensor | None] = [None] * len(rows)
    for batch in ([group] if group else []) + alone:
        logits = cached.prefill(
            [rows[i] for i in batch],
            [starts[i] for i in batch],
            [slots[i] for i in batch],
            every_position,
        )
        for j, i in enumerate(batch):
            out[i] = logits[j, : len(rows[i])] if every_position else logits[j]
    return out


class Speculator:
    """The engine's decode step with a draft model (see the module's docstring)."""

    def __init__(self, engine, draft: Transformer, k: int):
        if k < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {k}")
        if draft.config.max_seq_len < engine.context:
            raise ValueError(
                f"the draft's context ({draft.config.max_seq_len} tokens) is shorter than the "
                f"model's ({engine.context}): a draft must cover the served context"
            )
        if draft is engine.model:  # (its cache is the engine's: drafting needs another)
            draft = copy.deepcopy(draft)
        self.engine, self.k = engine, k
        self.vocab = engine.model.config.vocab_size
        self.cached = CachedModel(draft, engine.max_batch, engine.context)
        self.held: list[list[int]] = [[] for _ in range(engine.max_batch)]

    @property
    def acceptance(self) -> float | None:
        """The share of the draft's proposals accepted so far (None before any)."""
        stats = self.engine.stats
        with stats.lock:
            proposed, accepted = stats.draft_proposed_tokens, stats.draft_accepted_tokens
        return accepted / proposed if proposed else None

    def step(self) -> None:
        eng, now = self.engine, time.perf_counter()
        for s in list(eng.running):
            if not eng.live(s, now) or s.logits is None:
                continue
            try:  # just prefilled: its first token
                eng.deliver(s, s.decoder.step(s.logits), now)
            except Exception as e:
                eng._record(e)
                eng._fail(s, e)
            s.logits = None
        rows = list(eng.running)
        if not rows:
            return
        ks = [self._proposals_for(s) for s in rows]
        try:
            proposals, probs = self._propose(rows, ks)
            logits = prefills(
                eng.step,
                [[s.decoder.last_token, *p] for s, p in zip(rows, proposals, strict=True)],
                [s.pos for s in rows],
                [s.slot for s in rows],
                self.k + 1,
                every_position=True,
            )
        except Exception as e:
            eng._record(e)
            for s in rows:
                eng._fail(s, e)
            return
        for s, p, q, lg in zip(rows, proposals, probs, logits, strict=True):
            try:
                self._take(s, p, q, lg, now)
            except Exception as e:  # this request's sampling or its client's queue
                eng._record(e)
                eng._fail(s, e)

    def _proposals_for(self, s) -> int:
        """How many tokens the draft proposes for this row: none for echo (see echo.py: its
        steps are ServedDecoder's) or structured output (accepted proposals would skip the
        grammar's mask: the row takes plain steps on the target's logits), and never past the
        row's budget."""
        if s.req.params.echo or s.decoder.constraint is not None:
            return 0
        return max(0, min(self.k, s.decoder.budget - len(s.decoder.stream.ids) - 1))

    def _propose(self, rows: list, ks: list[int]) -> tuple[list[list[int]], list[list]]:
        """Each row's proposals (and, when sampling, the draft distributions they were drawn
        from), the draft caught up first on the row's tokens."""
        proposals: list[list[int]] = [[] for _ in rows]
        probs: list[list] = [[] for _ in rows]
        active = [i for i, k in enumerate(ks) if k]
        if not active:
            return proposals, probs
        seqs, starts = {}, []
        for i in active:
            s = rows[i]
            seqs[i] = s.req.prompt + s.decoder.stream.ids
            held, seq = self.held[s.slot], seqs[i]
            n, limit = 0, min(len(held), len(seq) - 1)  # (the last one gives the logits)
            while n < limit and held[n] == seq[n]:
                n += 1
            del held[n:]  # (what the forward overwrites is not held until it is done)
            starts.append(n)
        slots = [rows[i].slot for i in active]
        catch_up = [seqs[i][n:] for i, n in zip(active, starts, strict=True)]
        q = prefills(self.cached, catch_up, starts, slots, CATCH_UP_TOGETHER)
        for i in active:
            self.held[rows[i].slot][:] = seqs[i]
        for j in range(max(ks)):
            for a, i in enumerate(active):
                if ks[i] > j:
                    s = rows[i]
                    token, p = propose(q[a], self.vocab, s.req.params, s.decoder.generator)
                    proposals[i].append(token)
                    probs[i] += [] if p is None else [p]
            feed = [a for a, i in enumerate(active) if ks[i] > j + 1]
            if not feed:
                break
            fed = [proposals[active[a]][-1] for a in feed]
            positions = [len(self.held[slots[a]]) for a in feed]
            logits = self.cached.decode(fed, positions, [slots[a] for a in feed])
            for b, a in enumerate(feed):
                q[a] = logits[b]
                self.held[slots[a]].append(fed[b])
        return proposals, probs

    def _take(self, s, proposed: list[int], probs: list, logits: torch.Tensor, now: float):
        """The row's accepted proposals, then one token of the target's (logits [k+1, V]: the
        target's after its last token and after each proposal)."""
        eng, decoder, k = self.engine, s.decoder, len(proposed)
        n = 0
        if k:
            draft_probs = torch.stack(probs) if probs else None
            kept = verify(proposed, draft_probs, logits, s.req.params, decoder.generator)
            n = len(kept) - 1
        with eng.stats.lock:
            eng.stats.draft_proposed_tokens += k
            eng.stats.draft_accepted_tokens += n
        # the target's cache holds the row's last token and the accepted proposals
        eng.slot_tokens[s.slot] += [decoder.last_token, *proposed[:n]]
        s.pos += 1 + n
        for j in range(n):
            eng.deliver(s, decoder.add(proposed[j], logits[j]), now)
            if decoder.finished:
                return
        # all accepted: the bonus token is a step on the target's last logits (the draw from
        # the same distribution that verify made); else the draw from the residual
        out = decoder.step(logits[n]) if n == k else decoder.add(kept[-1], logits[n])
        eng.deliver(s, out, now)
