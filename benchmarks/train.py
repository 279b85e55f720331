"""Training throughput on a CPU: our loop vs a plain transformers + torch AdamW loop.

    python benchmarks/train.py [--preset tiny-15m] [--batch 8] [--seq 256] [--steps 8] [--threads 2]
        [--bf16] [--compile]

The same model shapes, random batches, batch size, sequence length and threads; tokens/s
is measured over the steps after a warm-up step. Model FLOPs utilisation uses 6 * N * tokens
(N without the embedding) plus attention, against the machine's measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

ROOT = Path(__file__).parent.parent
VOCAB = 32000  # the presets' (and Llama 2's) vocabulary


def peak_flops(threads: int) -> float:
    """The faster of MKL's and oneDNN's fp32 2048^3 products (oneDNN's uses AVX-512 on AMD
    CPUs, where MKL's does not)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for product in products:
        product()
        t = time.perf_counter()
        for _ in range(10):
            product()
        best = max(best, 10 * 2 * 2048**3 / (time.perf_counter() - t))
    return best


def hf_loop(
    preset: str, batch: int, seq: int, steps: int, threads: int, bf16: bool = False
) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2 import get_preset

    torch.set_num_threads(threads)
    cfg = get_preset(preset, max_seq_len=max(seq, 256))
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg.to_hf_config())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        x = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * seq / (sum(times[1:]) / steps)


def ours(
    preset: str,
    batch: int,
    seq: int,
    steps: int,
    threads: int,
    compile: bool = False,
    bf16: bool = False,
) -> float:
    """Our `llama2 pretrain` on random-token shards, its own tokens_per_s from metrics.jsonl."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        np.random.default_rng(0).integers(3, VOCAB, 2_000_000, dtype=np.uint16).tofile(
            data / "t.bin"
        )
        np.random.default_rng(1).integers(3, VOCAB, 10_000, dtype=np.uint16).tofile(data / "v.bin")
        from llama2 import Tokenizer

        tok = Tokenizer.from_file(ROOT / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf")
        tok.save(data / "tokenizer.model")
        manifest = {
            "tokenizer_sha256": tok.sha256(),
            "vocab_size": VOCAB,
            "dtype": "uint16",
            "train": {"shards": [{"file": "t.bin", "tokens": 2_000_000}]},
            "val": {"shards": [{"file": "v.bin", "tokens": 10_000}]},
        }
        (data / "manifest.json").write_text(json.dumps(manifest))
        cmd = [
            sys.executable,
            "-m",
            "llama2.cli",
            "pretrain",
            "--out",
            str(tmp / "run"),
            f"data={data}",
            f"model={preset}",
            f"steps={steps + 1}",
            f"batch_size={batch}",
            f"seq_len={seq}",
            f"threads={threads}",
            "eval_every=100000",
            "ckpt_every=100000",
            f"compile={compile}",
            f"autocast={'bfloat16' if bf16 else 'none'}",
        ]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    # our loop times each step; the final step also writes a checkpoint after its timing
    skip = 2 if compile else 1  # the first (compiled) steps are warm-up
    return sum(r["tokens_per_s"] for r in rows[skip:]) / len(rows[skip:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-15m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs; the best counts")
    p.add_argument("--compile", action="store_true", help="also time ours with compile=true")
    p.add_argument("--bf16", action="store_true", help="also time both with bf16 autocast")
    args = p.parse_args()
    print(describe(args.threads), flush=True)
    from llama2 import get_preset

    cfg = get_preset(args.preset)
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # without the embedding lookup
    attn = 6 * cfg.n_layers * args.seq * cfg.dim  # per token: QK^T and AV, forward + backward
    flops_per_token = 6 * n + attn
    peak = peak_flops(args.threads)
    runs = {"ours": [], "ours+compile": [], "hf": [], "ours bf16": [], "hf bf16": []}
    shape = (args.preset, args.batch, args.seq, args.steps, args.threads)
    for _ in range(args.repeats):  # alternate, so that a noisy moment hits all alike
        runs["ours"].append(ours(*shape))
        if args.compile:
            runs["ours+compile"].append(ours(*shape, compile=True))
        runs["hf"].append(hf_loop(*shape))
        if args.bf16:
            runs["ours bf16"].append(ours(*shape, bf16=True))
            runs["hf bf16"].append(hf_loop(*shape, bf16=True))
        print("  " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items() if v), flush=True)
    print(
        f"{args.preset}, batch {args.batch} x {args.seq}, {args.threads} threads; "
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; best of {args.repeats}"
    )
    names = {
        "ours": "llama2",
        "ours+compile": "llama2 compile=true",
        "hf": "transformers+AdamW",
        "ours bf16": "llama2 bf16 autocast",
        "hf bf16": "transformers bf16",
    }
    for key, values in runs.items():
        if values:
            tps = max(values)
            peer = max(runs["hf bf16" if "bf16" in key else "hf"])
            ratios = f"   {tps / peer:.2f}x transformers"
            if key == "ours bf16":
                ratios += f", {tps / max(runs['ours']):.2f}x our fp32"
            print(
                f"{names[key]:22s} {tps:8.0f} tokens/s   MFU {tps * flops_per_token / peak:5.1%}"
                + ratios
            )


if __name__ == "__main__":
    main()
