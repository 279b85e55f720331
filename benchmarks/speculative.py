"""Speculative decoding's speed-up: greedy tokens/s of a target alone and with a draft model,
side by side in one run, and the share of the draft's tokens accepted.

    python benchmarks/speculative.py TARGET DRAFT [DRAFT ...] [--new 128] [--draft-tokens 3 4 6]

TARGET and each DRAFT: checkpoints with the same tokenizer, e.g. `llama2 pretrain` runs'
`model` directories (tiny-110m and tiny-15m on the embedded corpus); a draft may be quantized
(`llama2 quantize`), which makes its proposals cheaper and leaves the output the target's.
Each prompt (the starts of standard library code) is decoded for --new tokens, greedy, EOS
ignored, once alone and once with each draft for each --draft-tokens, in turns, --repeats
rounds (best of the rounds is kept for each): a shared machine's drift falls on all of them
alike. The outputs with and without
the draft are checked to be the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe

from llama2 import load
from llama2.generation import SamplingParams, generate
from llama2.speculative import check_draft

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    'class Error(Exception):\n    """',
    "    def __init__(self, name, value=None):\n        self.",
    "for i in range(len(",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("drafts", nargs="+", metavar="draft")
    ap.add_argument("--new", type=int, default=128, help="tokens generated a prompt")
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="compiled decode steps for both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(args.threads), flush=True)
    target = load(args.target, dtype="float32")
    tok = target.tokenizer
    n_target = sum(p.numel() for p in target.model.parameters())
    print(f"target {args.target}: {n_target / 1e6:.1f}M parameters")
    drafts = {}
    for i, path in enumerate(args.drafts):
        drafts[i] = load(path, dtype="float32")
        check_draft(tok, drafts[i].tokenizer)
        n_draft = sum(p.numel() for p in drafts[i].model.parameters())
        print(f"draft {i} {path}: {n_draft / 1e6:.1f}M parameters")
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=args.new, temperature=0)

    runs = {"target alone": None} | {
        f"draft {i}, k={k}": (i, k) for i in drafts for k in args.draft_tokens
    }

    def run(which):
        if which is None:
            return [generate(target.model, tok, [p], params, (), compile=args.compile)[0]
                    for p in prompts]  # fmt: skip
        i, k = which
        return generate(
            target.model, tok, prompts, params, (), compile=args.compile,
            draft=drafts[i].model, draft_tokens=k,
        )  # fmt: skip

    for which in runs.values():  # warm-up (and compilation)
        run(which)
    best: dict[str, float] = {}
    outputs: dict[str, list] = {}
    for r in range(args.repeats):
        for name, which in runs.items():
            t = time.perf_counter()
            outputs[name] = run(which)
            dt = time.perf_counter() - t
            best[name] = min(best.get(name, float("inf")), dt)
        print(f"  round {r + 1}/{args.repeats} done", flush=True)

    alone = outputs["target alone"]
    tokens = sum(len(c.token_ids) for c in alone)
    base = tokens / best["target alone"]
    print(f"\n{len(prompts)} prompts x {args.new} new tokens, greedy (best of {args.repeats})")
    print(f"{'':16s} {'tokens/s':>9s} {'speed-up':>9s} {'accepted':>9s}  same tokens")
    for name in runs:
        rate = tokens / best[name]
        accepted = "" if name == "target alone" else f"{mean_acceptance(outputs[name]):.0%}"
        same = all(a.token_ids == b.token_ids for a, b in zip(alone, outputs[name], strict=True))
        print(f"{name:16s} {rate:9.1f} {rate / base:8.2f}x {accepted:>9s}  {same}")


def mean_acceptance(completions) -> float:
    rates = [c.draft_acceptance for c in completions if c.draft_acceptance is not None]
    return sum(rates) / max(len(rates), 1)


if __name__ == "__main__":
    main()
