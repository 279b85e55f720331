"""Run configuration: one dataclass per stage, filled from a YAML file and `key=value`
overrides. TrainConfig holds what every stage shares, LoopConfig what the shared loop adds,
and each stage's class its own settings: a setting a stage does not have is an error."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml


@dataclass
class TrainConfig:
    """The settings every stage shares: what to start from, what to train on, the optimizer,
    the runtime and the run directory's rhythm. Each stage extends it with its own."""

    stage: ClassVar[str] = "any stage"

    init_from: str | None = None  # the model to start from (a run's model, any checkpoint)
    data: str | None = None
    # optimisation (Llama 2 paper, section 2.2)
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, over all processes
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0
    # runtime
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int = 0  # CPU threads; 0 = torch's default
    eval_every: int = 100
    ckpt_every: int = 200
    keep_last: int = 2

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid {self.stage} config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = [f"{name} must be >= 1" for name in self._at_least_one() if getattr(self, name) < 1]
        out += [f"{name} must be > 0" for name in self._positive() if not getattr(self, name) > 0]
        out += [f"{name} must be >= 0" for name in self._at_least_zero() if getattr(self, name) < 0]
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"{name} must be in [0, 1)")
        if not _is_device(self.device):
            out.append(f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        return out

    def _at_least_one(self) -> tuple[str, ...]:
        return ("steps", "batch_size", "keep_last", "eval_every", "ckpt_every")

    def _positive(self) -> tuple[str, ...]:
        return ("lr", "eps", "grad_clip")

    def _at_least_zero(self) -> tuple[str, ...]:
        return ("weight_decay", "threads")


def _unit_interval(cfg, *names: str) -> list[str]:
    return [f"{n} must be in [0, 1]" for n in names if not 0 <= getattr(cfg, n) <= 1]


def _is_device(name: str) -> bool:
    """auto or a device torch names (cpu, cuda, cuda:1, mps...); whether it is there is
    checked when the run starts (device.pick_device)."""
    if name == "auto":
        return True
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


@dataclass
class LoopConfig(TrainConfig):
    """The stages trained by the shared loop (loop.py): a schedule, accumulation, mixed
    precision and the other knobs of its forward and backward passes."""

    seq_len: int = 256
    grad_accum: int = 1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    # mixed precision (fp32 master weights and optimizer state): "auto" is bfloat16 on CUDA and
    # none (fp32) on a CPU; "bfloat16" on a CPU with AMX or AVX512-BF16 runs its products there
    autocast: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False

    def problems(self) -> list[str]:
        out = super().problems()
        if self.warmup_steps < 0:
            out.append("warmup_steps must be >= 0")
        if self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            out.append(f"batch_size {self.batch_size} is not a multiple of grad_accum")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append("min_lr_ratio must be in [0, 1]")
        if self.autocast not in ("auto", "bfloat16", "float16", "none"):
            out.append(f"autocast must be auto, bfloat16, float16 or none, not {self.autocast!r}")
        return out

    def _at_least_one(self) -> tuple[str, ...]:
        return (*super()._at_least_one(), "seq_len", "grad_accum")


@dataclass
class PretrainConfig(LoopConfig):
    stage: ClassVar[str] = "pretrain"

    # a preset, with overrides (or the weights of init_from)
    model: str = "tiny-15m"
    model_args: dict = field(default_factory=dict)  # e.g. {dim: 256, n_layers: 4}
    # data: a prepared shard directory; none = the embedded corpus (stdlib sources)
    tokenizer: str | None = None  # for the embedded corpus: none = train one
    vocab_size: int = 4096  # of a tokenizer trained for the embedded corpus
    eval_batches: int = 16
    # Code Llama (section 2.3): the share of training documents laid out for infilling, and
    # the share of those in suffix-prefix-middle order (the paper: 0.9 and 0.5)
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    # long-context fine-tuning (section 2.4): a new RoPE base for init_from's model (1e6)
    rope_theta: float | None = None

    def problems(self) -> list[str]:
        out = super().problems()
        for name in ("fim_rate", "fim_spm_rate"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name} must be in [0, 1]")
        if self.rope_theta is not None and self.rope_theta <= 0:
            out.append("rope_theta must be > 0")
        from ..config import ModelConfig, get_preset

        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model_args) - fields)
        if unknown:
            out.append(f"model_args: unknown {unknown} (fields: {', '.join(sorted(fields))})")
            return out
        try:
            preset = get_preset(self.model)
        except ValueError as e:
            return [*out, f"model: {e}"]
        try:  # the model these make (its vocabulary is the tokenizer's, known later)
            preset.replace(**self.model_args)
        except ValueError as e:
            out.append(f"model_args: {e}".replace("invalid ModelConfig: ", ""))
        return out

    def _at_least_one(self) -> tuple[str, ...]:
        return (*super()._at_least_one(), "eval_batches")


