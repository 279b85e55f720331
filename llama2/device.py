"""Which device to run on, and the peak memory a piece of work used there."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch


def pick_device(name: str | None = None) -> torch.device:
    """The device `name` names (None or "auto": this process's CUDA device if there is one,
    else the CPU), checked to be there."""
    if name is None or name == "auto":
        if torch.cuda.is_available():  # under torchrun, each process its own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # (torch without CUDA asserts)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device={name} is not available here ({first})") from e
    return device


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak resident
    set (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # (then the peak is the process's since it started)


def peak_memory_mb() -> float:
    """Peak memory since reset_peak_memory: CUDA's allocated bytes once CUDA is in use, else
    the process's peak resident set (weights, optimizer, activations, the interpreter)."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
