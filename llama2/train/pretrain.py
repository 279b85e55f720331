"""Pretraining: next-token prediction on packed token shards (Llama 2, section 2).

With no data given, the embedded corpus is used: a tokenizer is trained on this Python's
standard library sources and the shards are prepared into the run directory.

Code Llama's stages are this one with settings: `fim_rate` lays training documents out for
infilling (data/fim.py; validation stays left to right), and `init_from` with `rope_theta`
and a longer `seq_len` is its long-context fine-tuning (the model's context grows to it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..checkpoint import save_hf
from ..config import get_preset
from ..data import PackedShards, prepare_corpus, stdlib_documents
from ..data.fim import FimTransform
from ..llm import load
from ..model import Transformer
from ..tokenizer import Tokenizer, train_tokenizer
from .config import PretrainConfig
from .loop import Dist, Stage, train
from .losses import next_token_cross_entropy


def next_token_loss(model, batch) -> torch.Tensor:
    inputs, targets = batch
    return next_token_cross_entropy(model, inputs, targets)


def embedded_corpus(out: Path, vocab_size: int, d: Dist) -> Path:
    """Tokenizer + shards of the standard library sources, made once in the run directory."""
    data = out / "data"
    if d.main and not (data / "manifest.json").exists():
        docs = stdlib_documents()
        print(f"embedded corpus: {len(docs)} standard library files", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(tmp) / "stdlib.txt"
            text.write_text("\n".join(docs))
            tok = train_tokenizer([text], vocab_size, Path(tmp) / "tokenizer.model")
        prepare_corpus(docs, tok, data, val_every=20, overwrite=True)
    d.barrier()
    return data


def build_pretraining(cfg: PretrainConfig, out: Path, device: torch.device, d: Dist) -> Stage:
    data_dir = Path(cfg.data) if cfg.data else embedded_corpus(out, cfg.vocab_size, d)
    shards = PackedShards(data_dir)
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else data_dir / "tokenizer.model"
    tokenizer = Tokenizer.from_file(tok_path)
    if tokenizer.sha256() != shards.manifest["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer {data_dir} was prepared with")
    if cfg.init_from:
        base = load(cfg.init_from, dtype=torch.float32)
        model, config = base.model, base.config
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{cfg.init_from}: vocabulary smaller than the data's tokenizer")
        # RoPE is computed from the config at every forward: a new base and a longer context
        # are a new config
        theta = cfg.rope_theta or config.rope_theta
        config = config.replace(rope_theta=theta, max_seq_len=max(cfg.seq_len, config.max_seq_len))
        model.config = config
    else:
        preset = get_preset(cfg.model)
        args = {
            "vocab_size": tokenizer.vocab_size,
            "max_seq_len": max(cfg.seq_len, preset.max_seq_len),
        }
        if cfg.rope_theta is not None:
            args["rope_theta"] = cfg.rope_theta
        config = preset.replace(**(args | cfg.model_args))
        with torch.device(device):
            model = Transformer(config)
    if cfg.seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context {config.max_seq_len}")
    micro = cfg.batch_size // cfg.grad_accum
    if micro % d.world:
        raise ValueError(f"micro-batch {micro} does not split over {d.world} processes")

    fim = FimTransform(tokenizer, cfg.fim_rate, cfg.fim_spm_rate) if cfg.fim_rate > 0 else None

    def batch(step: int, part: int, parts: int):
        if fim is not None:
            return shards.transformed_batch(
                step, cfg.batch_size, cfg.seq_len, fim, cfg.seed, part, parts
            )
        return shards.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed, part, parts)

    def val_batches(rank: int, world: int):
        return shards.val_batches(micro // world, cfg.seq_len, cfg.eval_batches, rank, world)

    def save_model(state_dict: dict, path: Path) -> None:
        save_hf(path, config, state_dict, tokenizer)

    return Stage(
        model=model,
        batch=batch,
        loss=next_token_loss,
        save_model=save_model,
        val_batches=val_batches if shards.tokens("val") > cfg.seq_len else None,
        tokens_per_step=cfg.batch_size * cfg.seq_len,
    )


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False) -> list[dict]:
    out = Path(out)
    return train(cfg, out, lambda device, d: build_pretraining(cfg, out, device, d), resume)
