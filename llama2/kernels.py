"""Matrix products on a CPU, each chosen by measurement on the CPU at hand.

Which product is fastest depends on the CPU, not only on the shape: on an AMD EPYC, MKL's
fp32 GEMM does not use AVX-512 and oneDNN's inner product beats it 2x; on an Intel Xeon with
AVX-512 they are even, and bf16 runs on AMX. So, as `torch.backends.cudnn.benchmark` does, the
first product of each kind (dtypes, weight shape, class of row count, autograd or not,
threads) times its candidates on the real operands (a few rows, as in decode, streaming the
weight from memory as a decode step does) and keeps the fastest, for the process
and in a JSON file per CPU model and PyTorch version (`LLAMA2_KERNEL_CACHE` names the file;
"off" keeps choices in memory only). `F.linear` is always a candidate, so no product is
slower than plain PyTorch, measurement noise aside. The file also keeps training exact on
resume: a resumed run reads the choices (and so the rounding) of the run it continues.

Candidates:
- "linear": F.linear (MKL's sgemm and sgemv, PyTorch's own half-precision kernels).
- "onednn": oneDNN's inner product; under autograd its two backward products too.
- "split": one row of fp32: MKL's single-row sgemv runs on one thread, so the weight's rows
  are split into one `bmm` batch entry per thread (free views).
- "mv": one row as `torch.mv` (its bf16 GEMV streams 1.3-1.8x F.linear's on an Intel Xeon).
- fp16 weights with fp32 activations ("half-precision storage, fp32 compute"): "fp16" (x
  rounded to fp16, PyTorch's fp16 GEMV or GEMM, which accumulate in fp32; the GEMM is no
  faster than fp32's on a Xeon without AMX-FP16, but may be where fp16 arithmetic is fast)
  and "gemm32" (the weight converted, an fp32 product).
Under CPU autocast the product is F.linear, the op autocast knows. Under torch.compile a few
rows are a multiply-and-sum that inductor fuses into one pass over the weight, in any dtype, or
where measurement says so, for fp32 weights frozen into the graph F.linear or oneDNN's inner
product and for int8 ones the fused int8 kernel (`choose_compiled`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import write_atomic

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MEASURE_ROWS = 512  # larger products are timed on their first rows: the ranking holds
REPEATS = 3  # timed runs per candidate after a warm-up; the fastest counts
STREAMED_ROWS = 15  # up to here (row classes 1 ... 8-15) a product is mostly reading its weight

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _onednn_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _OneDNNLinear.apply(x, w)
    return _onednn(x.contiguous(), w)


def _split(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    parts = torch.get_num_threads()
    xs = x.reshape(1, 1, -1).expand(parts, 1, x.shape[-1])
    out = torch.bmm(xs, w.view(parts, -1, w.shape[1]).transpose(1, 2))
    return out.reshape(*x.shape[:-1], w.shape[0])


def _mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mv(w, x.reshape(-1)).reshape(*x.shape[:-1], w.shape[0])


def _fp16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(torch.float16), w).to(x.dtype)


def _gemm32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype))


PRODUCTS: dict[str, Product] = {
    "linear": F.linear,
    "onednn": _onednn_product,
    "split": _split,
    "mv": _mv,
    "fp16": _fp16,
    "gemm32": _gemm32,
}


def candidates(x: torch.Tensor, w: torch.Tensor) -> list[str]:
    """The products that compute x @ w.T for these operands (the first is the fallback)."""
    rows = x.numel() // x.shape[-1]
    if w.dtype == torch.float16 and x.dtype != torch.float16:
        return ["gemm32", "fp16"]
    if w.dtype != x.dtype:
        return ["linear"]
    out = ["linear"]
    if ONEDNN and w.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16):
        out.append("onednn")
    parts = torch.get_num_threads()
    splittable = parts > 1 and w.shape[0] % parts == 0 and w.is_contiguous()
    if rows == 1:
        out.append("mv")
        if x.dtype == torch.float32 and splittable:
            out.append("split")
    return out


def _key(x: torch.Tensor, w: torch.Tensor, grad: bool) -> str:
    rows = x.numel() // x.shape[-1]
    rows_class = min(rows.bit_length(), MEASURE_ROWS.bit_length())  # 1, 2-3, 4-7, ..., 512+
    shape = "x".join(map(str, w.shape))
    # ("stream": timed streaming the weight, a key apart from "nograd" because a choice timed
    # with the weight in the cache does not hold for a weight read from memory)
    mode = "grad" if grad else "stream" if rows <= STREAMED_ROWS else "nograd"
    return f"{x.dtype}|{w.dtype}|{shape}|rows{rows_class}|{mode}|t{torch.get_num_threads()}"


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name with its cpuid family and model (Linux: /proc/cpuinfo, or the text
    `cpuinfo`), else what the platform says. Virtual machines often name only the vendor's
    line ("AMD EPYC", "Intel(R) Xeon(R) Processor") over CPUs of several generations whose
    fastest kernels differ; the family and model tell them apart."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    first = text.split("\n\n", 1)[0]  # (the first processor's block)
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" not in fields:
        return platform.processor() or platform.machine() or "unknown CPU"
    name = fields["model name"]
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cache_file() -> Path | None:
    setting = os.environ.get("LLAMA2_KERNEL_CACHE")
    if setting is not None:
        return None if setting in ("", "off") else Path(setting)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{cpu_name()}-torch{torch.__version__}").strip("-")
    return Path.home() / ".cache" / "llama2" / "kernels" / f"{slug}.json"


_chosen: dict[str, str] = {}  # by _key: what the file holds
_loaded_from: Path | None = None
# the choices by the operands' plain attributes: the hot path's lookup (a _key string costs
# microseconds a product, a tenth of a small model's decode step)
_memo: dict[tuple, str] = {}


def _load_choices() -> None:
    global _loaded_from
    path = cache_file()
    if path is None or path == _loaded_from:
        return
    _loaded_from = path
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no file yet, or an unreadable one: measure afresh
    if isinstance(stored, dict):
        _chosen.update({k: v for k, v in stored.items() if v in PRODUCTS})


def _store_choices() -> None:
    path = cache_file()
    if path is None:
        return
    try:
        stored = json.loads(path.read_text()) if path.exists() else {}
        merged = (stored if isinstance(stored, dict) else {}) | _chosen
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(merged, indent=1, sort_keys=True))
    except (OSError, ValueError):
        pass  # a read-only home: the choices still hold for this process


@functools.cache
def last_level_cache_bytes() -> int:
    """The CPU's last-level cache (Linux: sysfs), else 32 MiB."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            sizes.append(int(m.group(1)) * 1024 ** " KMG".index(m.group(2) or " "))
    return max(sizes, default=32 << 20)


