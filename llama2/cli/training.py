"""`llama2 tokenizer train|data prepare|<stage>|merge|recipe`: from text to a chat model."""

from __future__ import annotations

import dataclasses
import sys
import time


def cmd_tokenizer_train(args) -> None:
    from ..tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(args.files, args.vocab_size, args.out, infill_pieces=args.infill_pieces)
    print(
        f"trained {tok.vocab_size}-piece tokenizer in {time.perf_counter() - t0:.1f}s: {args.out}"
    )


def cmd_data_prepare(args) -> None:
    from ..data import iter_documents, prepare_corpus
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    t0 = time.perf_counter()
    docs = iter_documents(args.inputs, field=args.field)
    m = prepare_corpus(docs, tok, args.out, args.val_every, args.workers, args.overwrite)
    print(
        f"{m['train']['documents']:,} documents, {m['train']['tokens']:,} training and "
        f"{m['val']['tokens']:,} validation tokens ({m['dtype']}) in "
        f"{time.perf_counter() - t0:.1f}s: {args.out}",
        file=sys.stderr,
    )


# `llama2 <stage> [--config FILE] --out DIR [--resume] [key=value ...]`: module, function, help
STAGES = {
    "pretrain": ("pretrain", "pretrain (or continue pretraining) a model"),
    "sft": ("sft", "supervised fine-tuning on chat data (JSONL), full or LoRA"),
    "reward": ("reward", "train a reward model on preference pairs (JSONL)"),
    "rejection": ("rejection", "rejection sampling: best of K answers, then SFT on them"),
    "ppo": ("ppo", "PPO against reward model(s), KL-penalised (section 3.2.3)"),
    "gatt": ("gatt", "Ghost Attention: multi-turn instruction data, SFT, adherence by turn"),
    "dpo": ("dpo", "direct preference optimization on preference pairs"),
}


def settings_help(kind) -> str:
    """A stage's settings, one a line with its default: `--help`'s epilog."""
    lines = ["settings (key=value on the command line, or in --config FILE), with defaults:"]
    for f in dataclasses.fields(kind):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default is None or isinstance(default, bool):  # as YAML writes them
            default = {None: "null", True: "true", False: "false"}[default]
        lines.append(f"  {f.name} = {default}")
    return "\n".join(lines)


def cmd_stage(args) -> None:
    import importlib

    from ..train import load_train_config

    module, _ = STAGES[args.command]
    run = getattr(importlib.import_module(f"..train.{module}", __package__), module)
    cfg = load_train_config(args.config, args.overrides, stage=args.command)
    result = run(cfg, args.out, resume=args.resume)
    if args.command == "gatt":
        rates = ", ".join(f"{r:.0%}" for r in result["adherence_by_turn"])
        print(f"instruction adherence by turn: {rates}", file=sys.stderr)


def cmd_merge(args) -> None:
    from ..checkpoint import read_checkpoint, save_hf
    from ..lora import merge_adapter

    ckpt = read_checkpoint(args.base)
    merged = merge_adapter(ckpt.state_dict, args.adapter)
    save_hf(args.out, ckpt.config, merged, ckpt.tokenizer)
    print(f"merged {args.adapter} into {args.base}: {args.out}", file=sys.stderr)


def cmd_recipe(args) -> None:
    from ..recipe.run import run_recipe

    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ValueError(
                f"--seeds {args.seeds!r}: expected whole numbers, e.g. 0,1,2"
            ) from None
    run_recipe(args.out, args.config, args.smoke, args.resume, args.overrides, seeds)
