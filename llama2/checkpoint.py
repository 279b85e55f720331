"""Checkpoints on disk: Hugging Face Llama directories (our own format), Meta's
consolidated.NN.pth shards, and GGUF files.

Everything is read into one in-memory form, a state dict with `model.py`'s names and layout
(`read_checkpoint`), and written from it. Reads are lazy: safetensors and `.pth` files are
memory-mapped and only tensors are unpickled (`weights_only=True`). Writes go to a temporary
sibling directory that is renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .gguf_file import GGMLType, GGUFError, T, quantize_q8_0, read_gguf, read_tensor, write_gguf
from .kernels import Linear
from .model import Transformer
from .tokenizer import Tokenizer

StateDict = dict[str, torch.Tensor]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- names and layouts ---------------------------------------------------------------------

_HF_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|scales|zeros)$")


def _rename(name: str, top: dict, layer: dict, layer_prefix: str) -> str:
    m = _LAYER_RE.match(name)
    if m:
        return f"{layer_prefix}.{m[1]}.{layer[m[2]]}.{m[3]}"
    module, kind = name.rsplit(".", 1)
    return f"{top[module]}.{kind}"


def to_hf_name(name: str, head: str = "lm") -> str:
    """Our name -> HF's. head "score": a reward model's scalar head, as transformers'
    LlamaForSequenceClassification names it."""
    top = _HF_TOP if head == "lm" else {**_HF_TOP, "output": "score"}
    return _rename(name, top, _HF_LAYER, "model.layers")


def to_gguf_name(name: str) -> str:
    return _rename(name, _GGUF_TOP, _GGUF_LAYER, "blk")


def expected_names(cfg: ModelConfig, quantization: dict | None = None) -> list[str]:
    """Every tensor name, in file order (a reward model's head has the same name, `output`)."""
    if quantization is not None:
        return list(_param_shapes(cfg, quantization))
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.{part}.weight" for part in _HF_LAYER]
    return names + ["norm.weight", "output.weight"]


def meta_to_ours(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's wq/wk rows hold each head's rotary pairs interleaved (x0,x1),(x2,x3)...; ours (as
    HF's) hold the first elements of all pairs, then the second ones."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def ours_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_qk(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, fn) -> StateDict:
    out = dict(sd)
    for i in range(cfg.n_layers):
        for part, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            key = f"layers.{i}.attention.{part}.weight"
            if key in out:  # (a missing tensor is reported by _check_state_dict)
                out[key] = fn(out[key], heads)
    return out


# --- reading -------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: StateDict  # our names and layout; tensors may be memory-mapped
    tokenizer: Tokenizer | None
    layout: str  # "hf", "meta" or "gguf"
    quantization: dict | None = None  # {"quant_method": "llama2", "mode": "int8" | "int4", ...}
    head: str = "lm"  # "lm" (next-token logits) or "score" (a reward model's scalar)


def detect_layout(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ValueError(f"{path}: a file that is not GGUF; give a checkpoint directory")
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint directory or file")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    raise ValueError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    layout = detect_layout(path)
    quant = _hf_quantization(path) if layout == "hf" else None
    head = _hf_head(path) if layout == "hf" else "lm"
    reader = {"hf": _read_hf, "meta": _read_meta, "gguf": _read_gguf}[layout]
    config, sd, tokenizer = reader(path)
    _check_state_dict(sd, config, path, quant, head)
    return Checkpoint(config, sd, tokenizer, layout, quant, head)


def _hf_head(path: Path) -> str:
    architectures = _read_json(path / "config.json").get("architectures") or ["LlamaForCausalLM"]
    if architectures[0] == "LlamaForSequenceClassification":
        return "score"
    if architectures[0] != "LlamaForCausalLM":
        raise ValueError(
            f"{path / 'config.json'}: architecture {architectures[0]} is not supported"
        )
    return "lm"


def _hf_quantization(path: Path) -> dict | None:
    quant = _read_json(path / "config.json").get("quantization_config")
    if quant is None:
        return None
    from .quantize import MODES

    if quant.get("quant_method") != "llama2" or quant.get("mode") not in MODES:
        raise ValueError(f"{path / 'config.json'}: unsupported quantization_config {quant}")
    return quant


def _read_tokenizer(path: Path) -> Tokenizer | None:
    f = path / "tokenizer.model"
    return Tokenizer.from_file(f) if f.is_file() else None


def _check_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    path: Path,
    quant: dict | None = None,
    head: str = "lm",
) -> None:
    want = expected_names(cfg, quant)
    missing = [n for n in want if n not in sd]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{path}: missing tensors {missing[:3]}{more}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:3]}")
    shapes = {n: tuple(t.shape) for n, t in _param_shapes(cfg, quant, head).items()}
    for name in want:
        if tuple(sd[name].shape) != shapes[name]:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(sd[name].shape)}, "
                f"config says {shapes[name]}"
            )


def _param_shapes(
    cfg: ModelConfig, quantization: dict | None = None, head: str = "lm"
) -> dict[str, torch.Tensor]:
    return empty_model(cfg, quantization, head).state_dict()


