import json

import pytest
import torch
import torch.nn.functional as F

from llama2 import kernels
from llama2.kernels import candidates, linear


def _operands(rows, dtype, shape):
    torch.manual_seed(0)
    n_out, n_in = shape
    buf = torch.randn(n_out * n_in + 2)
    w = buf[2:].view(n_out, n_in).to(dtype)  # fp32: 8 bytes past a 64-byte boundary
    return torch.randn(1, rows, n_in), w


@pytest.mark.parametrize("shape", [(96, 80), (64, 160)])  # wide and narrow
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_candidate_equals_float64(rows, dtype, shape, monkeypatch):
    """Every product `linear` may choose (split single-row bmm, fp16 GEMV, oneDNN with and
    without autograd, F.linear) computes x @ w.T, and its gradients, to fp32 accuracy, on a
    weight that is only 8-byte aligned like a memory-mapped safetensors tensor."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the split needs threads to split for
    x, w = _operands(rows, dtype, shape)
    exact = x.double() @ w.double().T
    names = candidates(x, w)
    assert names[0] in ("linear", "gemm32")  # plain PyTorch is always among them
    if dtype == torch.float32 and rows == 1 and kernels.ONEDNN:
        assert {"onednn", "split", "mv"} <= set(names)
    for name in names:
        product = kernels.PRODUCTS[name]
        tol = 2e-3 if name == "fp16" else 1e-5  # the fp16 product rounds x to fp16
        with torch.no_grad():
            out = product(x, w)
        assert out.shape == (1, rows, shape[0]) and out.dtype == torch.float32, name
        assert (out.double() - exact).norm() / exact.norm() < tol, name
        if dtype != torch.float32:
            continue
        # under autograd (training): the products of the backward pass as well
        wg, xg = w.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(1, rows, shape[0])
        (product(xg, wg) * g).sum().backward()
        gd = g.double().reshape(rows, shape[0])
        exact_w = gd.T @ x.double().reshape(rows, shape[1])
        exact_x = (gd @ w.double()).reshape(1, rows, shape[1])
        assert (wg.grad.double() - exact_w).norm() / exact_w.norm() < 1e-5, name
        assert (xg.grad.double() - exact_x).norm() / exact_x.norm() < 1e-5, name


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """An empty memory and an empty cache file of choices."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("LLAMA2_KERNEL_CACHE", str(path))
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_memo", {})
    monkeypatch.setattr(kernels, "_loaded_from", None)
    return path


def test_the_fastest_measured_product_is_used_and_remembered(fresh_choices, monkeypatch):
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    timed, calls = [], []
    seconds = {"linear": 2.0, "onednn": 1.0}  # as if oneDNN were twice as fast here
    monkeypatch.setattr(
        kernels, "_timed", lambda ps, *a: timed.extend(ps) or {n: seconds[n] for n in ps}
    )
    if not kernels.ONEDNN:
        seconds["linear"] = 0.5  # without oneDNN, F.linear is the only candidate
    real = kernels.PRODUCTS.copy()
    for name in real:
        monkeypatch.setitem(kernels.PRODUCTS, name, _spy(name, real[name], calls))
    with torch.no_grad():
        out = linear(x, w)
        linear(x[:3], w)  # 3 rows: another row class, measured again
        linear(x[:4], w)  # 4 rows: the first class (4-7) again, remembered
    want = "onednn" if kernels.ONEDNN else "linear"
    assert calls == [want, want, want]
    assert len(timed) == 2 * len(candidates(x, w))
    torch.testing.assert_close(out, F.linear(x, w))
    # the choice is on disk: a new process (here: an emptied memory) uses it unmeasured
    stored = json.loads(fresh_choices.read_text())
    assert sorted(set(stored.values())) == [want] and len(stored) == 2
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_memo", {})
    monkeypatch.setattr(kernels, "_loaded_from", None)
    monkeypatch.setattr(kernels, "_timed", lambda *a: pytest.fail("measured again"))
    with torch.no_grad():
        linear(x, w)
    assert calls[-1] == want


def test_a_slower_special_kernel_is_not_chosen(fresh_choices, monkeypatch):
    """Where a special kernel loses to F.linear (oneDNN's on an Intel Xeon, say), plain
    PyTorch runs: no product is slower than F.linear by construction."""
    monkeypatch.setattr(
        kernels, "_timed", lambda ps, *a: {n: {"linear": 1.0}.get(n, 3.0) for n in ps}
    )
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    with torch.no_grad():
        linear(x, w)
    assert set(json.loads(fresh_choices.read_text()).values()) == {"linear"}


def test_real_measurement_and_cache_off(monkeypatch):
    monkeypatch.setenv("LLAMA2_KERNEL_CACHE", "off")
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_memo", {})
    x, w = torch.randn(3, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    times = kernels.measure(x, w, grad=True)
    assert set(times) == set(candidates(x, w)) and all(t > 0 for t in times.values())
    out = linear(x, w)
    out.sum().backward()  # the measurement left the caller's graph alone
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(16, 32))
    assert kernels.cache_file() is None and len(kernels._chosen) == 1


