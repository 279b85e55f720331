"""Reading packed shards: random training windows, chosen by (seed, step) alone, so that a
run resumed at step s draws exactly the batches the uninterrupted run drew, and so that N
processes together draw the same global batch as one."""

from __future__ import annotations

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
        n = self._positions("train", seq_len + 1)
        if n <= 0:
            raise ValueError(f"{self.directory}: fewer than {seq_len + 1} training tokens")
        g = torch.Generator().manual_seed(derive_seed(seed, "batches", step))
        starts = torch.randint(0, n, (batch_size,), generator=g).tolist()
        per = batch_size // parts
        rows = [
            self._window("train", s, seq_len + 1) for s in starts[part * per : (part + 1) * per]
        ]
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]

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
