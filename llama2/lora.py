"""LoRA adapters (Hu et al. 2021): W x + (alpha / r) B A x on chosen linears, the base frozen.
Saved in PEFT's format (adapter_config.json + adapter_model.safetensors), so PEFT and
everything built on it load our adapters, and merged back into plain weights."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint.common import HF_LAYER
from .io import atomic_dir
from .kernels import Linear

# our module names -> PEFT's target_modules names (HF's)
TARGETS = {
    part.split(".")[1]: hf.split(".")[1] for part, hf in HF_LAYER.items() if "norm" not in part
}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)  # as PEFT initialises
        nn.init.zeros_(self.lora_B.weight)  # starts as the base model exactly

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> nn.Module:
    """Freeze the model and wrap the named linears (wq, wk, wv, wo, w1, w2, w3) of every block."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {', '.join(TARGETS)}")
    model.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name in targets:
                child = getattr(parent, name, None)
                if isinstance(child, (Linear, nn.Linear)):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def _lora_modules(model: nn.Module):
    for i, layer in enumerate(model.layers):
        for part, parent in (("self_attn", layer.attention), ("mlp", layer.feed_forward)):
            for name, child in parent.named_children():
                if isinstance(child, LoRALinear):
                    yield f"base_model.model.model.layers.{i}.{part}.{TARGETS[name]}", child


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict, each adapter folded into its weight."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        out[key.replace(".base.weight", ".weight")] = value
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{module_name}.weight"] = module.merged_weight().detach()
    return out


def save_adapter(model: nn.Module, path: str | Path, base_model: str = "") -> Path:
    """PEFT's files: adapter_config.json and adapter_model.safetensors."""
    modules = list(_lora_modules(model))
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    first = modules[0][1]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name, _ in modules}),
        "base_model_name_or_path": base_model,
        "modules_to_save": None,
        "use_rslora": False,
    }
    tensors = {}
    for name, m in modules:
        tensors[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    with atomic_dir(path, overwrite=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(path)


def merge_adapter(
    state_dict: Mapping[str, torch.Tensor], adapter: str | Path
) -> dict[str, torch.Tensor]:
    """Fold a PEFT LoRA adapter directory into a plain state dict (our names)."""
    adapter = Path(adapter)
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(adapter / "adapter_model.safetensors")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{adapter}: not a PEFT adapter directory: {e}") from e
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter}: peft_type {config.get('peft_type')!r} is not LORA")
    scaling = config["lora_alpha"] / config["r"]
    ours_of = {f"{TARGETS[n]}": n for n in TARGETS}
    out = dict(state_dict)
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key.removesuffix(".lora_A.weight")  # base_model.model.model.layers.N.part.proj
        _, _, _, _, i, part, proj = prefix.split(".")
        group = "attention" if part == "self_attn" else "feed_forward"
        name = f"layers.{i}.{group}.{ours_of[proj]}.weight"
        a, b = tensors[key].float(), tensors[f"{prefix}.lora_B.weight"].float()
        out[name] = (state_dict[name].float() + (b @ a) * scaling).to(state_dict[name].dtype)
    return out
