"""The prefix pool: keys and values of prompt prefixes, kept in blocks so that requests which
start alike (a shared system prompt) skip recomputing them, in bounded memory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

PREFIX_BLOCK = 16  # tokens per block of the prefix pool


class PrefixPool:
    """Keys and values of prompt prefixes in whole blocks of PREFIX_BLOCK tokens, at most
    `n_blocks` of them (bounded memory), shared by every slot. A block is found by the hash of
    its tokens and of its parent block's key (so one key stands for all tokens up to the
    block's end) and checked against both; the least recently used block goes first when
    the pool is full, and a lookup touches a chain from its end back to its start, so a
    prefix outlives the blocks that continue it."""

    def __init__(self, caches: Sequence, n_blocks: int, block: int = PREFIX_BLOCK):
        if n_blocks < 1:
            raise ValueError(f"the prefix pool needs at least 1 block, got {n_blocks}")
        _, heads, _, head_dim = caches[0].k.shape
        like = caches[0].k
        shape = (n_blocks, heads, block, head_dim)
        self.k = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in caches]
        self.v = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in caches]
        self.block = block
        # key -> (block index, parent key, the block's tokens), least recently used first
        self.entries: OrderedDict[int, tuple[int, int, tuple[int, ...]]] = OrderedDict()
        self.free = list(range(n_blocks))
        self.evictions = 0
        self.hit_tokens = 0  # prompt tokens taken from the pool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _chain(self, tokens: Sequence[int], n: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """(key, parent key, tokens) of the first n whole blocks."""
        out, parent, b = [], 0, self.block
        for i in range(n):
            t = tuple(tokens[i * b : (i + 1) * b])
            key = hash((parent, t))
            out.append((key, parent, t))
            parent = key
        return out

    def _held(self, key: int, parent: int, t: tuple[int, ...]) -> bool:
        e = self.entries.get(key)
        return e is not None and e[1] == parent and e[2] == t

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):  # the chain's start ends up the most recently used
            self.entries.move_to_end(key)

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Block indices of the longest pooled prefix of tokens[:limit] (whole blocks)."""
        keys = []
        for key, parent, t in self._chain(tokens, limit // self.block):
            if not self._held(key, parent, t):
                break
            keys.append(key)
        self._touch(keys)
        return [self.entries[k][0] for k in keys]

    def load(self, caches: Sequence, slot: int, blocks: list[int]) -> None:
        """Copy pooled blocks into positions 0.. of a slot's cache rows."""
        n, idx = len(blocks) * self.block, torch.tensor(blocks, device=self.k[0].device)
        for cache, k, v in zip(caches, self.k, self.v, strict=True):
            # [blocks, H, block, hd] -> [H, blocks * block, hd]
            cache.k[slot, :, :n] = k[idx].transpose(0, 1).flatten(1, 2)
            cache.v[slot, :, :n] = v[idx].transpose(0, 1).flatten(1, 2)
        self.hit_tokens += n

    def store(self, caches: Sequence, slot: int, tokens: Sequence[int]) -> None:
        """Pool the whole blocks of `tokens`, which the slot's cache rows hold from position 0
        (those pooled already are only touched)."""
        chain = self._chain(tokens, len(tokens) // self.block)
        held = [key for key, parent, t in chain if self._held(key, parent, t)]
        self._touch(held)  # (so that storing the rest does not evict them)
        ours = set(held)
        for i, (key, parent, t) in enumerate(chain):
            if key in ours:
                continue
            if key in self.entries:  # a hash shared with other tokens: keep what is there
                break
            if not self.free:
                lru = next(iter(self.entries))
                if lru in ours:  # the pool holds nothing but this prompt
                    break
                self.free.append(self.entries.pop(lru)[0])
                self.evictions += 1
            index = self.free.pop()
            lo = i * self.block
            for cache, k, v in zip(caches, self.k, self.v, strict=True):
                k[index] = cache.k[slot, :, lo : lo + self.block]
                v[index] = cache.v[slot, :, lo : lo + self.block]
            self.entries[key] = (index, parent, t)
            ours.add(key)
        self._touch([key for key, _, _ in chain if key in ours])
