"""Hugging Face Llama directories, our own on-disk format: config.json, model*.safetensors (or
an old export's pytorch_model*.bin), tokenizer.model and transformers' tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..formats import INFILL_PIECES
from ..io import atomic_dir
from ..tokenizer import Tokenizer
from .common import (
    Checkpoint,
    cast,
    dtype_name,
    expected_names,
    param_shapes,
    parse_dtype,
    read_json,
    read_tokenizer,
    safe_torch_load,
    to_hf_name,
)

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read(path: Path) -> Checkpoint:
    file = path / "config.json"
    hf = read_json(file)  # the one parse: quantization, head and config all come from it
    quant = _quantization(hf, file)
    head = _head(hf, file)
    config = ModelConfig.from_hf_config(hf, str(file))
    hf_to_ours = {to_hf_name(n, head): n for n in expected_names(config, quant)}
    sd = {}
    for weights in _weight_files(path):
        for hf_name, tensor in _iter_tensors(weights):
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some old exports carry
            if hf_name not in hf_to_ours:
                raise ValueError(f"{weights}: unexpected tensor {hf_name}")
            sd[hf_to_ours[hf_name]] = tensor
    return Checkpoint(config, sd, read_tokenizer(path), "hf", quant, head)


def describe(path: Path) -> tuple[ModelConfig, list[tuple[str, tuple]], Tokenizer | None]:
    """The config, (dtype name, shape) of every stored tensor, and the tokenizer; tensors are
    read from the safetensors headers only."""
    file = path / "config.json"
    config = ModelConfig.from_hf_config(read_json(file), str(file))
    stored = []
    for weights in _weight_files(path):
        if weights.suffix != ".safetensors":
            stored += [(dtype_name(t.dtype), t.shape) for t in safe_torch_load(weights).values()]
            continue
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = sl.get_dtype()
                stored.append((_SAFETENSORS_DTYPES.get(dtype, dtype), sl.get_shape()))
    return config, stored, read_tokenizer(path)


def _head(hf: dict, file: Path) -> str:
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if architectures[0] == "LlamaForSequenceClassification":
        return "score"
    if architectures[0] != "LlamaForCausalLM":
        raise ValueError(f"{file}: architecture {architectures[0]} is not supported")
    return "lm"


def _quantization(hf: dict, file: Path) -> dict | None:
    quant = hf.get("quantization_config")
    if quant is None:
        return None
    from ..quantize import MODES

    if quant.get("quant_method") != "llama2" or quant.get("mode") not in MODES:
        raise ValueError(f"{file}: unsupported quantization_config {quant}")
    return quant


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{path}: no model.safetensors, index or pytorch_model*.bin found")
    return files


def _iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            if isinstance(e, ValueError) and str(file) in str(e):
                raise
            raise ValueError(f"{file}: cannot read safetensors: {e}") from e
    else:
        yield from safe_torch_load(file).items()


def save_hf(
    dst: str | Path,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    quantization: dict | None = None,
    head: str = "lm",
) -> Path:
    """Write a Hugging Face Llama directory that transformers, vLLM and llama.cpp open as is
    (a quantized one, with `quantization`, only llama2.load reads). head "score": a reward
    model, which transformers opens as LlamaForSequenceClassification."""
    dtype = parse_dtype(dtype)
    names = expected_names(config, quantization)
    out_dtype = dtype or state_dict["tok_embeddings.weight"].dtype
    # sizes from the config's shapes: with `dtype` given, each tensor is touched once, when its
    # shard is written (so a lazy mapping of tensors is written in bounded memory)
    shapes = param_shapes(config, quantization, head)

    def stored_dtype(n: str) -> torch.dtype:
        keep = quantization is not None and not n.endswith("norm.weight") and "tok_emb" not in n
        return state_dict[n].dtype if dtype is None or keep else dtype

    nbytes = {n: shapes[n].numel() * stored_dtype(n).itemsize for n in names}
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + nbytes[n] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes[n]
    with atomic_dir(dst, overwrite) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            tensors = {to_hf_name(n, head): cast(state_dict[n], stored_dtype(n)) for n in shard}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = config.to_hf_config(dtype=dtype_name(out_dtype))
        if quantization is not None:
            hf["quantization_config"] = quantization
        if head == "score":  # last non-pad token's score; unk (0) never occurs in text
            hf |= {
                "architectures": ["LlamaForSequenceClassification"],
                "num_labels": 1,
                "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0},
                "pad_token_id": 0,
            }
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        gen = {"bos_token_id": 1, "eos_token_id": 2, "max_length": config.max_seq_len}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer, config)
    return Path(dst)


def _write_tokenizer(d: Path, tokenizer: Tokenizer, config: ModelConfig) -> None:
    """tokenizer.model and the files transformers' LlamaTokenizer reads beside it."""
    tokenizer.save(d / "tokenizer.model")
    piece = tokenizer.id_to_piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id)}
    special["unk_token"] = piece(tokenizer.unk_id)
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_seq_len,
        "sp_model_kwargs": {},
    }
    if all(tokenizer.piece_to_id(p) != tokenizer.unk_id for p in INFILL_PIECES.values()):
        # as Code Llama ships it: transformers' CodeLlamaTokenizer lays out infilling prompts
        # (`tok(prefix, suffix=...)`) and keeps the pieces whole
        cfg["tokenizer_class"] = "CodeLlamaTokenizer"
        cfg |= {f"{name}_token": piece for name, piece in INFILL_PIECES.items()}
        cfg["fill_token"] = "<FILL_ME>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