def test_cpu_autocast_runs_bf16_products():
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w)
    assert out.dtype == torch.bfloat16
    exact = x.bfloat16().double() @ w.bfloat16().double().T  # the operands rounded to bf16
    assert ((out.double() - exact).norm() / exact.norm()) < 1e-2


def _spy(name, product, calls):
    def spy(x, w):
        calls.append(name)
        return product(x, w)

    return spy


def test_single_rows_are_timed_streaming_their_weight_from_memory(monkeypatch):
    """A decode step reads each weight from memory, not from the cache: a product of a few rows
    is timed over copies of its weight filling twice the last-level cache (a small weight, whose
    call overhead rules, and a product of many rows are timed on the weight itself)."""
    assert kernels.last_level_cache_bytes() > 0
    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 8 << 20)
    w = torch.randn(512, 256)  # 512 KiB: 32 copies fill 16 MiB
    copies = kernels._streamed(w)
    assert len({c.data_ptr() for c in copies}) == 32
    assert all(torch.equal(c, w) and c.is_contiguous() for c in copies)
    assert len(kernels._streamed(torch.randn(8, 16))) == 1
    assert len(kernels._streamed(w.t())) == 1  # (a strided weight is timed as it is)
    assert len(kernels._streamed(w, working_set=4 << 20)) == 8  # a model held in the cache
    read = []

    def spy(x, w):
        read.append(w.data_ptr())
        return F.linear(x, w)

    kernels._timed({"spy": spy}, torch.randn(1, 256), w, grad=False)
    assert len(set(read)) == 32 and len(read) == 32 * (kernels.REPEATS + 1)
    read.clear()
    kernels._timed({"spy": spy}, torch.randn(8, 256), w, grad=False)  # a batch of 8 decoding
    assert len(set(read)) == 32
    read.clear()
    kernels._timed({"spy": spy}, torch.randn(kernels.STREAMED_ROWS + 1, 256), w, grad=False)
    assert set(read) == {w.data_ptr()}
    # choices timed the old way (the weight in the cache) are not taken for streamed ones
    assert "|stream|" in kernels._key(torch.randn(8, 256), w, grad=False)
    assert "|nograd|" in kernels._key(torch.randn(16, 256), w, grad=False)
    assert "|grad|" in kernels._key(torch.randn(1, 256), w, grad=True)


def test_the_compiled_form_of_a_single_row_is_measured_and_remembered(fresh_choices, monkeypatch):
    """Under torch.compile a frozen fp32 weight's single row is a fused reduction, F.linear
    (MKL's GEMV on a prepacked copy) or oneDNN's inner product, whichever measures faster;
    small or half-precision weights stay reductions, unmeasured."""
    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 2 << 20)  # a few copies
    w = torch.randn(512, 256)  # 512 KiB
    times = kernels.measure_compiled(w)  # (real: compiles the reduction)
    assert set(times) == set(kernels.COMPILED_FP32) and all(0 < t < 1 for t in times.values())
    monkeypatch.setattr(kernels, "measure_compiled", lambda *a: {"reduction": 2.0, "linear": 1.0})
    assert kernels.choose_compiled(w) == "linear"
    stored = json.loads(fresh_choices.read_text())
    assert [v for k, v in stored.items() if k.startswith("compiled|torch.float32|512x256|")] == [
        "linear"
    ]
    monkeypatch.setattr(kernels, "measure_compiled", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_loaded_from", None)
    assert kernels.choose_compiled(w) == "linear"  # from the file
    assert kernels.choose_compiled(torch.randn(8, 16)) == "reduction"
    assert kernels.choose_compiled(w.half()) == "reduction"


def test_a_few_rows_compiled_form_is_measured_for_their_number(fresh_choices, monkeypatch):
    """A few rows (a batch decoding, a draft's proposals verified) are one reduction a row
    that inductor fuses into one pass over the weight, or a library's GEMM, measured for
    that number of rows; more than FEW_ROWS rows are the library's, unmeasured."""
    from llama2.quantize import quantize_int8

    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 2 << 20)
    torch.manual_seed(0)  # (a sum of 256 products in another order: within 1e-5 for this draw)
    w = torch.randn(512, 256)
    q, scales = quantize_int8(w)
    x = torch.randn(2, 3, 256)
    fused = torch.compile(kernels.reduction, dynamic=False)
    for out in (kernels.reduction(x, w), fused(x, w)):
        assert out.shape == (2, 3, 512)
        torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    dequantized = F.linear(x, q.float() * scales.float()[:, None])
    torch.testing.assert_close(fused(x, q, scales), dequantized, rtol=1e-5, atol=1e-5)
    times = kernels.measure_compiled(w, rows=3)  # (real: compiles the three rows' reduction)
    assert set(times) == set(kernels.COMPILED_FP32) and all(0 < t < 1 for t in times.values())
    monkeypatch.setattr(kernels, "measure_compiled", lambda *a: {"reduction": 1.0, "linear": 2.0})
    assert kernels.choose_compiled(w, rows=3) == "reduction"
    monkeypatch.setattr(kernels, "measure_compiled", lambda *a: {"reduction": 2.0, "linear": 1.0})
    assert kernels.choose_compiled(w, rows=2) == "linear"
    assert kernels.choose_compiled(w, rows=3) == "reduction"  # (remembered by its rows)
    stored = json.loads(fresh_choices.read_text())
    assert {k.split("|")[3] for k in stored if k.startswith("compiled|")} == {"rows2", "rows3"}
    measured = []  # a choice among fewer forms (a graph with templates) is stored apart
    monkeypatch.setattr(
        kernels,
        "measure_compiled",
        lambda *a: measured.append(a[-1]) or {"reduction": 2.0, "template": 1.0},
    )
    assert kernels.choose_compiled(w, rows=3, forms=("reduction", "template")) == "template"
    assert measured == [("reduction", "template")]
    assert kernels.choose_compiled(w, rows=3) == "reduction"
    monkeypatch.setattr(kernels, "measure_compiled", lambda *a: pytest.fail("measured"))
    assert kernels.choose_compiled(w, rows=kernels.FEW_ROWS + 1) == "linear"
    assert kernels.choose_compiled(q, None, scales, rows=kernels.FEW_ROWS + 1) == "int8pack"


