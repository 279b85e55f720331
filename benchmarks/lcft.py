"""Code Llama's long-context fine-tuning, in miniature (Code Llama, section 2.4, figures 4
and 11): a tiny model pretrained at 256 tokens (benchmarks/fim.py's model without FIM) is
fine-tuned at 1,024 tokens with the RoPE base left at 10,000 or raised to 1,000,000, on the
same standard-library files (whole, packed to the long length). Then `llama2 eval longctx`
on held-out files: the loss at each token position up to 4x the fine-tuning length, and key
retrieval by context length and depth, for the base and both fine-tuned models.

    python benchmarks/fim.py --out runs/fim        # first: the base model and its data
    python benchmarks/lcft.py --fim runs/fim --out runs/lcft
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from launch import run_side_by_side

from llama2 import Tokenizer
from llama2.data import prepare_corpus, stdlib_documents

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fim", default="runs/fim", help="benchmarks/fim.py's directory")
    p.add_argument("--out", default="runs/lcft")
    p.add_argument("--base", default="plain", help="which of its runs to continue")
    p.add_argument("--config", default=str(ROOT / "configs" / "codellama-lcft.yaml"))
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="as benchmarks/fim.py")
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--trials", type=int, default=4, help="keys per length and depth")
    p.add_argument("--rows", type=int, default=4, help="windows for the loss by position")
    p.add_argument("overrides", nargs="*", help="key=value settings for both runs")
    args = p.parse_args()
    fim, out = Path(args.fim), Path(args.out)
    base = fim / args.base / "model"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "manifest.json").exists():
        # benchmarks/fim.py's training files, whole this time; its held-out files for eval
        files = stdlib_documents(args.corpus_bytes)
        train = [f for i, f in enumerate(files) if i % 10 != 9]
        tok = Tokenizer.from_file(base)
        prepare_corpus(train, tok, out / "data", val_every=20, workers=1)
        held = out / "held_out"
        held.mkdir(exist_ok=True)
        for i, text in enumerate(json.loads((fim / "held_out.json").read_text())):
            (held / f"{i:03d}.py").write_text(text)
    commands = {}
    for name, theta in (("theta1e4", 10000), ("theta1e6", 1000000)):
        if (out / name / "model").exists():
            continue
        cmd = ["pretrain", "--config", args.config, "--out", str(out / name)]
        cmd += [f"data={out / 'data'}", f"init_from={base}", f"rope_theta={theta}", "threads=1"]
        commands[name] = [*cmd, *args.overrides]
    seconds = run_side_by_side(out, commands)
    print(f"fine-tuning: {seconds:.0f}s wall (two runs side by side)", flush=True)
    cmd = [sys.executable, "-m", "llama2.cli", "eval", "longctx", str(base)]
    cmd += [str(out / "theta1e4" / "model"), str(out / "theta1e6" / "model")]
    cmd += ["--data", str(out / "held_out"), "--out", str(out / "eval")]
    cmd += ["--lengths", args.lengths, "--depths", args.depths]
    cmd += ["--trials", str(args.trials), "--rows", str(args.rows)]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"evaluation: {time.time() - t0:.0f}s wall", flush=True)


if __name__ == "__main__":
    main()
