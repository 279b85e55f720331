"""Rollout throughput: PPO-style sampling of a batch with the KV-cache generator, in one
process and in two (torchrun, gloo, the model sharded with FSDP2, each rank sampling half the
rows), the two-process way both with the parameters gathered once per generation
(train.loop.gathered, what PPO does) and with FSDP's own gather before every forward (one
per decoded token).

    python benchmarks/rollout.py                       # tiny-110m, random weights
    python benchmarks/rollout.py --preset micro --rows 4 --new-tokens 16   # a quick check

Each configuration runs in fresh processes with the same number of threads in all (2 for
one process, 1 per rank for two); rollout tokens/s = all ranks' generated tokens / the
slowest rank's wall time, best of `--repeats` generations after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf"  # Llama 2's 32000 pieces


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from llama2 import Tokenizer, Transformer, get_preset
    from llama2.generation import SamplingParams, generate
    from llama2.train.loop import gathered, setup_distributed, shard_model

    d = setup_distributed(torch.device("cpu"))
    torch.manual_seed(0)  # the same random weights on every rank
    model = Transformer(get_preset(args.preset)).eval().requires_grad_(False)
    if d.world > 1:
        shard_model(model, model.layers)
    tok = Tokenizer.from_file(VOCAB)
    g = torch.Generator().manual_seed(1)
    vocab = min(model.config.vocab_size, tok.vocab_size)
    prompts = torch.randint(3, vocab, (args.rows, args.prompt_tokens), generator=g).tolist()
    mine = prompts[d.rank :: d.world]
    # stop on no token: every row generates new_tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=d.rank)

    def rollout(new_tokens: int) -> float:
        p = SamplingParams(**{**params.__dict__, "max_new_tokens": new_tokens})
        if d.world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        with gathered(model) if args.mode == "gathered" else nullcontext():
            out = generate(model, tok, mine, p)
        dt = torch.tensor([time.perf_counter() - t0])
        assert all(len(o.token_ids) == new_tokens for o in out)
        if d.world > 1:
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return float(dt)

    rollout(4)  # warm-up
    best = min(rollout(args.new_tokens) for _ in range(args.repeats))
    if d.main:
        tokens = args.rows * args.new_tokens
        print(json.dumps({"tokens_per_s": tokens / best, "seconds": best}), flush=True)


def launch(args: argparse.Namespace, procs: int, mode: str) -> dict:
    cmd = [sys.executable]
    if procs > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd += [__file__, "--worker", "--mode", mode, "--preset", args.preset]
    cmd += ["--rows", str(args.rows), "--prompt-tokens", str(args.prompt_tokens)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    threads = str(max(1, args.threads // procs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-110m")
    ap.add_argument("--rows", type=int, default=8, help="the rollout batch (all ranks)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of all processes together")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.rows % 2:
        raise SystemExit(f"--rows {args.rows}: give an even number (two ranks share them)")
    print(f"{args.preset}, random weights, fp32, CPU; {args.rows} rows x {args.prompt_tokens} "
          f"prompt tokens + {args.new_tokens} sampled; {args.threads} threads in all")  # fmt: skip
    runs = {
        "1 process": (1, "plain"),
        "2 processes, FSDP2, gathered once per generation": (2, "gathered"),
        "2 processes, FSDP2, gathered every forward": (2, "per-forward"),
    }
    for name, (procs, mode) in runs.items():
        r = launch(args, procs, mode)
        print(f"{name:52s} {r['tokens_per_s']:8.1f} tokens/s  ({r['seconds']:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
