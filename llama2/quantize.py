"""Weight-only quantization: int8 per output channel, int4 in groups along the input.

int8: w ≈ q * scale, q in [-127, 127], one bf16 scale per output row (amax / 127).
int4: w ≈ (q - 8) * scale + zero, q in [0, 15], per group of `group_size` inputs (asymmetric,
min/max). Stored two per byte (low nibble first). Activations stay in the model's dtype; on a
CPU the products run in PyTorch's fused kernels with bf16 activations for a few rows
(decoding) and as bf16 GEMMs on the dequantized weight for many (prefill). A compiled decode
step's single int8 row may instead be a fused multiply-and-sum in fp32 over the int8 weight,
where that measures faster (`kernels.choose_compiled`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import Linear

MODES = ("int8", "int4")
GEMV_MAX_ROWS = 16  # up to here the fused kernels win; above, dequantize once and GEMM


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q int8 [out, in], scales bf16 [out]). The scales are kept in bf16, the dtype the
    fused CPU kernel takes them in; q is rounded against the stored scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    q = torch.round(w / scales[:, None].float()).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [out, in/2], scales [out, in/g], zeros [out, in/g]) in fp32."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"input size {in_f} is not a multiple of group_size {group_size}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    zeros = lo + 8 * scales
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out_f, in_f)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "scales", torch.empty(out_features, dtype=torch.bfloat16, device=device)
        )

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.to(dtype) * self.scales[:, None].to(dtype)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and rows <= GEMV_MAX_ROWS:
            # (under torch.compile: "int8pack" or "reduction", `kernels.choose_compiled`)
            if torch.compiler.is_compiling() and (
                kernels.compiled_form(self, x, "int8pack", "int8pack") == "reduction"
            ):
                return kernels.reduction(x, self.weight, self.scales)
            return kernels.int8pack(x, self.weight, self.scales)
        w_dtype = torch.bfloat16 if x.device.type == "cpu" else x.dtype
        return F.linear(x.to(w_dtype), self.dequantize(w_dtype)).to(x.dtype)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int = 32, device=None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(
                f"input size {in_features} is not a multiple of group_size {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, groups, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, device=device))
        self._cpu_packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        q = unpack_int4(self.weight).to(dtype).reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales[..., None].to(dtype) + self.zeros[..., None].to(dtype)
        return w.reshape(self.out_features, self.in_features)

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in the layout of PyTorch's CPU int4 kernel (made once, on first use)."""
        if self._cpu_packed is None:
            q = unpack_int4(self.weight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1)
            self._cpu_packed = packed, sz.contiguous().to(torch.bfloat16)
        return self._cpu_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and rows <= GEMV_MAX_ROWS:
            packed, sz = self._packed()
            x2 = x.reshape(rows, -1).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
            return out.reshape(*x.shape[:-1], -1).to(x.dtype)
        w_dtype = torch.bfloat16 if x.device.type == "cpu" else x.dtype
        return F.linear(x.to(w_dtype), self.dequantize(w_dtype)).to(x.dtype)


def replace_linears(
    model: nn.Module, mode: str, group_size: int = 32, quantize: bool = True
) -> nn.Module:
    """Swap every Linear of `model` (in place) for its quantized form. With `quantize=False`
    the new modules are left empty (on the model's device, e.g. meta) for loading into."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, (Linear, nn.Linear)):
                continue
            device = child.weight.device
            if mode == "int8":
                new = Int8Linear(child.in_features, child.out_features, device=device)
            else:
                new = Int4Linear(child.in_features, child.out_features, group_size, device=device)
            if quantize:
                with torch.no_grad():
                    if mode == "int8":
                        new.weight, new.scales = quantize_int8(child.weight)
                    else:
                        new.weight, new.scales, new.zeros = quantize_int4(child.weight, group_size)
            setattr(module, child_name, new)
    return model


def align_buffers(model: nn.Module) -> nn.Module:
    """Copy memory-mapped int8 weights that are not 64-byte aligned into fresh memory: the
    fused int8 CPU kernel reads them with aligned vector loads and crashes otherwise (seen
    with 4+ rows on safetensors files, whose tensors are only 8-byte aligned)."""
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.weight.data_ptr() % 64:
            module.weight = module.weight.clone()
    return model


def quantization_config(mode: str, group_size: int) -> dict:
    cfg = {"quant_method": "llama2", "mode": mode}
    if mode == "int4":
        cfg["group_size"] = group_size
    return cfg
