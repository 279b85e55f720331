"""Run configuration: a dataclass filled from a YAML file and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # model: a preset, with overrides; or the weights of an existing checkpoint
    model: str = "tiny-15m"
    model_args: dict = field(default_factory=dict)  # e.g. {dim: 256, n_layers: 4}
    init_from: str | None = None
    # data: a prepared shard directory; none = the embedded corpus (stdlib sources)
    data: str | None = None
    tokenizer: str | None = None  # for the embedded corpus: none = train one
    vocab_size: int = 4096  # of a tokenizer trained for the embedded corpus
    # optimisation (Llama 2 paper, section 2.2)
    steps: int = 1000
    epochs: float = 0.0  # > 0: fine-tuning stages derive `steps` from passes over their data
    batch_size: int = 32  # sequences per optimizer step, over all processes
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0
    # reward models (section 3.2.2): the margin of the ranking loss, by rating
    margin: str = "small"  # none | small | large
    # DPO: the strength of the implicit KL constraint
    beta: float = 0.1
    # runtime
    device: str = "auto"  # auto: cuda if available, else cpu
    autocast: str = "bfloat16"  # on CUDA; "none" to train in fp32
    activation_checkpointing: bool = False
    compile: bool = False
    threads: int = 0  # CPU threads; 0 = torch's default
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.batch_size % self.grad_accum:
            problems.append(f"batch_size {self.batch_size} is not a multiple of grad_accum")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append("min_lr_ratio must be in [0, 1]")
        if self.margin not in ("none", "small", "large"):
            problems.append(f"margin must be none, small or large, not {self.margin!r}")
        if self.autocast not in ("bfloat16", "float16", "none"):
            problems.append(f"autocast must be bfloat16, float16 or none, not {self.autocast!r}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


def _coerce(name: str, value: str, current):
    """A command-line value, typed like the field's current value."""
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if isinstance(current, dict):
        return yaml.safe_load(value)
    if value.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def load_train_config(path: str | Path | None, overrides: list[str] = (), base=TrainConfig):
    """Read a YAML config (or start from the defaults) and apply `key=value` overrides;
    `model_args.dim=256` sets one model argument. Unknown keys are errors naming the key."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot read the config: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
    names = {f.name for f in dataclasses.fields(base)}
    for key in data:
        if key not in names:
            raise ValueError(f"{path}: unknown setting '{key}'")
    defaults = base()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.startswith("model_args."):
            args = dict(data.get("model_args", {}))
            args[key.split(".", 1)[1]] = yaml.safe_load(value)
            data["model_args"] = args
            continue
        if key not in names:
            raise ValueError(f"override {key!r}: unknown setting")
        data[key] = _coerce(key, value, data.get(key, getattr(defaults, key)))
    try:
        return base(**data)
    except TypeError as e:
        raise ValueError(f"invalid training config: {e}") from e


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False)
