"""What every checkpoint layout shares: dtype names, tensor names, the in-memory `Checkpoint`,
layout detection, the state-dict check against the config, and safe loading of `.pth` files."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..io import read_json as read_json_file
from ..kernels import Linear
from ..model import Transformer
from ..tokenizer import Tokenizer

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


# --- names ---------------------------------------------------------------------------------

HF_LAYER = {
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
HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
GGUF_LAYER = {
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
GGUF_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
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
    top = HF_TOP if head == "lm" else {**HF_TOP, "output": "score"}
    return _rename(name, top, HF_LAYER, "model.layers")


def to_gguf_name(name: str) -> str:
    return _rename(name, GGUF_TOP, GGUF_LAYER, "blk")


def expected_names(cfg: ModelConfig, quantization: dict | None = None) -> list[str]:
    """Every tensor name, in file order (a reward model's head has the same name, `output`)."""
    if quantization is not None:
        return list(param_shapes(cfg, quantization))
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.{part}.weight" for part in HF_LAYER]
    return names + ["norm.weight", "output.weight"]


# --- q/k row order -------------------------------------------------------------------------


def meta_to_ours(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's wq/wk rows hold each head's rotary pairs interleaved (x0,x1),(x2,x3)...; ours (as
    HF's) hold the first elements of all pairs, then the second ones."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def ours_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    fn: Callable[[torch.Tensor, int], torch.Tensor],
) -> StateDict:
    out = dict(sd)
    for i in range(cfg.n_layers):
        for part, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            key = f"layers.{i}.attention.{part}.weight"
            if key in out:  # (a missing tensor is reported by check_state_dict)
                out[key] = fn(out[key], heads)
    return out


# --- the in-memory checkpoint --------------------------------------------------------------


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


def check_state_dict(
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
    shapes = {n: tuple(t.shape) for n, t in param_shapes(cfg, quant, head).items()}
    for name in want:
        if tuple(sd[name].shape) != shapes[name]:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(sd[name].shape)}, "
                f"config says {shapes[name]}"
            )


def param_shapes(
    cfg: ModelConfig, quantization: dict | None = None, head: str = "lm"
) -> dict[str, torch.Tensor]:
    """The model's tensors on the meta device: names, shapes and dtypes, no memory."""
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
        from ..quantize import replace_linears

        replace_linears(model, quantization["mode"], quantization.get("group_size", 32), False)
    return model


# --- files ---------------------------------------------------------------------------------


def read_json(file: Path) -> dict:
    """A JSON file holding an object (config.json, params.json, an index)."""
    data = read_json_file(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, not {type(data).__name__}")
    return data


def read_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer.model beside a directory's weights, if there is one."""
    f = path / "tokenizer.model"
    return Tokenizer.from_file(f) if f.is_file() else None


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


# --- writing -------------------------------------------------------------------------------


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU tensor ready to write: contiguous, in `dtype` if given."""
    return (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()


def majority_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype holding the most parameters."""
    sizes: dict[torch.dtype, int] = {}
    for t in sd.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.get)


def require_float(state_dict: Mapping[str, torch.Tensor], layout: str) -> None:
    if any(n.endswith((".scales", ".zeros")) for n in state_dict):
        raise ValueError(
            f"a quantized model cannot be written in {layout} layout: convert the unquantized one"
        )
