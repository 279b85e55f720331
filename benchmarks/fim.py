"""Code Llama's fill-in-the-middle claims, in miniature (Code Llama, section 2.3 and 3.2).

Two tiny models pretrained the same way on this Python's standard library, one with FIM
(fim_rate 0.9, half PSM half SPM) and one without, then:

(a) infilling held-out lines: a line of a standard-library file that no training step (and
    not the tokenizer) saw is masked; the model gets the text around it (the file's chunk)
    and writes the line. Exact match, and whether the whole file still compiles with the
    generated line in place. The model without FIM gets the same infilling prompt, and a
    left-to-right completion from the prefix (all it can do).
(b) the cost left to right: both models' validation loss on plain held-out text.

    python benchmarks/fim.py --out runs/fim            # data, both runs, evaluation
    python benchmarks/fim.py --out runs/fim --eval-only

Files are cut into chunks of at most --chunk-chars characters (at blank lines where
possible), each a training document, so that a document in the infilling layout fits the
256-token context of the tiny models; the standard library files are the held-out unit (one
in ten).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch

from llama2 import Tokenizer, load
from llama2.data import prepare_corpus, stdlib_documents
from llama2.formats import INFILL_PIECES, encode_infill, infill_ids
from llama2.generation import SamplingParams, generate
from llama2.tokenizer import LLAMA2_TRAINER

ROOT = Path(__file__).resolve().parent.parent


def chunks(text: str, max_chars: int) -> list[str]:
    """A file cut into pieces of at most max_chars characters at blank lines (or at line ends
    inside a longer block); joined, they are the file."""
    blocks, out, cur = text.split("\n\n"), [], ""
    for i, block in enumerate(blocks):
        block += "\n\n" if i < len(blocks) - 1 else ""
        for line in block.splitlines(keepends=True) if len(block) > max_chars else [block]:
            if cur and len(cur) + len(line) > max_chars:
                out.append(cur)
                cur = ""
            cur += line
    if cur:
        out.append(cur)
    return out


def train_infill_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Tokenizer:
    """Llama 2's trainer settings, with Code Llama's four infilling pieces reserved."""
    src = out.with_suffix(".txt")
    src.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(src),
        model_prefix=str(out.with_suffix("")),
        vocab_size=vocab_size,
        user_defined_symbols=list(INFILL_PIECES.values()),
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **LLAMA2_TRAINER,
    )
    src.unlink()
    return Tokenizer.from_file(out.with_suffix(".model"))


def prepare(out: Path, args) -> None:
    if (out / "data" / "manifest.json").exists():
        return
    files = stdlib_documents(args.corpus_bytes)
    train_files = [f for i, f in enumerate(files) if i % 10 != 9]
    held = [f for i, f in enumerate(files) if i % 10 == 9]
    print(f"{len(files)} files: {len(train_files)} for training, {len(held)} held out")
    out.mkdir(parents=True, exist_ok=True)
    tok = train_infill_tokenizer(train_files, args.vocab_size, out / "tokenizer")
    docs = [c for f in train_files for c in chunks(f, args.chunk_chars)]
    prepare_corpus(docs, tok, out / "data", val_every=20, workers=1)
    (out / "held_out.json").write_text(json.dumps(held))


def run_pretraining(out: Path, runs: dict[str, float], args) -> float:
    """The runs (name: fim_rate) side by side, one thread each; wall seconds."""
    procs = []
    t0 = time.time()
    for name, fim_rate in runs.items():
        run = out / name
        if (run / "model").exists():
            continue
        cmd = [sys.executable, "-m", "llama2.cli", "pretrain", "--config", args.config]
        cmd += ["--out", str(run), f"data={out / 'data'}", f"fim_rate={fim_rate}", "threads=1"]
        cmd += [*args.overrides, *(["--resume"] if (run / "checkpoints").exists() else [])]
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        if proc.wait():
            raise SystemExit(f"{log.name}: the run failed")
        log.close()
    return time.time() - t0


def infill_cases(
    held: list[str], n: int, chunk_chars: int, seed: int, tok: Tokenizer, max_prompt: int
) -> list[dict]:
    """n (file, chunk) lines drawn with `seed`: prefix and suffix from the line's chunk, whose
    infilling prompt has at most max_prompt tokens (a few dense chunks have more)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        f = rng.randrange(len(held))
        pieces = chunks(held[f], chunk_chars)
        c = rng.randrange(len(pieces))
        lines = pieces[c].splitlines(keepends=True)
        k = rng.randrange(len(lines))
        line = lines[k].rstrip("\n")
        prefix, suffix = "".join(lines[:k]), "\n" + "".join(lines[k + 1 :])
        if not line.strip() or len(encode_infill(tok, prefix, suffix)) > max_prompt:
            continue
        before = "".join(pieces[:c]) + "".join(lines[:k])
        after = "".join(lines[k + 1 :]) + "".join(pieces[c + 1 :])
        cases.append(
            {
                "file": f,
                "line": line,
                "prefix": prefix,
                "suffix": suffix,  # (from the masked line's own newline)
                "before": before,
                "after": "\n" + after,
            }
        )
    return cases


