"""Meta's layout: params.json and consolidated.NN.pth, one file per model-parallel shard, with
each head's q/k rows in interleaved rotary order."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelConfig
from ..io import atomic_dir
from ..tokenizer import Tokenizer
from .common import (
    Checkpoint,
    cast,
    dtype_name,
    expected_names,
    meta_to_ours,
    ours_to_meta,
    parse_dtype,
    permute_qk,
    read_json,
    read_tokenizer,
    require_float,
    safe_torch_load,
)


def read(path: Path) -> Checkpoint:
    config, shards, parts = _parts(path)
    n = len(parts)
    sd = {}
    for name in parts[0]:
        for i, p in enumerate(parts[1:], 1):
            if name not in p:
                raise ValueError(f"{shards[i]}: missing {name}")
        if n == 1 or parts[0][name].ndim == 1:
            sd[name] = parts[0][name]
            continue
        dim = _split_dim(name)
        for i, p in enumerate(parts[1:], 1):
            want = parts[0][name].shape[1 - dim]
            if p[name].ndim != 2 or p[name].shape[1 - dim] != want:
                raise ValueError(
                    f"{shards[i]}: {name} has shape {tuple(p[name].shape)}, but shard 0's is "
                    f"{tuple(parts[0][name].shape)} (shards join on dim {dim})"
                )
        sd[name] = torch.cat([p[name] for p in parts], dim=dim)
    sd = permute_qk(sd, config, meta_to_ours)
    return Checkpoint(config, sd, read_tokenizer(path), "meta")


def describe(path: Path) -> tuple[ModelConfig, list[tuple[str, tuple]], Tokenizer | None]:
    """The config, (dtype name, shape) of every stored tensor (shards not joined), and the
    tokenizer."""
    config, _, parts = _parts(path)
    stored = []
    for i, part in enumerate(parts):
        for t in part.values():
            if t.ndim > 1 or i == 0:  # norms are replicated in every shard
                stored.append((dtype_name(t.dtype), t.shape))
    return config, stored, read_tokenizer(path)


def _parts(path: Path) -> tuple[ModelConfig, list[Path], list[dict[str, torch.Tensor]]]:
    """The config and each shard's tensors (memory-mapped, not yet joined)."""
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ValueError(f"{path}: params.json but no consolidated.*.pth shards")
    parts = [safe_torch_load(f) for f in shards]
    parts = [{k: v for k, v in p.items() if k != "rope.freqs"} for p in parts]  # derived buffer
    if "tok_embeddings.weight" not in parts[0]:
        raise ValueError(f"{shards[0]}: no tok_embeddings.weight")
    config = ModelConfig.from_meta_params(
        read_json(path / "params.json"),
        vocab_size=parts[0]["tok_embeddings.weight"].shape[0],
        source=str(path / "params.json"),
    )
    return config, shards, parts


def _split_dim(name: str) -> int:
    """Model-parallel shards split column-parallel layers on dim 0, row-parallel ones on dim 1."""
    if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
        return 1
    return 0


def save_meta(
    dst: str | Path,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    shards: int = 1,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write Meta's layout: params.json, consolidated.NN.pth (model-parallel shards)."""
    dtype = parse_dtype(dtype)
    require_float(state_dict, "Meta")
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "dim": config.dim}
    sizes |= {"hidden_dim": config.hidden_dim, "vocab_size": config.vocab_size}
    if config.rope_scaling is not None:
        raise ValueError(
            "Meta's params.json has no field for RoPE scaling; keep this model in HF form"
        )
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, not {shards}")
    bad = [f"{k}={v}" for k, v in sizes.items() if v % shards]
    if bad:
        raise ValueError(
            f"cannot split into {shards} model-parallel shards: {', '.join(bad)} not divisible"
        )
    sd = permute_qk({n: state_dict[n] for n in expected_names(config)}, config, ours_to_meta)
    with atomic_dir(dst, overwrite) as tmp:
        for i in range(shards):
            part = {}
            for name, t in sd.items():
                if t.ndim > 1:
                    t = t.chunk(shards, dim=_split_dim(name))[i]
                t = cast(t, dtype)
                # torch.save writes a view's whole storage: copy only slices of a bigger one
                part[name] = t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
            torch.save(part, tmp / f"consolidated.{i:02d}.pth")
            del part
        (tmp / "params.json").write_text(json.dumps(config.to_meta_params(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.model")
    return Path(dst)
