"""What every benchmark prints first: the CPU, the instruction sets that decide which kernels
win (AVX-512, AVX512-BF16, AMX), the threads, and the memory bandwidth measured here (decoding
is bound by it: every token streams the whole weight)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llama2.kernels import cpu_name

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in FLAGS if f in have]


def bandwidth_gbs(threads: int, mb: int = 256) -> float:
    """Best of 5 copies of an fp32 buffer of `mb` MB (bytes read + written per second)."""
    torch.set_num_threads(threads)
    src = torch.ones(mb * 2**18)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def describe(threads: int) -> str:
    flags = ", ".join(cpu_flags()) or "none of " + ", ".join(FLAGS)
    return (
        f"CPU: {cpu_name()} ({flags}); {threads} threads; "
        f"memory bandwidth {bandwidth_gbs(threads):.1f} GB/s (copy); torch {torch.__version__}"
    )


if __name__ == "__main__":
    print(describe(torch.get_num_threads()))
