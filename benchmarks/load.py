"""Load a random-init 7B-shaped bf16 checkpoint (HF layout) and produce one token.

Reports load time (imports excluded), time to the first token and peak RSS for llama2.load
and for transformers' LlamaForCausalLM.from_pretrained on the same files, each in a fresh
process, side by side.

    python benchmarks/load.py [--dir /tmp/llama2-7b-random] [--preset llama2-7b]

The checkpoint (13.5 GB for 7B) is written once, in bounded memory, and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

CHILD = {
    "llama2": """
import llama2, torch
t0 = time.perf_counter()
llm = llama2.load(DIR)
t_load = time.perf_counter() - t0
with torch.inference_mode():
    top5 = llm.model(torch.tensor([PROMPT]))[0, -1].topk(5).indices.tolist()
""",
    "transformers": """
import torch
from transformers import LlamaForCausalLM
t0 = time.perf_counter()
model = LlamaForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16).eval()
t_load = time.perf_counter() - t0
with torch.inference_mode():
    top5 = model(torch.tensor([PROMPT])).logits[0, -1].float().topk(5).indices.tolist()
""",
}
PROMPT = [1, 15043, 3186, 29892, 590]


class RandomWeights(Mapping):
    """A state dict whose tensors are made (deterministically) only when asked for."""

    def __init__(self, shapes: dict[str, torch.Size], dtype: torch.dtype):
        self.shapes, self.dtype = shapes, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            return torch.ones(self.shapes[name], dtype=self.dtype)
        return (torch.randn(self.shapes[name], generator=g) * 0.02).to(self.dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def make_checkpoint(path: Path, preset: str) -> None:
    from llama2 import get_preset, save_hf
    from llama2.checkpoint.common import param_shapes

    cfg = get_preset(preset)
    shapes = {k: v.shape for k, v in param_shapes(cfg).items()}
    print(f"writing random {preset} bf16 checkpoint to {path} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    save_hf(
        path,
        cfg,
        RandomWeights(shapes, torch.bfloat16),
        dtype=torch.bfloat16,
        max_shard_bytes=2 * 2**30,
    )
    print(f"  written in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def measure(which: str, path: Path) -> dict:
    code = "import time, resource, json\n"
    code += CHILD[which].replace("DIR", repr(str(path))).replace("PROMPT", repr(PROMPT))
    code += (
        "t_total = time.perf_counter() - t0\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps(dict(load_s=t_load, first_token_s=t_total - t_load, "
        "peak_rss=rss, top5=top5)))\n"
    )
    print(f"running {which} ...", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/llama2-7b-random")
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").exists():
        make_checkpoint(path, args.preset)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # drop nothing from the page cache: both runs see the same warm files
    results = {"llama2": measure("llama2", path)}
    if not args.skip_transformers:
        results["transformers"] = measure("transformers", path)
    gb = 2**30
    print(
        f"\ncheckpoint: {args.preset}, bf16, {size / gb:.2f} GiB, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'':14s}{'load s':>9s}{'1st token s':>13s}{'peak RSS GiB':>14s}{'RSS/size':>10s}")
    for name, r in results.items():
        print(
            f"{name:14s}{r['load_s']:9.2f}{r['first_token_s']:13.2f}"
            f"{r['peak_rss'] / gb:14.2f}{r['peak_rss'] / size:10.2f}"
        )
    if "transformers" in results:
        ours, theirs = results["llama2"], results["transformers"]
        print(f"top-5 next tokens: ours {ours['top5']}, transformers {theirs['top5']}")
        print(
            f"load time ratio (transformers / ours) {theirs['load_s'] / ours['load_s']:.2f}x; "
            f"peak RSS ratio {theirs['peak_rss'] / ours['peak_rss']:.2f}x"
        )


if __name__ == "__main__":
    main()