@dataclass
class SFTConfig(LoopConfig):
    stage: ClassVar[str] = "sft"

    epochs: float = 0.0  # > 0: steps from passes over the data (the paper: 2)
    # LoRA: rank > 0 trains adapters on these linears instead of every weight
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wv"

    def problems(self) -> list[str]:
        out = super().problems()
        if self.epochs < 0:
            out.append("epochs must be >= 0")
        if self.lora_rank < 0:
            out.append("lora_rank must be >= 0 (0: no LoRA)")
        if self.lora_alpha <= 0:
            out.append("lora_alpha must be > 0")
        from ..lora import TARGETS

        unknown = [t for t in self.lora_targets.split(",") if t not in TARGETS]
        if self.lora_rank and unknown:
            out.append(f"lora_targets: unknown {unknown} (targets: {', '.join(TARGETS)})")
        return out


@dataclass
class RewardConfig(LoopConfig):
    stage: ClassVar[str] = "reward"

    margin: str = "small"  # of the ranking loss, by rating (section 3.2.2): none | small | large

    def problems(self) -> list[str]:
        out = super().problems()
        if self.margin not in ("none", "small", "large"):
            out.append(f"margin must be none, small or large, not {self.margin!r}")
        return out


@dataclass
class DPOConfig(LoopConfig):
    stage: ClassVar[str] = "dpo"

    beta: float = 0.1  # the strength of the implicit KL constraint

    def _positive(self) -> tuple[str, ...]:
        return (*super()._positive(), "beta")


@dataclass
class RejectionConfig(SFTConfig):
    """Rejection sampling (section 3.2.3): K samples per prompt, scored by the reward
    model(s); the SFT settings are those of the fine-tuning on the winners."""

    stage: ClassVar[str] = "rejection"

    reward_model: str | None = None  # helpfulness (or the only) reward model
    safety_model: str | None = None  # with it, scores combine as R_c (safety-gated at 0.15)
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 128
    previous: str | None = None  # best.jsonl of earlier rounds: their best samples compete too
    sample_rows: int = 64  # rows per generation batch (prompts x samples_per_prompt)
    # with a safety model: the best answer to a safety prompt is fine-tuned on only where the
    # safety model's probability that it is safe is at least this (0: every best answer)
    safety_floor: float = 0.5

    def problems(self) -> list[str]:
        return super().problems() + _unit_interval(self, "safety_floor")

    def _at_least_one(self) -> tuple[str, ...]:
        return (*super()._at_least_one(), "samples_per_prompt", "max_new_tokens", "sample_rows")

    def _at_least_zero(self) -> tuple[str, ...]:
        return (*super()._at_least_zero(), "temperature")


@dataclass
class GattConfig(SFTConfig):
    """Ghost Attention (section 3.3): answers sampled with these settings, then SFT."""

    stage: ClassVar[str] = "gatt"

    temperature: float = 1.0
    max_new_tokens: int = 128
    sample_rows: int = 64  # dialogs per generation batch (each turn, then the adherence check)
    # train only on the sampled answers that honour the instruction, each in its dialog up to
    # it (the samples are the model's own: unfiltered, they teach its failures too)
    keep_adherent: bool = True
    # chat examples (messages JSONL, e.g. the SFT data) fine-tuned on beside the dialogs, so
    # that what they taught (refusals) is not unlearned; replay_rows of them (0: all)
    replay: str | None = None
    replay_rows: int = 0
    # with a safety model and dialogs whose turns carry is_safety flags: an answer to a safety
    # turn is kept only where the model's probability that it is safe is at least this
    safety_model: str | None = None
    safety_floor: float = 0.5
    # each answer the best of this many draws (section 3.3: "analogous to Rejection
    # Sampling"): one that honours the instruction first, then by reward_model's score (R_c
    # with the safety_model and the turns' is_safety flags)
    samples_per_turn: int = 1
    reward_model: str | None = None

    def problems(self) -> list[str]:
        out = super().problems() + _unit_interval(self, "safety_floor")
        if self.samples_per_turn > 1 and not self.reward_model:
            out.append("samples_per_turn > 1 needs reward_model to choose among the draws")
        return out

    def _at_least_one(self) -> tuple[str, ...]:
        return (*super()._at_least_one(), "max_new_tokens", "sample_rows", "samples_per_turn")

    def _at_least_zero(self) -> tuple[str, ...]:
        return (*super()._at_least_zero(), "temperature", "replay_rows")


