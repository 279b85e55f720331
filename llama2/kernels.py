"""Matrix products picked by shape and dtype on a CPU (each choice measured with
benchmarks/generate.py and benchmarks/train.py, numbers in benchmarks/README.md; on other
devices they are plain F.linear).

- fp32, one row (decoding): MKL's single-row sgemm runs on one thread. Splitting the weight's
  rows into one batch entry per thread (`bmm` over free views) streams it on all threads;
  oneDNN's inner product does better still on wide weights (more outputs than inputs), worse
  on the others.
- fp32, more rows (prefill, batched decoding, training): oneDNN's inner product, measured
  faster than MKL's sgemm (it uses AVX-512 where MKL did not, on the AMD CPU it was tuned on).
  Under autograd its two backward products are oneDNN's too.
- fp16 weights with fp32 activations ("half-precision storage, fp32 compute"): a single row
  goes through the fp16 GEMV (fp32 accumulation); more rows through an fp32 GEMM on the
  converted weight, since fp16 GEMMs without native fp16 arithmetic are slow.
- Under torch.compile, a single row is a multiply-and-sum that inductor turns into one fused
  reduction over the weight, in any float dtype; more rows are one matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP16_GEMV_MAX_ROWS = 4
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T by oneDNN's inner product (strided operands are fine, no prepacking)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _onednn(x.contiguous(), w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _onednn(grad, w.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # grad_w = g^T x. oneDNN copies a strided input (not a strided weight): transpose
            # the narrower of the two (for the output head: x, not the [tokens, vocab] grad)
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            if g2.shape[1] > x2.shape[1]:
                grad_w = _onednn(x2.t().contiguous(), g2.t()).t().contiguous()
            else:
                grad_w = _onednn(g2.t().contiguous(), x2.t())
        return grad_x, grad_w


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return F.linear(x, w)
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling():
        if rows == 1:
            # written as a reduction, inductor fuses it into one pass over the weight on all
            # threads, converting half-precision weights on the fly
            return (x.float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype)
        return F.linear(x, w.to(x.dtype))  # (no graph break for the thread count below)
    if w.dtype == torch.float16 and x.dtype != torch.float16:
        if rows <= FP16_GEMV_MAX_ROWS:
            return F.linear(x.to(torch.float16), w).to(x.dtype)
        w = w.to(x.dtype)
    if w.dtype != torch.float32 or x.dtype != torch.float32 or not w.is_contiguous():
        return F.linear(x, w)
    no_grad = not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    if rows == 1 and not (ONEDNN and no_grad and w.shape[0] > w.shape[1]):
        parts = torch.get_num_threads()
        if parts > 1 and w.shape[0] % parts == 0:
            xs = x.reshape(1, 1, -1).expand(parts, 1, x.shape[-1])
            out = torch.bmm(xs, w.view(parts, -1, w.shape[1]).transpose(1, 2))
            return out.reshape(*x.shape[:-1], w.shape[0])
    elif ONEDNN:
        return _onednn(x.contiguous(), w) if no_grad else _OneDNNLinear.apply(x, w)
    return F.linear(x, w)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with the products above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
