"""`llama2 eval chat|code|longctx`: parse the flags, run the evaluation, print its table."""

from __future__ import annotations

from pathlib import Path

from .models import model_name


def cmd_eval_chat(args) -> None:
    import tempfile

    from ..eval.chat import evaluate, read_dialogs, read_items, sample, table, to_json, win_text
    from ..io import write_atomic
    from ..llm import load
    from ..recipe.paths import DataFiles

    with tempfile.TemporaryDirectory() as tmp:
        data = DataFiles(Path(args.data) if args.data else Path(tmp))
        if args.data is None:  # the world of a default recipe
            from ..recipe.world import WorldConfig, write_world

            write_world(WorldConfig(), data.root)
        items = sample(read_items(data.test_items(args.column)), args.n, args.seed)
        dialogs = read_dialogs(data.test_dialogs(args.column))
    llm = load(args.model)
    against = load(args.against) if args.against else None
    r = evaluate(llm, items, dialogs, against, args.max_new_tokens, args.seed)
    rows = {Path(args.model).name: r}
    if against is not None:
        rows[Path(args.against).name] = r["against"]
    print(f"test column: unseen {args.column} (95% intervals)")
    print(table(rows))
    if "gatt_by_turn" in r:
        print("GAtt adherence by turn: " + ", ".join(f"{x:.0%}" for x in r["gatt_by_turn"]))
    if "win_rate" in r:
        print(win_text(r["win_rate"]))
        for key, t in r["paired"].items():
            print(
                f"{key}: {t['first']} items only {Path(args.model).name}, {t['second']} only "
                f"{Path(args.against).name}: McNemar p={t['p_value']:.3g}"
            )
    if args.json:
        write_atomic(Path(args.json), to_json(r))


def cmd_eval_longctx(args) -> None:
    from ..data import iter_documents
    from ..eval.longctx import LongContextSettings, evaluate_long_context
    from ..llm import load

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
        models[model_name(path)] = (llm.model, llm.tokenizer)
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


# --infilling's choices: the orders of the single-line infilling benchmark
INFILLING = {"none": (), "psm": ("psm",), "spm": ("spm",), "both": ("psm", "spm")}


def cmd_eval_code(args) -> None:
    from ..eval import code
    from ..eval.sandbox import Limits

    if (args.model is None) == (args.completions is None):
        raise ValueError("give a MODEL to sample from, or --completions FILE, not both")
    if args.completions and args.infilling != "none":
        raise ValueError("--infilling samples from a model: it needs MODEL, not --completions")
    for name in ("samples", "limit", "batch_size", "max_new_tokens", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    settings = code.CodeEvalSettings(
        samples=args.samples,
        ks=tuple(_ks(args.k)),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        infilling=INFILLING[args.infilling],
        limits=Limits(args.timeout, args.memory_mb << 20),
        workers=args.workers,
    )
    report = code.evaluate_code(
        settings, args.model, args.completions, args.problems, args.limit, args.out
    )
    print(code.table(report))
    if args.json:
        code.write_report(args.json, report)
