"""A compiled decode step of a few rows, in each form its fp32 products may take: the model
copied once per form, each copy's products of more than one row forced to that form
(`kernels.choose_compiled`, which otherwise measures the products alone), all compiled, then
their steps of one row and of `--rows` rows timed in turns, best of five rounds. "eager" is the
step without torch.compile.

    python benchmarks/compiled_forms.py [--preset tiny-110m] [--rows 8] [--threads 2]
                                        [--forms reduction linear onednn template eager]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from llama2 import Transformer, get_preset, kernels
from llama2.generation import CachedModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-110m")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument(
        "--forms", nargs="+", default=["reduction", "linear", "onednn", "template", "eager"]
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset)).eval()
    prompt, sizes = 9, (1, args.rows)
    steps = {}
    with torch.inference_mode():
        for form in args.forms:

            def forced(w, working_set=None, scales=None, rows=1, forms=None, form=form):
                return "reduction" if rows == 1 else form

            kernels.choose_compiled = forced  # (read when each row count's graph is traced)
            cached = CachedModel(copy.deepcopy(model), args.rows, 128, compile=form != "eager")
            cached.prefill([[1] * prompt] * args.rows)
            for b in (*sizes, *sizes):  # (compiles, then warms up)
                cached.decode([1] * b, [prompt] * b)
            steps[form] = cached
        best = {(f, b): float("inf") for f in steps for b in sizes}
        for _ in range(5):
            for form, cached in steps.items():
                for b in sizes:
                    t0 = time.perf_counter()
                    for pos in range(prompt, prompt + args.steps):
                        cached.decode([1] * b, [pos] * b)
                    ms = (time.perf_counter() - t0) / args.steps * 1e3
                    best[form, b] = min(best[form, b], ms)
    print(f"{args.preset}, {args.threads} threads, a decode step (best of 5):")
    for form in steps:
        one, many = best[form, 1], best[form, args.rows]
        print(
            f"  {form:10s} 1 row {one:6.1f} ms   {args.rows} rows {many:6.1f} ms   "
            f"{args.rows} rows give {args.rows * one / many:.2f}x one"
        )


if __name__ == "__main__":
    main()
