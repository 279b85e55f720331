"""The run directory every stage writes, and how it is written.

    out/config.yaml            the resolved settings of the stage
    out/metrics.jsonl          one JSON row per step (cut back to the checkpoint on resume)
    out/checkpoints/step_N/    whole or absent: written under a hidden name, then renamed
    out/model -> checkpoints/step_N/model   the latest model, for generate, serve and the
                                            next stage
    out/*.png                  curves of the metrics

A directory that already holds checkpoints is refused unless the run resumes, and resuming
needs a complete checkpoint. Every file appears atomically (llama2/io.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.jsonl import read_jsonl_rows, write_jsonl
from ..device import pick_device
from ..io import (
    DiskFullError,
    atomic_file,
    disk_full,
    fsync,
    fsync_tree,
    point_link,
    write_atomic,
)
from .config import config_to_yaml


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not checkpoints)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / "trainer.pt").exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def check_run(out: Path, resume: bool, products: Iterable[str] = ()) -> None:
    """Refuse, before anything is read or written, an `out` that cannot take this run: a
    file; one that already holds a run (checkpoints, or one of the stage's `products`) unless
    the run resumes; a missing one when it does."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    if resume:
        if not out.is_dir():
            raise ValueError(f"{out}: --resume, but there is no such run directory")
    elif checkpoint_dirs(out) or any((out / p).exists() for p in products):
        raise ValueError(f"{out} already holds a run: pass --resume, or choose another --out")


@contextmanager
def new_run(out: Path) -> Iterator[None]:
    """Around a stage's setup (its settings, data and models checked and loaded, up to its
    first product): if the setup fails, a run directory it made (with any parents) is removed
    again, so that a refused run leaves nothing behind."""
    top = None
    for p in (out, *out.parents):  # the outermost directory that is not there yet
        if p.exists() or p.is_symlink():
            break
        top = p
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def resume_from(out: Path) -> Path:
    """The latest complete checkpoint, or a clear error."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"{out}: --resume, but there is no complete checkpoint to resume from")
    return ckpt


def start_run(out: Path, cfg, resume: bool) -> tuple[torch.device, Path | None]:
    """A training run's first moves, before any input is read: its device (cfg.device,
    checked to be there), `out` checked to take the run, and the checkpoint a resumed run
    continues from (None for a fresh run); torch's CPU threads set (cfg.threads, 0: torch's
    default)."""
    device = pick_device(cfg.device)
    check_run(out, resume)  # (each process of a distributed run: it only reads)
    ckpt = resume_from(out) if resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return device, ckpt


def due(step: int, every: int, last: int) -> bool:
    """Whether an evaluation or checkpoint falls at `step` (counted from 1): every `every`
    steps, and at the last."""
    return step % every == 0 or step == last


def write_config(out: Path, cfg) -> None:
    write_atomic(out / "config.yaml", config_to_yaml(cfg))


class Metrics:
    """metrics.jsonl: on resume, the rows up to the checkpoint's step are kept (a killed run
    may have logged steps past it), then rows are appended and flushed one by one."""

    def __init__(self, out: Path, start: int):
        self.path = out / "metrics.jsonl"
        self.rows = [m for m in read_jsonl_rows(self.path) if m["step"] <= start] if start else []
        write_jsonl(self.path, self.rows)
        self._log = open(self.path, "a")  # noqa: SIM115 (closed by close())

    def append(self, row: dict) -> None:
        self.rows.append(row)
        try:
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()
        except OSError as e:
            if disk_full(self.path, e):
                raise DiskFullError(self.path) from e
            raise

    def close(self) -> None:
        self._log.close()


class RunLog:
    """What a training run writes and shows beside its checkpoints: config.yaml,
    metrics.jsonl (a resumed run's cut back to its checkpoint's step) and a progress bar.
    Made once the stage's inputs are read and checked and any checkpoint is restored; used as
    a context (`with log:`) around the steps, which closes the bar and the metrics file. Only
    the main process of a distributed run (`main`) writes or shows anything."""

    def __init__(
        self,
        out: Path,
        cfg,
        start: int,
        ckpt: Path | None = None,
        main: bool = True,
        desc: str = "training",
        unit: str = "step",
    ):
        self.start, self.main = start, main
        self.metrics: Metrics | None = None
        if main:
            if ckpt is not None:
                print(f"resuming from {ckpt} ({unit} {start})", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            self.metrics = Metrics(out, start)
            write_config(out, cfg)
        self._bar_args = {"total": cfg.steps, "initial": start, "desc": desc, "unit": unit}
        self._bar: tqdm | None = None

    def __enter__(self) -> RunLog:
        self._bar = tqdm(**self._bar_args, disable=not self.main)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.metrics is not None:
            self.metrics.close()

    @property
    def rows(self) -> list[dict]:
        """The metrics rows so far (none on a process other than the main one)."""
        return self.metrics.rows if self.metrics is not None else []

    def first(self, evaluate: Callable[[], dict]) -> None:
        """On a fresh run, a row of step 0 from `evaluate` (every process runs it): the
        starting point of the held-out curves. A resumed run keeps the one it logged."""
        if self.start == 0:
            row = evaluate()
            if row and self.metrics is not None:
                self.metrics.append({"step": 0} | row)

    def log(self, row: dict, **postfix: str) -> None:
        """A step's metrics row, and the progress bar moved on, showing `postfix`."""
        if self.metrics is not None:
            self.metrics.append(row)
        if self._bar is not None:
            self._bar.set_postfix(**postfix)
            self._bar.update()


def link_model(out: Path) -> None:
    """out/model -> sft/model, for the stages whose fine-tuning is a run directory of its own
    (out/sft): their run directory has a `model` as every other stage's does, for `llama2
    generate RUN/model` and the next stage's init_from."""
    if (out / "sft" / "model").exists():
        point_link(out / "model", out / "sft" / "model")


def checkpoint_tmp(out: Path, step: int, fresh: bool = True) -> Path:
    """The hidden directory checkpoint `step` is written into, emptied and created if `fresh`
    (a fixed name, so that every process of a distributed run writes into the same one)."""
    tmp = out / "checkpoints" / f".tmp_step_{step:07d}"
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(out: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Make the checkpoint written into `tmp` visible, whole: flushed, renamed to step_N, the
    `model` link moved to it, and all but the last `keep_last` checkpoints removed."""
    final = out / "checkpoints" / f"step_{step:07d}"
    fsync_tree(tmp)  # on disk before the rename makes the checkpoint visible
    os.replace(tmp, final)
    fsync(final.parent)
    point_link(out / "model", final / "model")
    for old in checkpoint_dirs(out)[:-keep_last]:
        shutil.rmtree(old)
    return final


def plot_metrics(
    metrics: list[dict],
    path: Path,
    curves: dict[str, str] | None = None,
    ylabel: str = "cross-entropy (nats/token)",
) -> None:
    """A PNG of metric curves by step ({metric key: label}; keys seen only at evaluations get
    markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves or {"loss": "train loss", "val_loss": "validation loss"}
    steps = sum(1 for m in metrics if m["step"] > 0)  # (step 0: the evaluation before training)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in curves.items():
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            sparse = len(points) < steps
            ax.plot(*zip(*points, strict=True), "o-" if sparse else "-", label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