def compiles(source: str) -> bool:
    try:
        compile(source, "<held-out>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def score(llm, cases: list[dict], mode: str, batch: int = 32) -> dict:
    """Greedy completions of the masked lines; mode: psm, spm or l2r (from the prefix)."""
    tok = llm.tokenizer
    eot = infill_ids(tok)["eot"]
    params = SamplingParams(max_new_tokens=48, temperature=0, stop=["\n"])
    texts = []
    for i in range(0, len(cases), batch):
        part = cases[i : i + batch]
        if mode == "l2r":
            prompts = [tok.encode(c["prefix"], bos=True) for c in part]
        else:
            prompts = [encode_infill(tok, c["prefix"], c["suffix"], mode == "spm") for c in part]
        out = generate(llm.model, tok, prompts, params, (tok.eos_id, eot))
        texts += [o.text.split("\n")[0] for o in out]
    exact = sum(t == c["line"] for t, c in zip(texts, cases, strict=True))
    ok = sum(compiles(c["before"] + t + c["after"]) for t, c in zip(texts, cases, strict=True))
    return {
        "exact_match": exact / len(cases),
        "compiles": ok / len(cases),
        "examples": [
            {"line": c["line"], "generated": t} for t, c in zip(texts[:8], cases[:8], strict=True)
        ],
    }


def val_loss(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fim")
    p.add_argument("--config", default=str(ROOT / "configs" / "codellama-fim.yaml"))
    p.add_argument("--corpus-bytes", type=int, default=3_000_000)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--chunk-chars", type=int, default=600)
    p.add_argument("--lines", type=int, default=300, help="held-out lines to infill")
    p.add_argument("--seed", type=int, default=0, help="which held-out lines")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value settings for both runs")
    args = p.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    t0 = time.time()
    prepare(out, args)
    seconds = 0.0
    if not args.eval_only:
        seconds = run_pretraining(out, {"fim": 0.9, "plain": 0.0}, args)
    held = json.loads((out / "held_out.json").read_text())
    tok = Tokenizer.from_file(out / "data" / "tokenizer.model")
    context = load(out / "plain" / "model").config.max_seq_len
    cases = infill_cases(held, args.lines, args.chunk_chars, args.seed, tok, context - 48)
    assert all(compiles(c["before"] + c["line"] + c["after"]) for c in cases)
    results = {"lines": len(cases), "train_wall_seconds": seconds, "models": {}}
    partial = out / f"scores_seed{args.seed}_n{args.lines}.json"  # kept across kills
    done = json.loads(partial.read_text()) if partial.exists() else {}
    for name in ("fim", "plain"):
        llm = load(out / name / "model")
        for mode in ("psm", "spm") if name == "fim" else ("psm", "l2r"):
            if f"{name}/{mode}" not in done:
                done[f"{name}/{mode}"] = score(llm, cases, mode)
                partial.write_text(json.dumps(done))
            print(f"{name} {mode}: {done[f'{name}/{mode}']['exact_match']:.1%}", flush=True)
        r = {k.split("/")[1]: v for k, v in done.items() if k.startswith(name + "/")}
        r["val_loss"] = val_loss(out / name)
        results["models"][name] = r
    results["eval_wall_seconds"] = time.time() - t0 - seconds
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| model | prompt | exact match | file compiles |\n|---|---|---|---|")
    for name, r in results["models"].items():
        for m in ("psm", "spm", "l2r"):
            if m in r:
                em, ok = r[m]["exact_match"], r[m]["compiles"]
                print(f"| {name} | {m} | {em:.1%} | {ok:.1%} |")
    fim, plain = (results["models"][k]["val_loss"] for k in ("fim", "plain"))
    print(
        f"left-to-right validation loss: fim {fim:.4f}, plain {plain:.4f} "
        f"({(fim - plain) / plain:+.1%})"
    )


if __name__ == "__main__":
    main()
