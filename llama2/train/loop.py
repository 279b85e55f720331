"""The training loop every stage shares.

A stage supplies its model, a batch function and a loss; the loop does the rest: AdamW
(decay on matrices only), cosine schedule with warmup down to `min_lr_ratio` of the peak,
gradient accumulation, clipping, bf16 autocast on CUDA, activation checkpointing,
torch.compile, validation, a progress bar, metrics.jsonl, a loss-curve PNG, and atomic
checkpoints (the model in HF layout, plus optimizer, scheduler, RNG and step) that resume
exactly. Under `torchrun` the model is sharded with FSDP2 and checkpoints are written with
torch.distributed.checkpoint, so a run can resume on a different number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..data.split import derive_seed
from ..device import peak_memory_mb, reset_peak_memory
from ..io import removed_on_error
from .config import LoopConfig, TrainConfig
from .rundir import (
    RunLog,
    checkpoint_tmp,
    due,
    new_run,
    plot_metrics,
    publish_checkpoint,
    start_run,
)

Batch = tuple[torch.Tensor, ...]


@dataclass
class Stage:
    """What a training stage brings to the loop."""

    model: nn.Module
    batch: Callable[[int, int, int], Batch]  # (step, part, parts) -> that slice of the step's batch
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # mean loss of a batch
    save_model: Callable[[dict, Path], None]  # full state dict -> HF directory
    val_batches: Callable[[int, int], Iterable[Batch]] | None = None  # (rank, world) -> batches
    tokens_per_step: int = 0  # tokens of a step's batch, when every batch has as many
    # the real (unpadded) tokens of one batch, when they vary (padded pairs); else
    # tokens_per_step is the count
    batch_tokens: Callable[[Batch], int] | None = None
    val_metrics: Callable[[nn.Module], dict] | None = None  # more held-out numbers (all ranks)
    steps: int | None = None  # the run's length when the data sets it (SFT's epochs)
    # what the loss is, for the loss plot; and whether it is a token cross-entropy, whose
    # exponential (perplexity) means something (not for a ranking or DPO loss)
    loss_label: str = "cross-entropy (nats/token)"
    perplexity: bool = True


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if device.type == "cuda":  # FSDP2 and NCCL use the current device: make it this rank's
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a setting on a device (None: fp32 throughout)."""
    if setting == "none" or (setting == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if setting == "float16" else torch.bfloat16


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak (Llama 2, section 2.2)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def epoch_indices(step: int, n: int, cfg: TrainConfig, part: int, parts: int) -> list[int]:
    """Example indices of slice `part` of `parts` of the batch of `step`, over a dataset of n
    examples shuffled afresh each epoch: a function of the seed and the step alone, so runs
    resume exactly and one or many processes see the same global batch."""
    idx = []
    for k in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, i = divmod(k, n)
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "epochs", epoch))
        perm = torch.randperm(n, generator=g)
        idx.append(int(perm[i]))
    per = cfg.batch_size // parts
    return idx[part * per : (part + 1) * per]


def epoch_batches(
    items: Sequence, cfg: TrainConfig, collate: Callable[[list], Batch]
) -> Callable[[int, int, int], Batch]:
    """A Stage.batch over `items`, shuffled afresh each epoch (epoch_indices): `collate`
    makes the tensors of a slice's items."""

    def batch(step: int, part: int, parts: int) -> Batch:
        return collate([items[i] for i in epoch_indices(step, len(items), cfg, part, parts)])

    return batch


def held_out_chunks(n: int, batch_size: int, rank: int, world: int) -> list[range]:
    """This rank's batches of n held-out items. With several processes, whole rounds only:
    every rank runs as many batches (FSDP forwards are collective)."""
    usable = n - n % (batch_size * world) if world > 1 else n
    starts = range(rank * batch_size, usable, batch_size * world)
    return [range(s, min(s + batch_size, usable)) for s in starts]


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms). `fused`: one kernel for all
    parameters (plain tensors only, so not under FSDP)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    betas = (cfg.beta1, cfg.beta2)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None)


