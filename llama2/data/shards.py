"""Reading packed shards: random training windows, chosen by (seed, step) alone, so that a
run resumed at step s draws exactly the batches the uninterrupted run drew, and so that N
processes together draw the same global batch as one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..io import read_json
from .split import derive_seed


class PackedShards:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise ValueError(f"{self.directory}: no manifest.json (run `llama2 data prepare`)")
        self.manifest = read_json(manifest_path)
        self.splits = {}
        try:  # a manifest not written by prepare_corpus (edited, cut) or a shard gone
            dtype = np.dtype(self.manifest["dtype"])
            if not isinstance(self.manifest["tokenizer_sha256"], str):
                raise TypeError("tokenizer_sha256 is not text")
            for split in ("train", "val"):
                self.splits[split] = [
                    np.memmap(self.directory / s["file"], dtype=dtype, mode="r")
                    if (self.directory / s["file"]).stat().st_size
                    else np.zeros(0, dtype)
                    for s in self.manifest[split]["shards"]
                ]
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ValueError(
                f"{manifest_path}: not a manifest of `llama2 data prepare` or a shard is "
                f"missing ({type(e).__name__}: {e})"
            ) from e
        self._bounds: dict[int, np.ndarray] = {}  # training documents' starts, by shard

    def tokens(self, split: str) -> int:
        return sum(len(p) for p in self.splits[split])

    def _window(self, split: str, index: int, length: int) -> np.ndarray:
        """`length` tokens starting at global position `index` of the split (within a shard)."""
        for part in self.splits[split]:
            if index < len(part) - length:
                return np.asarray(part[index : index + length], dtype=np.int64)
            index -= max(len(part) - length, 0)
        raise IndexError(index)

    def _positions(self, split: str, length: int) -> int:
        return sum(max(len(p) - length, 0) for p in self.splits[split])

    def batch(
        self, step: int, batch_size: int, seq_len: int, seed: int = 0, part: int = 0, parts: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice `part` of `parts` of the global batch of `step` (one process's micro-batch):
        (inputs, targets), each [batch_size // parts, seq_len]. However a step's batch is cut
        (processes, accumulation), its rows are the same."""
        starts = self._starts(step, batch_size, seq_len, seed)
        per = batch_size // parts
        rows = [
            self._window("train", s, seq_len + 1) for s in starts[part * per : (part + 1) * per]
        ]
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]

    def _starts(self, step: int, batch_size: int, seq_len: int, seed: int) -> list[int]:
        """The first token of each row of the global batch of `step`."""
        n = self._positions("train", seq_len + 1)
        if n <= 0:
            raise ValueError(f"{self.directory}: fewer than {seq_len + 1} training tokens")
        g = torch.Generator().manual_seed(derive_seed(seed, "batches", step))
        return torch.randint(0, n, (batch_size,), generator=g).tolist()

    def transformed_batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
        seed: int = 0,
        part: int = 0,
        parts: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `batch`, with every document passed through `transform` (the FIM layout) before
        packing: a row starts at the same offset of the (transformed) document holding the
        plain row's first token, and goes on through the documents after it. A document's
        transformation needs the whole document, so rows are rebuilt from documents rather
        than cut from the stream. Row r's generator is seeded with (seed, step, r) alone."""
        starts = self._starts(step, batch_size, seq_len, seed)
        per = batch_size // parts
        rows = []
        for r in range(part * per, (part + 1) * per):
            rng = np.random.default_rng(derive_seed(seed, "documents", step, r))
            rows.append(self._document_row(starts[r], seq_len + 1, transform, rng))
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]

    def _doc_starts(self, shard: int) -> np.ndarray:
        """Where each training document of a shard starts (its BOS; 0 for a headless start)."""
        if shard not in self._bounds:
            starts = np.flatnonzero(self.splits["train"][shard] == self.manifest["bos_id"])
            if not len(starts) or starts[0] != 0:
                starts = np.concatenate([[0], starts])
            self._bounds[shard] = starts
        return self._bounds[shard]

    def _document_row(self, index: int, length: int, transform, rng) -> np.ndarray:
        shards = self.splits["train"]
        shard = 0
        while index >= len(shards[shard]) - length:  # the shard of the window (as _window)
            index -= max(len(shards[shard]) - length, 0)
            shard += 1
        doc = int(np.searchsorted(self._doc_starts(shard), index, side="right")) - 1
        offset = index - int(self._doc_starts(shard)[doc])
        pieces, have = [], 0
        while have < length:
            bounds = self._doc_starts(shard)
            end = bounds[doc + 1] if doc + 1 < len(bounds) else len(shards[shard])
            ids = transform(np.asarray(shards[shard][bounds[doc] : end], dtype=np.int64), rng)
            ids = ids[min(offset, len(ids) - 1) :]
            pieces.append(ids)
            have += len(ids)
            offset = 0
            doc += 1
            if doc == len(bounds):  # on into the next shard, the first after the last
                shard, doc = (shard + 1) % len(shards), 0
        return np.concatenate(pieces)[:length]

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int, rank: int = 0, world: int = 1
    ):
        """Fixed, non-overlapping validation windows (the same every evaluation)."""
        n = self._positions("val", seq_len + 1)
        count = min(max_batches * batch_size * world, n // (seq_len + 1))
        count -= count % (batch_size * world)  # every rank runs as many batches (collectives)
        starts = [i * (seq_len + 1) for i in range(count)]
        starts = starts[rank::world]
        for i in range(0, len(starts), batch_size):
            rows = [self._window("val", s, seq_len + 1) for s in starts[i : i + batch_size]]
            data = torch.from_numpy(np.stack(rows))
            yield data[:, :-1], data[:, 1:]
