"""Supervised fine-tuning (Llama 2, section 3.1): dialogs in the chat format, loss on the
assistant's tokens only, examples packed into rows with attention kept inside each.

`data` is a JSONL file (Alpaca, OpenAI messages or ShareGPT records) and `init_from` the
model to fine-tune; `epochs` (the paper: 2) sets the number of steps.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import save_hf
from ..data.sft import IGNORE, encode_for_training, pack, read_sft_jsonl
from ..llm import load
from .config import SFTConfig
from .loop import Dist, Stage, epoch_indices, train


def packed_loss(model, batch) -> torch.Tensor:
    inputs, targets, segments = batch
    logits = model(inputs, segments=segments)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def build_sft(cfg: SFTConfig, device: torch.device, d: Dist, encode=encode_for_training) -> Stage:
    """`encode(tokenizer, dialog) -> (ids, loss mask)`: the chat format with loss on every
    answer by default (Ghost Attention passes one with loss on the last answer only)."""
    if not cfg.init_from:
        raise ValueError("sft needs init_from=MODEL_DIR (the model to fine-tune)")
    if not cfg.data:
        raise ValueError("sft needs data=FILE.jsonl (instruction, messages or conversations)")
    base = load(cfg.init_from, dtype=torch.float32)
    if base.tokenizer is None:
        raise ValueError(f"{cfg.init_from}: no tokenizer.model")
    dialogs = read_sft_jsonl(cfg.data)
    examples = [encode(base.tokenizer, d_) for d_ in dialogs]
    val_every = 20 if len(examples) >= 40 else 0
    train_ex = [
        e for i, e in enumerate(examples) if not val_every or i % val_every != val_every - 1
    ]
    val_ex = [e for i, e in enumerate(examples) if val_every and i % val_every == val_every - 1]
    rows = pack(train_ex, cfg.seq_len)
    val_rows = pack(val_ex, cfg.seq_len) if val_ex else None
    n = rows[0].shape[0]

    def batch(step: int, part: int, parts: int):
        sel = torch.tensor(epoch_indices(step, n, cfg, part, parts))
        return tuple(t[sel] for t in rows)

    def val_batches(rank: int, world: int):
        if val_rows is None:
            return
        m = val_rows[0].shape[0]
        if world > 1:  # whole rounds only: every rank runs as many batches
            m -= m % (cfg.batch_size * world)
        for start in range(rank, m, cfg.batch_size * world):
            sel = torch.arange(start, min(m, start + cfg.batch_size * world), world)
            yield tuple(t[sel] for t in val_rows)

    model = base.model
    if cfg.lora_rank > 0:
        from ..lora import add_lora

        add_lora(model, cfg.lora_targets.split(","), cfg.lora_rank, cfg.lora_alpha)

    def save_model(state_dict: dict, path: Path) -> None:
        if cfg.lora_rank > 0:  # the adapter (PEFT files) beside the merged model
            from ..lora import merged_state_dict, save_adapter

            save_adapter(model, path.parent / "adapter", str(cfg.init_from))
            state_dict = merged_state_dict(model)
        save_hf(path, base.config, state_dict, base.tokenizer)

    return Stage(
        model=model,
        batch=batch,
        loss=packed_loss,
        save_model=save_model,
        val_batches=val_batches if val_rows is not None else None,
        tokens_per_step=cfg.batch_size * cfg.seq_len,
    )


def sft(cfg: SFTConfig, out: str | Path, resume: bool = False) -> list[dict]:
    if cfg.epochs > 0:
        # steps from epochs: rows are counted the way build_sft packs them
        base = load(cfg.init_from) if cfg.init_from else None
        if base is not None and cfg.data:
            dialogs = read_sft_jsonl(cfg.data)
            rows = pack([encode_for_training(base.tokenizer, x) for x in dialogs], cfg.seq_len)
            steps = max(1, math.ceil(cfg.epochs * rows[0].shape[0] / cfg.batch_size))
            cfg = dataclasses.replace(cfg, steps=steps)
    return train(cfg, Path(out), lambda device, d: build_sft(cfg, device, d), resume)