def test_an_int8_weights_compiled_form_is_measured_and_both_forms_agree(fresh_choices, monkeypatch):
    """An int8 weight's single row under torch.compile is the fused reduction (fp32
    activations) or PyTorch's int8 kernel (bf16 activations), whichever measures faster: both
    compute x @ (q * scales).T, within the kernel's bf16 rounding of x."""
    from llama2.quantize import quantize_int8

    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda: 2 << 20)
    q, scales = quantize_int8(torch.randn(1024, 512))  # 512 KiB of int8
    x = torch.randn(1, 512)
    exact = x.double() @ (q.double() * scales.double()[:, None]).T
    compiled = torch.compile(kernels.reduction, dynamic=False)(x, q, scales)
    fused = kernels.int8pack(x, q, scales)
    for out, tol in ((kernels.reduction(x, q, scales), 1e-6), (compiled, 1e-6), (fused, 1e-2)):
        assert out.dtype == x.dtype and out.shape == (1, 1024)
        assert ((out.double() - exact).norm() / exact.norm()) < tol
    times = kernels.measure_compiled(q, scales=scales)  # (real: both forms, streamed)
    assert set(times) == {"reduction", "int8pack"} and all(0 < t < 1 for t in times.values())
    made = []  # the reduction is compiled once over all the copies, frozen, as in a model
    real = kernels._compiled_products

    def spy(weights, s, x, form):
        made.append((len(weights), form))
        return real(weights, s, x, form)

    monkeypatch.setattr(kernels, "_compiled_products", spy)
    kernels.measure_compiled(q, scales=scales)
    assert made == [(len(kernels._streamed(q)), "reduction")] and made[0][0] > 1
    monkeypatch.setattr(kernels, "measure_compiled", lambda *a: {"reduction": 2.0, "int8pack": 1.0})
    assert kernels.choose_compiled(q, None, scales) == "int8pack"
    assert "compiled|torch.int8|1024x512|" in " ".join(json.loads(fresh_choices.read_text()))
    assert kernels.choose_compiled(q[:8, :16], None, scales[:8]) == "reduction"  # small


def test_the_cpu_is_named_with_its_family_and_model(monkeypatch):
    """Virtual machines name only the vendor's line ("AMD EPYC") over CPU generations whose
    fastest kernels differ: the name, and so the file of kernel choices, carries the cpuid
    family and model."""
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {m}\n"
    block += "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
    zen4 = "\n".join(block.format(n=n, m=17) for n in range(2))
    zen3 = block.format(n=0, m=1)
    assert kernels.cpu_name(zen4) == "AMD EPYC (family 25, model 17)"
    assert kernels.cpu_name(zen3) == "AMD EPYC (family 25, model 1)"
    assert kernels.cpu_name("processor\t: 0\nBogoMIPS\t: 50.00\n")  # (no model name: platform's)
    monkeypatch.delenv("LLAMA2_KERNEL_CACHE", raising=False)
    name_of, names = kernels.cpu_name, set()
    for text in (zen4, zen3):
        monkeypatch.setattr(kernels, "cpu_name", lambda text=text: name_of(text))
        names.add(kernels.cache_file().name)
    assert names == {
        "AMD-EPYC-family-25-model-17-torch" + torch.__version__.replace("+", "-") + ".json",
        "AMD-EPYC-family-25-model-1-torch" + torch.__version__.replace("+", "-") + ".json",
    }
