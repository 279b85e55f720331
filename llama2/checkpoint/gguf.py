"""GGUF files as llama.cpp's `llama` architecture runs them: the model and its tokenizer in one
file, q/k rows in Meta's interleaved order, norms in f32, matrices in f32, f16 or q8_0."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..config import REQUIRED, ModelConfig, number
from ..gguf_format import GGMLType, GGUFError, T, quantize_q8_0, read_gguf, read_tensor, write_gguf
from ..tokenizer import Tokenizer
from .common import (
    Checkpoint,
    expected_names,
    meta_to_ours,
    ours_to_meta,
    permute_qk,
    require_float,
    to_gguf_name,
)

GGUF_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}
_FILE_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q8_0: 7}  # general.file_type


def read(path: Path) -> Checkpoint:
    meta, tensors = read_gguf(path)
    config = _config(path, meta, tensors)
    gguf_to_ours = {to_gguf_name(n): n for n in expected_names(config)}
    sd = {}
    for name, (shape, gtype, offset) in tensors.items():
        if name not in gguf_to_ours:
            raise GGUFError(f"{path}: unexpected tensor {name}")
        sd[gguf_to_ours[name]] = torch.from_numpy(read_tensor(path, shape, gtype, offset))
    sd = permute_qk(sd, config, meta_to_ours)
    return Checkpoint(config, sd, _tokenizer(path, meta), "gguf")


def describe(path: Path) -> tuple[ModelConfig, list[tuple[str, tuple]], Tokenizer | None]:
    """The config, (GGML type name, shape) of every tensor, and the tokenizer, from the header."""
    meta, tensors = read_gguf(path)
    stored = [(gtype.name.lower(), shape) for shape, gtype, _ in tensors.values()]
    return _config(path, meta, tensors), stored, _tokenizer(path, meta)


def _tokenizer(path: Path, meta: dict) -> Tokenizer | None:
    return Tokenizer.from_gguf(path) if "tokenizer.ggml.tokens" in meta else None


def _config(path: Path, meta: dict, tensors: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}, expected 'llama'")

    def get(key, kind=int, default=REQUIRED):
        return number(meta, f"llama.{key}", kind, str(path), default)

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    # as llama.cpp reads it: the type defaults to linear; older files use rope.scale_linear
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    kind = meta.get("llama.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        raise GGUFError(f"{path}: RoPE scaling type {kind!r} is not supported")
    if factor is not None:
        factor = number(
            {"llama.rope.scaling.factor": factor}, "llama.rope.scaling.factor", float, str(path)
        )
    scaling = factor if kind == "linear" and factor not in (None, 0.0, 1.0) else None
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list):
            raise GGUFError(f"{path}: tokenizer.ggml.tokens must be an array of strings")
        vocab = len(tokens)
    elif "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"][0][0]
    else:
        raise GGUFError(
            f"{path}: neither tokenizer.ggml.tokens nor token_embd.weight to size the vocabulary"
        )
    args = dict(
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", int, n_heads),
        vocab_size=vocab,
        hidden_dim=get("feed_forward_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon", float),
        rope_theta=get("rope.freq_base", float, 10000.0),
        rope_scaling=scaling,
        max_seq_len=get("context_length"),
    )
    try:
        config = ModelConfig(**args)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from e
    if config.n_layers > len(tensors):  # (a corrupt count would list billions of tensor names)
        raise GGUFError(
            f"{path}: llama.block_count is {config.n_layers}, but the file holds only "
            f"{len(tensors)} tensors"
        )
    return config


def save_gguf(
    dst: str | Path,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer,
    gguf_type: str = "f16",
    name: str = "llama2",
    overwrite: bool = False,
) -> Path:
    """One GGUF file with the model and its tokenizer, in the layout llama.cpp's `llama`
    architecture runs: q/k in Meta's interleaved order, norms in f32."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise ValueError("a GGUF file needs the tokenizer: the checkpoint has no tokenizer.model")
    require_float(state_dict, "GGUF")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces, model vocab is {config.vocab_size}"
        )
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} already exists")
    gtype = GGUF_TYPES[gguf_type]
    pieces = tokenizer.pieces()
    u32, f32 = T.UINT32, T.FLOAT32
    meta = {
        "general.architecture": (T.STRING, "llama"),
        "general.name": (T.STRING, name),
        "general.file_type": (u32, _FILE_TYPE[gtype]),
        "general.alignment": (u32, 32),
        "llama.context_length": (u32, config.max_seq_len),
        "llama.embedding_length": (u32, config.dim),
        "llama.block_count": (u32, config.n_layers),
        "llama.feed_forward_length": (u32, config.hidden_dim),
        "llama.rope.dimension_count": (u32, config.head_dim),
        "llama.attention.head_count": (u32, config.n_heads),
        "llama.attention.head_count_kv": (u32, config.n_kv_heads),
        "llama.attention.layer_norm_rms_epsilon": (f32, config.norm_eps),
        "llama.rope.freq_base": (f32, config.rope_theta),
        "llama.vocab_size": (u32, config.vocab_size),
    }
    if config.rope_scaling is not None:
        meta["llama.rope.scaling.type"] = (T.STRING, "linear")
        meta["llama.rope.scaling.factor"] = (f32, config.rope_scaling)
    meta |= {
        "tokenizer.ggml.model": (T.STRING, "llama"),
        "tokenizer.ggml.tokens": (T.ARRAY, (T.STRING, [p for p, _, _ in pieces])),
        "tokenizer.ggml.scores": (T.ARRAY, (f32, [s for _, s, _ in pieces])),
        "tokenizer.ggml.token_type": (T.ARRAY, (T.INT32, [t for _, _, t in pieces])),
        "tokenizer.ggml.bos_token_id": (u32, tokenizer.bos_id),
        "tokenizer.ggml.eos_token_id": (u32, tokenizer.eos_id),
        "tokenizer.ggml.unknown_token_id": (u32, tokenizer.unk_id),
        "tokenizer.ggml.add_bos_token": (T.BOOL, True),
        "tokenizer.ggml.add_eos_token": (T.BOOL, False),
    }
    sd = permute_qk({n: state_dict[n] for n in expected_names(config)}, config, ours_to_meta)
    tensors = []
    for n, t in sd.items():
        # llama.cpp keeps 1-D tensors in f32; q8_0 needs rows in whole blocks of 32.
        tt = GGMLType.F32 if t.ndim == 1 else gtype
        if tt == GGMLType.Q8_0 and t.shape[-1] % 32:
            tt = GGMLType.F16
        tensors.append((to_gguf_name(n), tuple(t.shape), tt, _payload(t, tt)))
    write_gguf(dst, meta, tensors)
    return dst


def _payload(t: torch.Tensor, gtype: GGMLType) -> Callable[[], np.ndarray]:
    """The tensor's bytes as `gtype`, made only when written (bounded memory)."""

    def make() -> np.ndarray:
        x = t.detach().float().cpu().numpy()
        if gtype == GGMLType.F32:
            return x
        if gtype == GGMLType.F16:
            return x.astype(np.float16)
        return quantize_q8_0(x)

    return make