@dataclass
class PPOConfig(TrainConfig):
    """PPO (section 3.2.3): steps = iterations, batch_size = prompts per iteration, a constant
    learning rate."""

    stage: ClassVar[str] = "ppo"

    reward_model: str | None = None
    safety_model: str | None = None
    temperature: float = 1.0
    max_new_tokens: int = 128
    kl_beta: float = 0.01  # 0.01 for small models, 0.005 for 34B/70B
    clip: float = 0.2
    ppo_epochs: int = 1
    minibatch: int = 4
    value_coef: float = 0.5
    gae_lambda: float = 0.95
    patience: int = 0  # early stopping: evaluations without a better held-out reward (0: off)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.temperature <= 0:  # greedy answers have no log-probabilities to ratio
            out.append("temperature must be > 0 (PPO samples from the policy)")
        if not 0 <= self.gae_lambda <= 1:
            out.append("gae_lambda must be in [0, 1]")
        return out

    def _positive(self) -> tuple[str, ...]:
        return (*super()._positive(), "clip")

    def _at_least_zero(self) -> tuple[str, ...]:
        return (*super()._at_least_zero(), "kl_beta", "value_coef", "patience")

    def _at_least_one(self) -> tuple[str, ...]:
        return (*super()._at_least_one(), "max_new_tokens", "ppo_epochs", "minibatch")


STAGE_CONFIGS: dict[str, type[TrainConfig]] = {
    c.stage: c
    for c in (
        PretrainConfig,
        SFTConfig,
        RewardConfig,
        DPOConfig,
        RejectionConfig,
        GattConfig,
        PPOConfig,
    )
}


def stage_config(cfg: TrainConfig, kind: type[TrainConfig], **changes):
    """The settings of `cfg` that a stage of type `kind` has (a stage that runs another, as
    rejection sampling runs SFT), with `changes`."""
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names} | changes)


def _typed(key: str, value, hint):
    """A setting's value (from YAML or the command line) as its field's type."""
    allows_none = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    kind = next(t for t in typing.get_args(hint) if t is not type(None)) if allows_none else hint
    if kind is str and isinstance(value, str) and not allows_none:
        return value  # a text setting whose values include "none" (autocast=none)
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
            number = float(value)  # (YAML reads 3e-4, without a dot, as text)
            if not math.isfinite(number):  # nan, inf: a model of NaNs, silently
                raise ValueError(f"setting '{key}': {value!r} is not a finite number")
            return number
        if kind is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except (ValueError, OverflowError, TypeError) as e:
        if str(e).startswith("setting"):
            raise
        raise ValueError(f"setting '{key}': {value!r} is not a {kind.__name__}") from None


def _not_here(key: str, stage: str) -> str:
    users = [name for name, c in STAGE_CONFIGS.items() if key in _names(c)]
    if not users:
        return f"unknown setting '{key}'"
    return f"{stage} has no setting '{key}' (a setting of {', '.join(users)})"


def _names(kind: type[TrainConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping (settings), with errors naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return data


def load_train_config(
    path: str | Path | None, overrides: Sequence[str] = (), stage: str = "pretrain"
) -> TrainConfig:
    """The settings of `stage`: a YAML config (or the defaults) with `key=value` overrides;
    `model_args.dim=256` sets one model argument. A key the stage does not have (unknown, or
    another stage's) and a value of the wrong type are errors naming the key."""
    base = STAGE_CONFIGS.get(stage)
    if base is None:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_CONFIGS)})")
    data: dict = {}
    where = f"{path}: " if path is not None else ""
    if path is not None:
        data = read_yaml_mapping(path, "the config")
    names = _names(base)
    for key in data:
        if key not in names:
            raise ValueError(f"{where}{_not_here(key, stage)}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.startswith("model_args.") and "model_args" in names:
            args = dict(data.get("model_args") or {})
            args[key.split(".", 1)[1]] = yaml.safe_load(value)
            data["model_args"] = args
            continue
        if key not in names:
            raise ValueError(f"override {key!r}: {_not_here(key.split('.')[0], stage)}")
        data[key] = value
    hints = typing.get_type_hints(base)
    try:
        return base(**{key: _typed(key, value, hints[key]) for key, value in data.items()})
    except ValueError as e:
        raise ValueError(f"{where}{e}") from e


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False)