def shard_model(model: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """An FSDP2-sharded model's parameters all-gathered once for a stretch of forward passes
    (a generation: one gather, not one per decoded token), sharded again after; a no-op for
    a plain model. Every rank must enter it (the gather is collective)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            # FSDP2's defaults: the root keeps its parameters after forward, blocks reshard
            m.set_reshard_after_forward(m is not model, recurse=False)


def map_shards(fn: Callable[[int, list], list], items: Sequence, size: int, d: Dist) -> list:
    """`fn(b, chunk)` over the items cut into chunks of `size`, chunk b run by rank
    b % world, the results joined in the items' order on every rank. The chunks (and so
    whatever `fn` seeds by b) are the same however many processes run it; `fn` must not run
    collectives (ranks may get different numbers of chunks)."""
    starts = range(0, len(items), size)
    mine = {
        b: fn(b, list(items[s : s + size])) for b, s in enumerate(starts) if b % d.world == d.rank
    }
    if d.world > 1:
        parts: list = [None] * d.world
        dist.all_gather_object(parts, mine)
        mine = {b: r for part in parts for b, r in part.items()}
    return [r for b in sorted(mine) for r in mine[b]]


def enable_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        forward = block.forward

        def wrapped(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(
    out, step, model, optim, sched, stage, cfg, d: Dist, extra: dict | None = None
) -> Path | None:
    """Model (HF layout), sharded optimizer state, scheduler (if any), RNG and `extra` (the
    stage's own counters, in trainer.pt); the path on the main process."""
    tmp = checkpoint_tmp(out, step, fresh=d.main)  # the main process empties it
    d.barrier()
    model_sd, optim_sd = get_state_dict(model, optim)
    final = None
    # a failed write (a full disk) leaves no temporary behind, and the last checkpoint whole
    with removed_on_error(tmp, tmp.with_name(f"step_{step:07d}")):
        with warnings.catch_warnings():  # (one process: DCP says it assumes so)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if d.main:
            stage.save_model(full, tmp / "model")
            torch.save(
                {
                    "step": step,
                    "scheduler": None if sched is None else sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "config": json.loads(json.dumps(cfg.__dict__)),
                }
                | (extra or {}),
                tmp / "trainer.pt",
            )
            final = publish_checkpoint(out, tmp, step, cfg.keep_last)
    d.barrier()
    return final


def load_checkpoint(path: Path, model, optim, sched) -> int:
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    if sched is not None:
        sched.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    return trainer["step"]


# --- the loop ------------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """A loss or gradient norm that is NaN or infinite: training stops before the update."""


def check_finite(step: int, loss: float, grad_norm: float, what: str = "step") -> None:
    """Stop before a NaN or infinite loss or gradient reaches the weights (a step taken with
    it would make every later checkpoint a model of NaNs): the checkpoints written so far are
    the run's last good state."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(
            f"{what} {step}: loss {loss}, gradient norm {grad_norm}: not finite, so training "
            "stops before this update (lower lr, check the data; --resume continues from the "
            "last checkpoint)"
        )


def evaluate(stage: Stage, model: nn.Module, d: Dist, autocast) -> dict:
    if stage.val_batches is None:
        return {}
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), autocast():
        for batch in stage.val_batches(d.rank, d.world):
            n = batch[0].shape[0]
            total += torch.tensor([stage.loss(model, batch).item() * n, n], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(total)
    model.train()
    extra = {}
    if stage.val_metrics is not None:
        model.eval()
        with torch.no_grad(), autocast():
            extra = stage.val_metrics(model)
        model.train()
    if total[1] == 0:
        return extra
    val_loss = float(total[0] / total[1])
    if not stage.perplexity:
        return {"val_loss": val_loss} | extra
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))} | extra


def train(
    cfg: LoopConfig,
    out: Path,
    build: Callable[[torch.device, Dist], Stage],
    resume: bool = False,
    blocks: Callable[[nn.Module], Iterable[nn.Module]] = lambda m: m.layers,
) -> list[dict]:
    """Run (or resume) a training stage into the run directory `out`; return its metrics."""
    out = Path(out)
    device, ckpt = start_run(out, cfg, resume)
    d = setup_distributed(device)
    # the stage's data and model are read and checked before the run directory is made (or,
    # for the embedded corpus, it is removed again if they fail)
    with new_run(out) if d.main else nullcontext():
        torch.manual_seed(cfg.seed)
        stage = build(device, d)
        if stage.steps is not None:
            cfg = dataclasses.replace(cfg, steps=stage.steps)
        model = stage.model.to(device)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(blocks(model))
        if d.world > 1:
            shard_model(model, blocks(model))
        optim = make_optimizer(model, cfg, fused=d.world == 1)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, cfg))
        start = 0 if ckpt is None else load_checkpoint(ckpt, model, optim, sched)
        log = RunLog(out, cfg, start, ckpt, main=d.main)
    forward_model = torch.compile(model) if cfg.compile else model
    amp_dtype = autocast_dtype(cfg.autocast, device)

    def autocast():
        if amp_dtype is not None:
            return torch.autocast(device.type, dtype=amp_dtype)
        return nullcontext()

    model.train()
    with log:
        if stage.val_batches is not None:  # the starting point of every validation curve
            log.first(lambda: evaluate(stage, forward_model, d, autocast))
        t_start = time.perf_counter()
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            reset_peak_memory()
            total = 0.0
            tokens = 0
            parts = cfg.grad_accum * d.world  # the global batch, cut for accumulation and ranks
            for micro in range(cfg.grad_accum):
                batch = stage.batch(step, micro * d.world + d.rank, parts)
                batch = tuple(t.to(device) for t in batch)
                with autocast():
                    loss = stage.loss(forward_model, batch) / cfg.grad_accum
                loss.backward()
                total += loss.item()
                if stage.batch_tokens is not None:
                    tokens += stage.batch_tokens(batch)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if stage.batch_tokens is None:
                tokens = stage.tokens_per_step
            if d.world > 1:
                t = torch.tensor([total, tokens], dtype=torch.float64)
                dist.all_reduce(t)
                total = float(t[0]) / d.world
                if stage.batch_tokens is not None:  # each rank counted its own slices
                    tokens = int(t[1])
            check_finite(step + 1, total, float(grad_norm))  # (every rank: the same numbers)
            optim.step()
            optim.zero_grad(set_to_none=True)
            lr = optim.param_groups[0]["lr"]
            sched.step()
            dt = time.perf_counter() - t0
            row = {
                "step": step + 1,
                "loss": total,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / dt,
                "peak_mem_mb": peak_memory_mb(),  # of this step (this process)
                "elapsed_s": time.perf_counter() - t_start,
            }
            if due(step + 1, cfg.eval_every, cfg.steps):
                row |= evaluate(stage, forward_model, d, autocast)
            log.log(row, loss=f"{total:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if due(step + 1, cfg.ckpt_every, cfg.steps):
                save_checkpoint(out, step + 1, model, optim, sched, stage, cfg, d)
                if d.main:
                    plot_metrics(log.rows, out / "loss.png", ylabel=stage.loss_label)
    return log.rows