def _streamed(w: torch.Tensor, working_set: int | None = None) -> list[torch.Tensor]:
    """Copies of `w` filling twice the last-level cache (at most 512 MiB), or `working_set`
    bytes if that is less (a model's weights that fit in the cache are read from it): a decode
    step streams every weight once a token, and a product timed on one weight that stays in the
    cache ranks the candidates differently (on an Intel Xeon with 300 MiB of L3, oneDNN's
    single-row product is 2x slower than torch.mv in the cache, 1.4x slower from memory)."""
    return list(_stacked_copies(w, working_set).unbind())


def _stacked_copies(w: torch.Tensor, working_set: int | None = None) -> torch.Tensor:
    """The copies of `_streamed` as one tensor [n, *w.shape] (`w[None]` when none are made)."""
    size = w.numel() * w.element_size()
    target = min(2 * last_level_cache_bytes(), 512 << 20)  # (beside a 7B model in memory)
    if working_set is not None:
        target = min(target, working_set)
    n = min(-(-target // size), 256)  # (256 x 1 MiB: 0.1 s a candidate)
    if n <= 1 or size < 1 << 18 or not w.is_contiguous():  # small ones: the call's cost rules
        return w[None]
    return w.expand(n, *w.shape).clone()


def _timed(products: dict[str, Product], x: torch.Tensor, w: torch.Tensor, grad: bool) -> dict:
    """Seconds per product of each of `products` on these operands (see `_in_turns`). A few
    rows without autograd (decode, one sequence or a batch of them) are timed streaming their
    weight from memory (`_streamed`)."""
    if grad:  # forward and backward, on leaves of their own (the caller's graph untouched)
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
    rows = x.numel() // x.shape[-1]
    weights = _streamed(w) if not grad and rows <= STREAMED_ROWS else [w]

    def runner(product: Product) -> Callable[[], None]:
        def run() -> None:
            for wi in weights:
                out = product(x, wi)
                if grad:
                    out.backward(torch.ones_like(out))

        return run

    with torch.enable_grad() if grad else torch.no_grad():
        return _in_turns({name: runner(p) for name, p in products.items()}, len(weights))


def _in_turns(runs: dict[str, Callable[[], None]], n: int) -> dict[str, float]:
    """Seconds per product of each run, which makes `n` of them: the best of REPEATS rounds
    after one that warms caches and allocators. The candidates take turns within each round,
    so that a machine whose speed drifts (10-30% within minutes on a shared 2-core VM) slows
    them alike instead of the ones timed last."""
    best = dict.fromkeys(runs, float("inf"))
    for i in range(REPEATS + 1):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            if i:
                best[name] = min(best[name], (time.perf_counter() - t) / n)
    return best


def _remembered(key: str, valid: Sequence[str], timings: Callable[[], dict[str, float]]) -> str:
    """The choice stored under `key` (in memory, else in the file) if it is still `valid`;
    otherwise the fastest of `timings()`, stored."""
    name = _chosen.get(key)
    if name is None:
        _load_choices()
        name = _chosen.get(key)
    if name not in valid:
        times = timings()
        name = _chosen[key] = min(times, key=times.get)
        _store_choices()
    return name


def measure(x: torch.Tensor, w: torch.Tensor, grad: bool) -> dict[str, float]:
    """Seconds per product of each candidate on these operands."""
    x = x.reshape(-1, x.shape[-1])[:MEASURE_ROWS].detach()
    return _timed({name: PRODUCTS[name] for name in candidates(x, w)}, x, w.detach(), grad)


def choose(x: torch.Tensor, w: torch.Tensor) -> str:
    """The product used for these operands: measured on first use, then remembered."""
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    rows = x.numel() // x.shape[-1]
    fast = (x.dtype, w.dtype, w.shape, min(rows, 16), rows.bit_length(), grad, w.is_contiguous())
    fast += (torch.get_num_threads(),)
    name = _memo.get(fast)
    if name is not None:
        return name
    name = _remembered(_key(x, w, grad), candidates(x, w), lambda: measure(x, w, grad))
    _memo[fast] = name
    return name


def reduction(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """A few rows' product written as a multiply-and-sum per row: under torch.compile inductor
    fuses the rows' sums into one pass over the weight on all threads (each weight element read
    once, for every row), converting half-precision or int8 weights on the fly (int8 with one
    scale per output row). The weight enters the multiply as it is and type promotion converts
    it inside the fused loop: a conversion of its own would be constant-folded, for a frozen
    weight, into an fp32 copy of it."""
    if x.numel() == x.shape[-1]:
        out = (x.float().unsqueeze(-2) * w).sum(-1)
    else:
        rows = x.reshape(-1, x.shape[-1]).float().unbind()
        out = torch.stack([(row * w).sum(-1) for row in rows], -2)
    if scales is not None:
        out = out * scales
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def int8pack(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (w * scales[:, None]).T for int8 `w` [out, in] by PyTorch's fused CPU kernel, which
    takes the activations in bf16."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int8pack_mm(x2, w, scales)
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


# the forms a frozen weight's product may take in a compiled graph
COMPILED_FP32 = ("reduction", "linear") + (("onednn",) if ONEDNN else ()) + ("template",)
COMPILED_INT8 = ("reduction", "int8pack")
FEW_ROWS = 16  # up to here a compiled product's form is measured (the engine's widths: 1-16)


def _packed_gemm(w: torch.Tensor, rows: int) -> Product:
    """What inductor makes of F.linear on a frozen fp32 weight: MKL's GEMM (GEMV for one row)
    on a copy of the weight prepacked for that many rows (a second copy, held by the graph)."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return lambda x, w: torch.ops.mkl._mkl_linear(x, packed, w, None, rows)


TEMPLATE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
"""Inductor's settings for a graph whose frozen fp32 products are its C++ GEMM template:
register-blocked loops generated for the shape, over a weight packed when the graph is
compiled (on an AMD EPYC Zen 4, 2-5 rows cost about what one row costs; the reduction's 3
rows cost 1.6x its one). Settings of the whole graph: in a graph that has them, every
F.linear and oneDNN product on a frozen weight is a template (where the template does not
apply, the library's kernel)."""


class _Products(nn.Module):
    """x's products with each of `weights` (int8 ones with their `scales`) in one `form`, a
    kernel each, as in a model's graph: a module, so that `freezing` makes the weights
    constants of the graph, as a model's are."""

    def __init__(self, weights: Sequence[torch.Tensor], scales: torch.Tensor | None, form: str):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)
        self.register_buffer("scales", scales)
        self.form = form

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.form == "reduction":
            return [reduction(x, w, self.scales) for w in self.weights]
        return [F.linear(x, w) for w in self.weights]


def _compiled_products(
    weights: Sequence[torch.Tensor], scales: torch.Tensor | None, x: torch.Tensor, form: str
) -> Callable[[], None]:
    """`_Products` in `form` ("reduction", or "template": F.linear under `TEMPLATE`),
    compiled here (a few seconds; a graph per weight shape, rows and number of copies)."""
    compiled = torch.compile(_Products(weights, scales, form), dynamic=False)
    settings = TEMPLATE if form == "template" else {}
    # (the settings are read by this first call, which compiles; frozen only without autograd)
    with (
        torch.no_grad(),
        torch._inductor.config.patch(freezing=True, **settings),
        torch._dynamo.config.patch(cache_size_limit=1024),
    ):
        compiled(x)
    return lambda: compiled(x)


def measure_compiled(
    w: torch.Tensor,
    working_set: int | None = None,
    scales: torch.Tensor | None = None,
    rows: int = 1,
    valid: Sequence[str] | None = None,
) -> dict[str, float]:
    """Seconds per product of `rows` rows and `w` in each form `choose_compiled` picks from,
    the weight streamed as in `_streamed`: "reduction" and "template" (`TEMPLATE`) compiled
    over all the copies, frozen, in one graph and one call (inside a model's graph a product
    costs no call of its own, and a compiled call per copy would add Dynamo's ~20-30 us to
    each, twice the product of a 768 x 768 int8 weight), a kernel per copy as in the model's;
    for an fp32 weight "linear" as inductor runs it with frozen weights and "onednn"; for an
    int8 one (with its `scales`) "int8pack", the fused kernel the graph would call. Only the
    forms in `valid`."""
    valid = valid or (COMPILED_INT8 if scales is not None else COMPILED_FP32)
    x = torch.randn(rows, w.shape[1], dtype=torch.float32 if scales is not None else w.dtype)
    weights = _streamed(w.detach(), working_set)
    forms = {}
    for form in ("reduction", "template"):
        if form in valid:
            forms[form] = [_compiled_products(weights, scales, x, form)]
    if "int8pack" in valid:
        forms["int8pack"] = [functools.partial(int8pack, x, wi, scales) for wi in weights]
    if "linear" in valid:  # (prepacked copies: made only where measured)
        mkl = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
        gemm = [_packed_gemm(wi, rows) if mkl else F.linear for wi in weights]
        forms["linear"] = [functools.partial(g, x, wi) for g, wi in zip(gemm, weights, strict=True)]
    if ONEDNN and "onednn" in valid:  # (the graph calls the same op on the frozen weight)
        forms["onednn"] = [functools.partial(_onednn, x, wi) for wi in weights]

    def runner(calls: list) -> Callable[[], None]:
        return lambda: [call() for call in calls]

    with torch.no_grad():
        return _in_turns({name: runner(calls) for name, calls in forms.items()}, len(weights))


def choose_compiled(
    w: torch.Tensor,
    working_set: int | None = None,
    scales: torch.Tensor | None = None,
    rows: int = 1,
    forms: Sequence[str] | None = None,
) -> str:
    """How a product of `rows` rows and the frozen weight `w` is written for torch.compile
    (generation.compiled_decode): "reduction" (`reduction`) or, for an fp32 weight, "linear"
    (F.linear, which inductor runs as MKL's GEMV or GEMM on a prepacked copy), "onednn"
    (oneDNN's inner product, called by the graph) or "template" (F.linear in a graph compiled
    with `TEMPLATE`); the fastest of `forms` if given. For an int8 weight with its `scales`,
    "int8pack" (`int8pack`). Measured on first use and remembered like the eager products,
    since the winner depends on the CPU and the rows (on an AMD EPYC Zen 4 the int8 reduction
    streams 1.3-2.1x the fused int8 kernel's bandwidth; tiny-110m's compiled step of three rows
    took 15.3 ms with reductions and 44.5 with MKL's GEMM, of eight rows 61 ms with reductions,
    which are compute bound there, and 35 with oneDNN's). Weights under 256 KiB, whose
    products cost less than their calls, and products of more than FEW_ROWS rows are not
    measured: a single row is a reduction, more are the library's.
    `working_set`: the bytes of all the weights a step reads (the model's), if known."""
    int8 = w.dtype == torch.int8 and scales is not None
    default = "reduction" if rows == 1 else "int8pack" if int8 else "linear"
    small = w.numel() * w.element_size() < 1 << 18
    if not (int8 or w.dtype == torch.float32) or small or rows > FEW_ROWS:
        return default
    valid = tuple(forms or (COMPILED_INT8 if int8 else COMPILED_FP32))
    shape = "x".join(map(str, w.shape))
    # (the forms in the key: a choice made among fewer is measured again)
    key = f"compiled|{w.dtype}|{shape}|rows{rows}|t{torch.get_num_threads()}|{'+'.join(valid)}"
    return _remembered(key, valid, lambda: measure_compiled(w, working_set, scales, rows, valid))


def compiled_form(
    module: nn.Module, x: torch.Tensor, one: str = "reduction", few: str = "linear"
) -> str:
    """The form of x's product with the module's weight under torch.compile: what
    `set_compiled_form` set for x's rows, else `one` for a single row, `few` for more."""
    rows = x.numel() // x.shape[-1]
    return getattr(module, f"compiled_rows{rows}", one if rows == 1 else few)


def set_compiled_form(module: nn.Module, rows: int, form: str) -> None:
    """An attribute per number of rows, not one dict: a graph traced for one number guards only
    on its own attribute, so choosing the form for another does not retrace it."""
    setattr(module, f"compiled_rows{rows}", form)


def linear(x: torch.Tensor, w: torch.Tensor, compiled: str = "linear") -> torch.Tensor:
    """x @ w.T by the product chosen for these operands; under torch.compile, in the form
    `compiled` (see `choose_compiled`)."""
    if x.device.type != "cpu":
        return F.linear(x, w)
    if torch.compiler.is_compiling():
        if compiled == "reduction":
            return reduction(x, w)
        if compiled == "onednn":
            return _onednn(x, w)
        # "linear" and "template" (the graph's settings make it one)
        return F.linear(x, w.to(x.dtype))  # (no graph break for the measurement below)
    if torch.is_autocast_enabled("cpu"):
        return F.linear(x, w)
    return PRODUCTS[choose(x, w)](x, w)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with the products above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiled = compiled_form(self, x) if torch.compiler.is_compiling() else "linear"
        return linear(x, self.weight, compiled)