def empty_model(
    cfg: ModelConfig, quantization: dict | None = None, head: str = "lm"
) -> Transformer:
    """The model's modules on the meta device (no memory), quantized ones if asked; head
    "score" swaps the output layer for a reward model's scalar head."""
    with torch.device("meta"):
        model = Transformer(cfg)
        if head == "score":
            model.output = Linear(cfg.dim, 1, bias=False)
    if quantization is not None:
        from .quantize import replace_linears

        replace_linears(model, quantization["mode"], quantization.get("group_size", 32), False)
    return model


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from e


def _hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{path}: no model.safetensors, index or pytorch_model*.bin found")
    return files


def _read_hf(path: Path):
    config = ModelConfig.from_hf_config(_read_json(path / "config.json"), str(path / "config.json"))
    head = _hf_head(path)
    names = expected_names(config, _hf_quantization(path))
    hf_to_ours = {to_hf_name(n, head): n for n in names}
    sd = {}
    for file in _hf_files(path):
        for hf_name, tensor in _iter_tensors(file):
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some old exports carry
            if hf_name not in hf_to_ours:
                raise ValueError(f"{file}: unexpected tensor {hf_name}")
            sd[hf_to_ours[hf_name]] = tensor
    return config, sd, _read_tokenizer(path)


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


def safe_torch_load(file: Path) -> dict[str, torch.Tensor]:
    """torch.load that unpickles nothing but tensors and plain containers, memory-mapped."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files from before torch's zip format cannot be mapped
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{file}: refused: the pickle holds objects other than tensors, which could run code "
            f"when loaded ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file}: cannot read a PyTorch checkpoint: {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return obj


def _read_meta(path: Path):
    config, shards, parts = _meta_parts(path)
    n = len(parts)
    sd = {}
    for name in parts[0]:
        for i, p in enumerate(parts[1:], 1):
            if name not in p:
                raise ValueError(f"{shards[i]}: missing {name}")
        if n == 1 or parts[0][name].ndim == 1:
            sd[name] = parts[0][name]
            continue
        dim = _meta_split_dim(name)
        for i, p in enumerate(parts[1:], 1):
            want = parts[0][name].shape[1 - dim]
            if p[name].ndim != 2 or p[name].shape[1 - dim] != want:
                raise ValueError(
                    f"{shards[i]}: {name} has shape {tuple(p[name].shape)}, but shard 0's is "
                    f"{tuple(parts[0][name].shape)} (shards join on dim {dim})"
                )
        sd[name] = torch.cat([p[name] for p in parts], dim=dim)
    return config, _permute_qk(sd, config, meta_to_ours), _read_tokenizer(path)


def _meta_parts(path: Path) -> tuple[ModelConfig, list[Path], list[dict[str, torch.Tensor]]]:
    """The config and each shard's tensors (memory-mapped, not yet joined)."""
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ValueError(f"{path}: params.json but no consolidated.*.pth shards")
    parts = [safe_torch_load(f) for f in shards]
    parts = [{k: v for k, v in p.items() if k != "rope.freqs"} for p in parts]  # derived buffer
    if "tok_embeddings.weight" not in parts[0]:
        raise ValueError(f"{shards[0]}: no tok_embeddings.weight")
    config = ModelConfig.from_meta_params(
        _read_json(path / "params.json"),
        vocab_size=parts[0]["tok_embeddings.weight"].shape[0],
        source=str(path / "params.json"),
    )
    return config, shards, parts


def _meta_split_dim(name: str) -> int:
    """Model-parallel shards split column-parallel layers on dim 0, row-parallel ones on dim 1."""
    if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
        return 1
    return 0


def _read_gguf(path: Path):
    meta, tensors = read_gguf(path)
    config = _gguf_config(path, meta, tensors)
    gguf_to_ours = {to_gguf_name(n): n for n in expected_names(config)}
    sd = {}
    for name, (shape, gtype, offset) in tensors.items():
        if name not in gguf_to_ours:
            raise GGUFError(f"{path}: unexpected tensor {name}")
        sd[gguf_to_ours[name]] = torch.from_numpy(read_tensor(path, shape, gtype, offset))
    sd = _permute_qk(sd, config, meta_to_ours)
    tokenizer = Tokenizer.from_gguf(path) if "tokenizer.ggml.tokens" in meta else None
    return config, sd, tokenizer


