"""`llama2 demo|info|tokenize|convert|quantize|generate|chat|serve`: tools on one model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def cmd_demo(args) -> None:
    from ..demo import run_demo

    run_demo(Path(args.out))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_info(args) -> None:
    from ..checkpoint import describe

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
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.path)
    ids = tok.encode(args.text, bos=args.bos)
    if args.json:
        print(json.dumps(ids))
        return
    for i in ids:
        print(f"{i:>8d}  {tok.id_to_piece(i)!r}")
    print(f"{len(ids)} tokens")


def cmd_convert(args) -> None:
    from ..checkpoint import read_checkpoint, save_gguf, save_hf, save_meta

    t0 = time.perf_counter()
    print(f"reading {args.src} ...", file=sys.stderr)
    ckpt = read_checkpoint(args.src)
    if args.add_infill_tokens:
        from ..checkpoint.extend import add_infill_tokens

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
    from ..checkpoint import save_hf
    from ..llm import load
    from ..quantize import quantization_config, replace_linears

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


def _sampling(args):
    from ..generation import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )


def _print_stream(llm, ids, params, stop_ids, continuation=True, draft=None, draft_tokens=4):
    """Generate for one prompt (with a draft model: speculatively), printing text as it comes;
    return (completion, seconds)."""
    from ..generation import generate_steps

    out = sys.stdout
    results: list = []
    t0 = time.perf_counter()
    args = (stop_ids, continuation, results, llm.compile, draft, draft_tokens)
    steps = generate_steps(llm.model, llm.tokenizer, [ids], params, *args)
    for outputs in steps:
        out.write(outputs[0].text)
        out.flush()
    return results[0], time.perf_counter() - t0


def model_name(path: str) -> str:
    """What to call a model in tables and the API: its directory's name, or for a run's
    `model` link (or a checkpoint's model/) the run's."""
    p = Path(path).absolute()
    return p.parent.name if p.name == "model" else p.name


def _load_for_generation(args):
    from ..llm import load

    llm = load(args.model, dtype=args.dtype)
    if llm.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.model beside the weights")
    return llm


def _load_draft(llm, args):
    """`--draft`: the draft model, on the target's device, its tokenizer checked (or None)."""
    from ..llm import load

    if args.draft is None:
        return None
    return llm.draft_model(load(args.draft, dtype=args.dtype, device=llm.device))


def _choose_compile(args, model, slots: int = 1, length: int | None = None) -> bool:
    """--compile / --no-compile, or by default: compile the model's decode step for a cache of
    this shape (the one the command decodes with, so that it compiles once) and use it if it
    measures faster than the eager step."""
    from ..llm import choose_decode

    if args.compile is not None:
        return args.compile
    err = sys.stderr
    print("compiling the decode step ...", end="", file=err, flush=True)
    choice = choose_decode(model, slots, length)
    print(f" ({choice.compile_s:.0f} s)", file=err)
    use = "compiled" if choice.compiled else "eager"
    times = f"compiled step: {choice.compiled_ms:.2f} ms vs eager {choice.eager_ms:.2f} ms"
    print(f"{times}: using {use}", file=err)
    return choice.compiled


def cmd_generate(args) -> None:
    llm = _load_for_generation(args)
    draft = _load_draft(llm, args)
    ids = llm.tokenizer.encode(args.prompt, bos=True)
    # the cache generate_steps sets up; with a draft, the draft is what decodes a token a step
    context = llm.config.max_seq_len
    length = len(ids) + max(0, min(args.max_new_tokens, context - len(ids)))
    llm.compile = _choose_compile(args, llm.model if draft is None else draft, 1, length)
    sys.stdout.write(args.prompt)
    eos = (llm.tokenizer.eos_id,)
    done, dt = _print_stream(llm, ids, _sampling(args), eos, True, draft, args.draft_tokens)
    n = len(done.token_ids)
    accepted = ""
    if done.draft_acceptance is not None:
        accepted = f", {done.draft_acceptance:.0%} of the draft's tokens accepted"
    print(
        f"\n[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s, {done.finish_reason}{accepted}]",
        file=sys.stderr,
    )


CHAT_HELP = "commands: /reset (forget the dialog), /system TEXT (set the system prompt), /exit"


def cmd_chat(args) -> None:
    from ..formats import encode_chat

    llm = _load_for_generation(args)
    # (a first turn's cache: a short prompt and the answer)
    length = min(llm.config.max_seq_len, args.max_new_tokens + 64)
    llm.compile = _choose_compile(args, llm.model, 1, length)
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


def cmd_serve(args) -> None:
    from ..serve.api import serve

    llm = _load_for_generation(args)
    draft = _load_draft(llm, args)
    if draft is not None and args.compile is None:
        # the model's tokens then come from verifications, which are prefills (never compiled)
        compile = False
    else:
        compile = _choose_compile(args, llm.model, args.max_batch, llm.config.max_seq_len)
    serve(
        llm,
        args.host,
        args.port,
        args.name or model_name(args.model),
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=not args.no_prefix_cache,
        prefix_pool_blocks=args.prefix_pool_blocks,
        compile=compile,
        draft=draft,
        draft_tokens=args.draft_tokens,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        web=not args.no_web,
    )
