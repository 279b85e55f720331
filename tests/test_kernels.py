import pytest
import torch

from llama2 import kernels
from llama2.kernels import linear


@pytest.mark.parametrize("shape", [(96, 80), (64, 160)])  # wide and narrow
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_products_equal_float64(rows, dtype, shape):
    """Every path of `linear` (split single-row bmm, fp16 GEMV, oneDNN with and without
    autograd) computes x @ w.T, and its gradients, to fp32 accuracy, on a weight that is
    only 8-byte aligned like a memory-mapped safetensors tensor."""
    torch.manual_seed(0)
    n_out, n_in = shape
    buf = torch.randn(n_out * n_in + 2)
    w = buf[2:].view(n_out, n_in).to(dtype)  # fp32: 8 bytes past a 64-byte boundary
    x = torch.randn(1, rows, n_in)
    exact = x.double() @ w.double().T
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 GEMV rounds x to fp16
    with torch.no_grad():
        out = linear(x, w)
    assert out.shape == (1, rows, n_out) and out.dtype == torch.float32
    assert (out.double() - exact).norm() / exact.norm() < tol
    # under autograd (training): the products of the backward pass as well
    wg, xg = w.float().clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(1, rows, n_out)
    (linear(xg, wg) * g).sum().backward()
    gd = g.double().reshape(rows, n_out)
    exact_w = gd.T @ x.double().reshape(rows, n_in)
    exact_x = (gd @ w.double()).reshape(1, rows, n_in)
    assert (wg.grad.double() - exact_w).norm() / exact_w.norm() < 1e-5
    assert (xg.grad.double() - exact_x).norm() / exact_x.norm() < tol


def test_onednn_is_used_for_many_rows_without_grad(monkeypatch):
    if not kernels.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a)
    )
    x, w = torch.randn(2, 5, 16), torch.randn(8, 16)  # many rows; and one row of a wide weight
    with torch.no_grad():
        linear(x, w)
        assert len(calls) == 1
        linear(x[:1, :1], torch.randn(32, 16))
        assert len(calls) == 2
        linear(x[:1, :1], w)  # one row of a narrow weight: the split bmm
    assert len(calls) == 2
