"""Two rules every stage shares: which examples are held out for evaluation, and the seed of
each random stream of a run (batches, epochs, rollouts, samples), derived from its one seed."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

HELD_OUT_EVERY = 10  # one example in ten is held out


def held_out(i: int) -> bool:
    """Whether example i (0-based, in file order) is held out: the 10th, 20th, ..."""
    return i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def split_held_out(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """(training, held-out) items; fewer than ten items hold none out."""
    train = [x for i, x in enumerate(items) if not held_out(i)]
    held = [x for i, x in enumerate(items) if held_out(i)]
    return train, held


def derive_seed(seed: int, stream: str, *index: int) -> int:
    """The seed of one random stream (named, e.g. "batches") at one index (a step, an epoch)
    of a run seeded with `seed`. A function of its arguments alone, so a resumed run draws
    what the uninterrupted one drew; distinct streams and indices get unrelated seeds. Below
    2**62, so that consecutive seeds (one per row) stay valid for torch generators."""
    key = repr((seed, stream, *index)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2
