"""Checkpoints on disk: Hugging Face Llama directories (our own format), Meta's
consolidated.NN.pth shards, and GGUF files; one module per layout (`hf`, `meta`, `gguf`), each
with its read, write and describe, and what they share in `common`.

Everything is read into one in-memory form, a state dict with `model.py`'s names and layout
(`read_checkpoint`), and written from it. Reads are lazy: safetensors and `.pth` files are
memory-mapped and only tensors are unpickled (`weights_only=True`). Writes go through `io.py`,
so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import gguf, hf, meta
from .common import (
    DTYPES,
    Checkpoint,
    StateDict,
    check_state_dict,
    detect_layout,
    dtype_name,
    empty_model,
    expected_names,
    meta_to_ours,
    ours_to_meta,
    parse_dtype,
    safe_torch_load,
    to_gguf_name,
    to_hf_name,
)
from .gguf import GGUF_TYPES, save_gguf
from .hf import save_hf
from .meta import save_meta

_LAYOUTS = {"hf": hf, "meta": meta, "gguf": gguf}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint in any layout, as our state dict (lazily loaded), config and tokenizer;
    tensors missing, unexpected or of the wrong shape for the config are named."""
    path = Path(path)
    ckpt = _LAYOUTS[detect_layout(path)].read(path)
    check_state_dict(ckpt.state_dict, ckpt.config, path, ckpt.quantization, ckpt.head)
    return ckpt


def describe(path: str | Path) -> dict:
    """Layout, config, parameter count and stored dtypes, from headers only: no tensor is
    joined, permuted or dequantized, so it is cheap for a 70B checkpoint too."""
    path = Path(path)
    layout = detect_layout(path)
    config, stored, tokenizer = _LAYOUTS[layout].describe(path)
    numel: dict[str, int] = {}  # dtype name -> parameters stored in it
    for dtype, shape in stored:
        numel[dtype] = numel.get(dtype, 0) + math.prod(shape)
    files = [path] if path.is_file() else path.rglob("*")
    return {
        "path": str(path),
        "layout": layout,
        "config": dict(vars(config)),
        "parameters": sum(numel.values()),
        "dtypes": numel,
        "size_on_disk": sum(p.stat().st_size for p in files if p.is_file()),
        "tokenizer": None if tokenizer is None else {"vocab_size": tokenizer.vocab_size},
    }


__all__ = [
    "DTYPES",
    "GGUF_TYPES",
    "Checkpoint",
    "StateDict",
    "describe",
    "detect_layout",
    "dtype_name",
    "empty_model",
    "expected_names",
    "meta_to_ours",
    "ours_to_meta",
    "parse_dtype",
    "read_checkpoint",
    "safe_torch_load",
    "save_gguf",
    "save_hf",
    "save_meta",
    "to_gguf_name",
    "to_hf_name",
]
