"""Supervised fine-tuning (Llama 2, section 3.1): dialogs in the chat format, loss on the
assistant's tokens only, examples packed into rows with attention kept inside each.

`data` is a JSONL file (Alpaca, OpenAI messages or ShareGPT records) and `init_from` the
model to fine-tune; `epochs` (the paper: 2) sets the number of steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoint import save_hf
from ..data.sft import IGNORE, encode_for_training, pack, read_sft_jsonl
from ..data.split import split_held_out
from ..llm import load
from ..model import Context
from .config import SFTConfig
from .loop import Dist, Stage, epoch_indices, held_out_chunks, train
from .losses import next_token_cross_entropy


def packed_loss(model, batch) -> torch.Tensor:
    inputs, targets, segments = batch
    return next_token_cross_entropy(model, inputs, targets, IGNORE, Context(segments=segments))


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
    train_ex, val_ex = split_held_out([encode(base.tokenizer, d_) for d_ in dialogs])
    rows = pack(train_ex, cfg.seq_len)
    val_rows = pack(val_ex, cfg.seq_len) if val_ex else None
    n = rows[0].shape[0]

    def batch(step: int, part: int, parts: int):
        sel = torch.tensor(epoch_indices(step, n, cfg, part, parts))
        return tuple(t[sel] for t in rows)

    def val_batches(rank: int, world: int):
        for chunk in held_out_chunks(val_rows[0].shape[0], cfg.batch_size, rank, world):
            yield tuple(t[chunk.start : chunk.stop] for t in val_rows)

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
        # epochs > 0: the steps are passes over the packed rows
        steps=max(1, math.ceil(cfg.epochs * n / cfg.batch_size)) if cfg.epochs > 0 else None,
    )


def sft(
    cfg: SFTConfig, out: str | Path, resume: bool = False, encode=encode_for_training
) -> list[dict]:
    return train(cfg, Path(out), lambda device, d: build_sft(cfg, device, d, encode), resume)
