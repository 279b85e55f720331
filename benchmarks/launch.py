"""`llama2` commands run side by side, each in its own process with its own log (two training
runs on two cores take the time of one)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def run_side_by_side(out: Path, commands: dict[str, list[str]]) -> float:
    """Runs `python -m llama2.cli ARGS` for every name: ARGS of `commands` at once, each
    writing OUT/NAME.log, and waits for all; a failed run ends the benchmark. Wall seconds."""
    t0 = time.time()
    procs = []
    for name, args in commands.items():
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        cmd = [sys.executable, "-m", "llama2.cli", *args]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        if proc.wait():
            raise SystemExit(f"{log.name}: the run failed")
        log.close()
    return time.time() - t0