def _gguf_config(path: Path, meta: dict, tensors: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}, expected 'llama'")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: missing llama.{key}")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    # as llama.cpp reads it: the type defaults to linear; older files use rope.scale_linear
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    kind = meta.get("llama.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        raise GGUFError(f"{path}: RoPE scaling type {kind!r} is not supported")
    scaling = float(factor) if kind == "linear" and factor not in (None, 0.0, 1.0) else None
    return ModelConfig(
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        vocab_size=len(meta["tokenizer.ggml.tokens"])
        if "tokenizer.ggml.tokens" in meta
        else tensors["token_embd.weight"][0][0],
        hidden_dim=get("feed_forward_length"),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=get("context_length"),
    )


def describe(path: str | Path) -> dict:
    """Layout, config, parameter count and stored dtypes, from headers only: no tensor is
    joined, permuted or dequantized, so it is cheap for a 70B checkpoint too."""
    path = Path(path)
    layout = detect_layout(path)
    numel: dict[str, int] = {}  # dtype name -> parameters stored in it

    def count(dtype: str, shape) -> None:
        numel[dtype] = numel.get(dtype, 0) + int(np.prod(shape))

    tokenizer = None
    if layout == "hf":
        config = ModelConfig.from_hf_config(_read_json(path / "config.json"), str(path))
        for file in _hf_files(path):
            if file.suffix != ".safetensors":
                for t in safe_torch_load(file).values():
                    count(dtype_name(t.dtype), t.shape)
                continue
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    count(_SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()), sl.get_shape())
        tokenizer = _read_tokenizer(path)
    elif layout == "meta":
        config, _, parts = _meta_parts(path)
        for i, part in enumerate(parts):
            for t in part.values():
                if t.ndim > 1 or i == 0:  # norms are replicated in every shard
                    count(dtype_name(t.dtype), t.shape)
        tokenizer = _read_tokenizer(path)
    else:
        meta, tensors = read_gguf(path)
        config = _gguf_config(path, meta, tensors)
        for shape, gtype, _ in tensors.values():
            count(gtype.name.lower(), shape)
        if "tokenizer.ggml.tokens" in meta:
            tokenizer = Tokenizer.from_gguf(path)
    return {
        "path": str(path),
        "layout": layout,
        "config": dict(vars(config)),
        "parameters": sum(numel.values()),
        "dtypes": numel,
        "size_on_disk": sum(
            p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
        ),
        "tokenizer": None if tokenizer is None else {"vocab_size": tokenizer.vocab_size},
    }


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# --- writing -------------------------------------------------------------------------------


@contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dst`, renamed to `dst` only on success."""
    dst = Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists and is not empty")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        yield tmp
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            _fsync(f)
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
            os.replace(dst, old / "x")
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old / "x", dst)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
        _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()


def _majority_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for t in sd.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.get)


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
    shapes = _param_shapes(config, quantization, head)

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
            tensors = {to_hf_name(n, head): _cast(state_dict[n], stored_dtype(n)) for n in shard}
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
            _write_hf_tokenizer(tmp, tokenizer, config)
    return Path(dst)


def _write_hf_tokenizer(d: Path, tokenizer: Tokenizer, config: ModelConfig) -> None:
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
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


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
    _require_float(state_dict, "Meta")
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "dim": config.dim}
    sizes |= {"hidden_dim": config.hidden_dim, "vocab_size": config.vocab_size}
    if config.rope_scaling is not None:
        raise ValueError(
            "Meta's params.json has no field for RoPE scaling; keep this model in HF form"
        )
    bad = [f"{k}={v}" for k, v in sizes.items() if v % shards]
    if shards < 1 or bad:
        raise ValueError(
            f"cannot split into {shards} model-parallel shards: {', '.join(bad)} not divisible"
        )
    sd = _permute_qk({n: state_dict[n] for n in expected_names(config)}, config, ours_to_meta)
    with atomic_dir(dst, overwrite) as tmp:
        for i in range(shards):
            part = {}
            for name, t in sd.items():
                if t.ndim > 1:
                    t = t.chunk(shards, dim=_meta_split_dim(name))[i]
                t = _cast(t, dtype)
                # torch.save writes a view's whole storage: copy only slices of a bigger one
                part[name] = t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
            torch.save(part, tmp / f"consolidated.{i:02d}.pth")
            del part
        (tmp / "params.json").write_text(json.dumps(config.to_meta_params(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.model")
    return Path(dst)


def _require_float(state_dict: Mapping[str, torch.Tensor], layout: str) -> None:
    if any(n.endswith((".scales", ".zeros")) for n in state_dict):
        raise ValueError(
            f"a quantized model cannot be written in {layout} layout: convert the unquantized one"
        )


GGUF_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}
_GGUF_FILE_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q8_0: 7}


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
    _require_float(state_dict, "GGUF")
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
        "general.file_type": (u32, _GGUF_FILE_TYPE[gtype]),
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
    sd = _permute_qk({n: state_dict[n] for n in expected_names(config)}, config, ours_to_meta)
    tensors = []
    for n, t in sd.items():
        # llama.cpp keeps 1-D tensors in f32; q8_0 needs rows in whole blocks of 32.
        tt = GGMLType.F32 if t.ndim == 1 else gtype
        if tt == GGMLType.Q8_0 and t.shape[-1] % 32:
            tt = GGMLType.F16
        tensors.append((to_gguf_name(n), tuple(t.shape), tt, _gguf_payload(t, tt)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.tmp-")
    os.close(fd)
    try:
        write_gguf(tmp, meta, tensors)
        _fsync(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    return dst


def _gguf_payload(t: torch.Tensor, gtype: GGMLType):
    def make() -> np.ndarray:
        x = t.detach().float().cpu().numpy()
        if gtype == GGMLType.F32:
            return x
        if gtype == GGMLType.F16:
            return x.astype(np.float16)
        return quantize_q8_0(x)

    return make
