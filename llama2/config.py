"""Model hyper-parameters: one dataclass, the named presets, and the two on-disk dialects.

Meta's `params.json` and Hugging Face's `config.json` describe the same model with different
names; `ModelConfig` is the single source of truth both are read into and written from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .io import read_json

MAX_PARAMS = 2**50  # a bound far above any real model (70B is 2**36), far below int64's


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # None: derived from dim as Meta's reference does
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float | None = None  # linear RoPE scaling factor (positions / factor)
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        _check_types(self)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None and self.multiple_of > 0:  # (else reported below)
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        problems = []
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
        positive += ("multiple_of", "hidden_dim", "norm_eps", "rope_theta")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            if self.n_heads % self.n_kv_heads:
                problems.append(
                    f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
                )
            elif (self.dim // self.n_heads) % 2:
                problems.append(f"head_dim {self.dim // self.n_heads} must be even for RoPE")
        for name in ("rope_scaling", "ffn_dim_multiplier"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems and self.num_params() > MAX_PARAMS:  # (torch's sizes would overflow)
            problems.append(f"{self.num_params():.3g} parameters: dimensions beyond any model")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        if "dim" in changes or "multiple_of" in changes or "ffn_dim_multiplier" in changes:
            changes.setdefault("hidden_dim", None)  # derive it again
        if "n_heads" in changes and self.n_kv_heads == self.n_heads:
            changes.setdefault("n_kv_heads", None)  # multi-head stays multi-head
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (no biases, untied head)."""
        d, h, kv = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    # --- Meta params.json -------------------------------------------------------------------

    def to_meta_params(self) -> dict:
        multiple_of, multiplier = self.multiple_of, self.ffn_dim_multiplier
        if ffn_hidden_dim(self.dim, multiple_of, multiplier) != self.hidden_dim:
            multiple_of, multiplier = _meta_ffn_args(self.dim, self.hidden_dim)
        params = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
        }
        if multiplier is None:
            del params["ffn_dim_multiplier"]
        return params

    @classmethod
    def from_meta_params(
        cls, params: dict, vocab_size: int | None = None, source: str = "params.json"
    ) -> ModelConfig:
        """Read Meta's params.json. Llama 2 ships `vocab_size: -1`: the caller passes the real
        size (the embedding's rows) as `vocab_size`."""
        if not isinstance(params, dict):
            raise ValueError(f"{source}: expected a JSON object, not {type(params).__name__}")
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"}
        known |= {"ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "use_scaled_rope"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}")
        if params.get("use_scaled_rope"):
            raise ValueError(f"{source}: use_scaled_rope (Llama 3.1 RoPE) is not Llama 2's")

        def get(key, kind=int, default=REQUIRED):
            return number(params, key, kind, source, default)

        dim, n_layers, n_heads = get("dim"), get("n_layers"), get("n_heads")
        vocab = get("vocab_size", int, -1)
        if vocab is None or vocab <= 0:
            if vocab_size is None:
                raise ValueError(f"{source}: vocab_size is {vocab} and no embedding to infer it")
            vocab = vocab_size
        theta = get("rope_theta", float, 10000.0)
        args = dict(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=get("n_kv_heads", int, None),
            vocab_size=vocab,
            multiple_of=get("multiple_of", int, 256),
            ffn_dim_multiplier=get("ffn_dim_multiplier", float, None),
            norm_eps=get("norm_eps", float, 1e-5),
            rope_theta=theta,
            # params.json does not record the context; Code Llama (theta 1e6) was trained at 16k.
            max_seq_len=get("max_seq_len", int, 16384 if theta >= 1e6 else 4096),
        )
        return _build(cls, args, source)

    # --- Hugging Face config.json -------------------------------------------------------------

    def to_hf_config(self, dtype: str = "float32") -> dict:
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": dtype,
            # Kept so that our own reads give back exactly the config that was written.
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {
                "type": "linear",
                "rope_type": "linear",
                "factor": self.rope_scaling,
            }
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        """Read HF's config.json; every error names `source` and the field."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object, not {type(cfg).__name__}")
        if cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type is {cfg['model_type']!r}, expected 'llama'")
        for field, expected in (("hidden_act", "silu"), ("attention_bias", False)):
            if cfg.get(field, expected) != expected:
                raise ValueError(f"{source}: {field}={cfg[field]!r} is not supported")
        if cfg.get("tie_word_embeddings", False):
            raise ValueError(f"{source}: tied embeddings are not a Llama 2 model")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or rope
        for key, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: '{key}' must be an object or null, not {value!r}")
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if kind not in ("default", "linear"):
            raise ValueError(f"{source}: RoPE scaling type {kind!r} is not supported")

        def get(key, kind=int, default=REQUIRED):
            return number(cfg, key, kind, source, default)

        dim, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = get("head_dim", int, None)
        if head_dim is not None and head_dim * heads != dim:
            raise ValueError(f"{source}: head_dim {head_dim} * heads != hidden_size")
        theta = number(rope, "rope_theta", float, f"{source}: rope_parameters", 10000.0)
        args = dict(
            dim=dim,
            n_layers=get("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=get("num_key_value_heads", int, None),
            vocab_size=get("vocab_size"),
            multiple_of=get("multiple_of", int, 256),
            ffn_dim_multiplier=get("ffn_dim_multiplier", float, None),
            hidden_dim=get("intermediate_size", int, None),
            norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=get("rope_theta", float, theta),
            rope_scaling=_linear_factor(scaling, source) if kind == "linear" else None,
            max_seq_len=get("max_position_embeddings", int, 4096),
        )
        return _build(cls, args, source)


def _linear_factor(scaling: dict, source: str) -> float:
    if "factor" not in scaling:
        raise ValueError(f"{source}: linear RoPE scaling without a 'factor'")
    return number(scaling, "factor", float, f"{source}: rope_scaling")


def _build(cls, args: dict, source: str) -> ModelConfig:
    """The config from a file's values; a value out of range names the file to fix."""
    try:
        return cls(**args)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


