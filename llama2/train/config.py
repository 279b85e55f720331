"""Run configuration: a dataclass filled from a YAML file and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
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
    # LoRA (sft): rank > 0 trains adapters on these linears instead of every weight
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wv"
    # reward models (section 3.2.2): the margin of the ranking loss, by rating
    margin: str = "small"  # none | small | large
    # DPO: the strength of the implicit KL constraint
    beta: float = 0.1
    # rejection sampling (section 3.2.3): K samples per prompt, scored by the reward model(s)
    reward_model: str | None = None  # helpfulness (or the only) reward model
    safety_model: str | None = None  # with it, scores combine as R_c (safety-gated at 0.15)
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 128
    previous: str | None = None  # best.jsonl of earlier rounds: their best samples compete too
    # PPO (section 3.2.3): steps = iterations, batch_size = prompts per iteration
    kl_beta: float = 0.01  # 0.01 for small models, 0.005 for 34B/70B
    clip: float = 0.2
    ppo_epochs: int = 1
    minibatch: int = 4
    value_coef: float = 0.5
    gae_lambda: float = 0.95
    patience: int = 0  # early stopping: evaluations without a better held-out reward (0: off)
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
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_batches",
            "keep_last",
            "eval_every",
            "ckpt_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.warmup_steps < 0 or self.epochs < 0 or self.lr <= 0:
            problems.append("warmup_steps and epochs must be >= 0, lr > 0")
        from ..config import ModelConfig

        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model_args) - fields)
        if unknown:
            problems.append(f"model_args: unknown {unknown} (fields: {', '.join(sorted(fields))})")
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


def _typed(key: str, value, hint):
    """A setting's value (from YAML or the command line) as its field's type."""
    allows_none = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    kind = next(t for t in typing.get_args(hint) if t is not type(None)) if allows_none else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if allows_none:
            return None
        raise ValueError(f"setting '{key}' needs a value")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # (YAML reads 3e-4, without a dot, as text)
        if kind is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except ValueError:
        raise ValueError(f"setting '{key}': {value!r} is not a {kind.__name__}") from None


def load_train_config(path: str | Path | None, overrides: list[str] = (), base=TrainConfig):
    """Read a YAML config (or start from the defaults) and apply `key=value` overrides;
    `model_args.dim=256` sets one model argument. Unknown keys and values of the wrong type
    are errors naming the key."""
    data: dict = {}
    where = f"{path}: " if path is not None else ""
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
            raise ValueError(f"{where}unknown setting '{key}'")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.startswith("model_args."):
            args = dict(data.get("model_args") or {})
            args[key.split(".", 1)[1]] = yaml.safe_load(value)
            data["model_args"] = args
            continue
        if key not in names:
            raise ValueError(f"override {key!r}: unknown setting")
        data[key] = value
    hints = typing.get_type_hints(base)
    try:
        data = {key: _typed(key, value, hints[key]) for key, value in data.items()}
    except ValueError as e:
        raise ValueError(f"{where}{e}") from e
    return base(**data)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False)