_OPTIONAL = {"n_kv_heads", "ffn_dim_multiplier", "hidden_dim", "rope_scaling"}


def _check_types(cfg: ModelConfig) -> None:
    """Each field an int or a finite float as declared (None only where allowed), so that a
    value from a file (a text "288", a 6.5, a null) fails here, named, not deep in the model."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.name in _OPTIONAL:
            continue
        kind = int if f.type.startswith("int") else float
        setattr(cfg, f.name, number({f.name: value}, f.name, kind, "invalid ModelConfig"))


REQUIRED = object()  # number()'s default: the key must be there


def number(data: dict, key: str, kind: type, where: str, default=REQUIRED):
    """data[key] as an int (a JSON integer) or a float (any finite JSON number), or `default`
    when the key is absent (or null, where the default is None); else an error naming
    `where` and the key. bool is not a number here, though Python says it is one."""
    value = data.get(key, default)
    if value is REQUIRED:
        raise ValueError(f"{where}: missing required field '{key}'")
    if value is None and default is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int:
        ok = isinstance(value, int)
    elif ok:
        ok = math.isfinite(value)
        value = float(value) if ok else value
    if not ok:
        what = "an integer" if kind is int else "a finite number"
        raise ValueError(f"{where}: '{key}' must be {what}, not {json.dumps(value, default=repr)}")
    return value


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta's reference computes it: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_ffn_args(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """A (multiple_of, ffn_dim_multiplier) pair that makes Meta's formula give `hidden_dim`."""
    for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8):
        if ffn_hidden_dim(dim, multiple_of, None) == hidden_dim:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    multiplier = None if base <= hidden_dim else hidden_dim / base
    assert ffn_hidden_dim(dim, hidden_dim, multiplier) == hidden_dim
    return hidden_dim, multiplier


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": ModelConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    "codellama-7b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384
    ),
    "codellama-13b": ModelConfig(
        dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6, max_seq_len=16384
    ),
    "codellama-34b": ModelConfig(
        dim=8192,
        n_layers=48,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        rope_theta=1e6,
        max_seq_len=16384,
    ),
    # CPU-sized models with llama2.c's shapes (stories15M / stories110M).
    "tiny-15m": ModelConfig(dim=288, n_layers=6, n_heads=6, multiple_of=32, max_seq_len=256),
    "tiny-110m": ModelConfig(dim=768, n_layers=12, n_heads=12, multiple_of=32, max_seq_len=1024),
    # For tests: grouped-query attention in a model that runs in milliseconds.
    "micro": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else dataclasses.replace(PRESETS[name])


def load_config_file(path: str | Path) -> ModelConfig:
    """A config.json (Hugging Face) or params.json (Meta) file."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and "hidden_size" in data:
        return ModelConfig.from_hf_config(data, source=str(path))
    return ModelConfig.from_meta_params(data, source=str(path))
