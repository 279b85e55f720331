"""Code Llama's fill-in-the-middle claims, in miniature (Code Llama, section 2.3 and 3.2).

Two tiny models pretrained the same way on this Python's standard library, one with FIM
(fim_rate 0.9, half PSM half SPM) and one without, then:

(a) infilling held-out lines: a line of a standard-library file that no training step (and
    not the tokenizer) saw is masked; the model gets the text around it (the file's chunk)
    and writes the line. Exact match, and whether the whole file still compiles with the
    generated line in place. The model without FIM gets the same infilling prompt, and a
    left-to-right completion from the prefix (all it can do). Exact match and "compiles" are
    coarse for a model this small, so also the finer measure: the loss of the true line,
    teacher-forced (one forward pass per line), under each prompt: the FIM model given prefix
    and suffix (PSM, SPM), the model without FIM given the same PSM prompt, and both models
    left to right from the prefix alone. If the suffix helps, the FIM model's loss on the line
    with it is below either model's without it.
(b) the cost left to right: both models' validation loss on plain held-out text.

    python benchmarks/fim.py --out runs/fim            # data, both runs, evaluation
    python benchmarks/fim.py --out runs/fim --eval-only

Files are cut into chunks of at most --chunk-chars characters (at blank lines where
possible), each a training document, so that a document in the infilling layout fits the
256-token context of the tiny models; the standard library files are the held-out unit (one
in ten). The tokenizer is `train_tokenizer(..., infill_pieces=True)`, the layout of
`llama2 tokenizer train --infill-pieces`: Code Llama's 16 pieces as the last ids.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from launch import run_side_by_side
from tqdm import tqdm

from llama2 import Tokenizer, load
from llama2.data import prepare_corpus, stdlib_documents
from llama2.formats import encode_infill, infill_ids
from llama2.generation import SamplingParams, generate
from llama2.tokenizer import train_tokenizer
from llama2.train.ppo import token_logprobs

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 48  # generated per line, at most
# (model, prompt) pairs whose loss on the true line is measured: the FIM model with the suffix
# (both orders), the model without FIM given the same prompt, and both from the prefix alone
LOSS_CONDITIONS = (
    ("fim", "psm"),
    ("fim", "spm"),
    ("plain", "psm"),
    ("fim", "l2r"),
    ("plain", "l2r"),
)


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
    """Llama 2's trainer settings, with Code Llama's infilling pieces as the last 16 of the
    vocab_size ids (what `llama2 tokenizer train --infill-pieces` makes)."""
    src = out.with_suffix(".txt")
    src.write_text("\n".join(texts))
    tok = train_tokenizer([src], vocab_size, out.with_suffix(".model"), infill_pieces=True)
    src.unlink()
    return tok


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
    commands = {}
    for name, fim_rate in runs.items():
        run = out / name
        if (run / "model").exists():
            continue
        cmd = ["pretrain", "--config", args.config, "--out", str(run), f"data={out / 'data'}"]
        cmd += [f"fim_rate={fim_rate}", "threads=1", *args.overrides]
        commands[name] = cmd + (["--resume"] if (run / "checkpoints").exists() else [])
    return run_side_by_side(out, commands)


def infill_cases(
    held: list[str], n: int, chunk_chars: int, seed: int, tok: Tokenizer, max_prompt: int
) -> list[dict]:
    """n (file, chunk) lines drawn with `seed`: prefix and suffix from the line's chunk, whose
    infilling prompt has at most max_prompt tokens (a few dense chunks have more) and whose
    line, with <EOT> after it, fits the 48 generated tokens (so prompt and line fit the
    context, for the line's loss)."""
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
        if len(tok.encode(line, dummy_prefix=False)) >= NEW_TOKENS:
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
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop=["\n"])
    texts = []
    for i in tqdm(range(0, len(cases), batch), desc=f"generating ({mode})", unit="batch"):
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


def line_tokens(tok: Tokenizer, case: dict, mode: str) -> tuple[list[int], list[int], int]:
    """(context, target, characters) to score the masked line under a prompt. psm / spm: the
    infilling prompt, then the line as FIM training lays out the middle (no dummy space; the
    <EOT> after it is not scored). l2r: the prefix and line tokenized together, as plain
    training text is; a piece may then straddle the prefix's last newline and the line, so the
    target is every token after the prefix's own and `characters` counts what they spell."""
    if mode != "l2r":
        context = encode_infill(tok, case["prefix"], case["suffix"], mode == "spm")
        return context, tok.encode(case["line"], dummy_prefix=False), len(case["line"])
    text = case["prefix"] + case["line"]
    alone, full = tok.encode(case["prefix"], bos=True), tok.encode(text, bos=True)
    k = 0
    while k < min(len(alone), len(full)) and alone[k] == full[k]:
        k += 1
    spelled = tok.decode(full[1:k])  # (without the bos; the dummy space dropped)
    assert text.startswith(spelled) and len(spelled) <= len(case["prefix"])
    return full[:k], full[k:], len(text) - len(spelled)


@torch.no_grad()
def line_nll(llm, cases: list[dict], mode: str, batch: int = 32) -> dict:
    """Teacher-forced negative log-likelihood (nats) of each case's true line under `mode`'s
    prompt: one forward pass per line, lines batched with right padding (causal attention, so
    the padding changes nothing before it)."""
    rows = [line_tokens(llm.tokenizer, c, mode) for c in cases]
    nll, first = [], []
    for i in tqdm(range(0, len(rows), batch), desc=f"line loss ({mode})", unit="batch"):
        part = rows[i : i + batch]
        x = torch.zeros(len(part), max(len(c) + len(t) for c, t, _ in part), dtype=torch.long)
        for j, (c, t, _) in enumerate(part):
            x[j, : len(c) + len(t)] = torch.tensor(c + t)
        logp, _ = token_logprobs(llm.model, x)  # [B, L-1]: column p is token p + 1's
        for j, (c, t, _) in enumerate(part):
            token_nll = -logp[j, len(c) - 1 : len(c) + len(t) - 1]
            nll.append(token_nll.sum().item())
            first.append(token_nll[0].item())
    return {
        "nll": nll,
        "first": first,  # the line's first token alone (PSM: right after <MID>)
        "tokens": [len(t) for _, t, _ in rows],
        "chars": [n for _, _, n in rows],
    }


def summarize_loss(r: dict) -> dict:
    """Nats per token and bits per character, each the total over all lines (so long lines
    weigh more); bits per character compares prompts whose tokens differ. Also the line's first
    token apart (mostly its indentation: after <MID> the model must recall where the prefix
    stopped) from the tokens after it."""
    total, tokens, first = sum(r["nll"]), sum(r["tokens"]), sum(r["first"])
    return {
        "tokens": tokens,
        "chars": sum(r["chars"]),
        "nats_per_token": total / tokens,
        "bits_per_char": total / math.log(2) / sum(r["chars"]),
        "first_token_nats": first / len(r["first"]),
        "rest_nats_per_token": (total - first) / (tokens - len(r["first"])),
        "wall_seconds": r.get("wall_seconds"),
    }


def paired_difference(a: dict, b: dict, rounds: int = 2000) -> dict:
    """a's bits per character minus b's on the same lines, with a 95% interval from a paired
    bootstrap over lines (the lines are the sample; the models are fixed), and the share of
    lines on which a's loss per character is the lower."""
    na, nb = np.array(a["nll"]), np.array(b["nll"])
    ca, cb = np.array(a["chars"]), np.array(b["chars"])

    def diff(i):
        return (na[i].sum() / ca[i].sum() - nb[i].sum() / cb[i].sum()) / math.log(2)

    rng = np.random.default_rng(0)
    draws = [diff(rng.integers(0, len(na), len(na))) for _ in range(rounds)]
    return {
        "bits_per_char": float(diff(np.arange(len(na)))),
        "ci95": [float(x) for x in np.percentile(draws, [2.5, 97.5])],
        "lines_lower": float(np.mean(na / ca < nb / cb)),
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
    prepared = time.time() - t0
    seconds = 0.0
    if not args.eval_only:
        seconds = run_pretraining(out, {"fim": 0.9, "plain": 0.0}, args)
    held = json.loads((out / "held_out.json").read_text())
    tok = Tokenizer.from_file(out / "data" / "tokenizer.model")
    context = load(out / "plain" / "model").config.max_seq_len
    cases = infill_cases(held, args.lines, args.chunk_chars, args.seed, tok, context - NEW_TOKENS)
    assert all(compiles(c["before"] + c["line"] + c["after"]) for c in cases)
    results = {"lines": len(cases), "prepare_wall_seconds": prepared, "models": {}}
    results["train_wall_seconds"] = seconds
    partial = out / f"scores_seed{args.seed}_n{args.lines}.json"  # kept across kills
    done = json.loads(partial.read_text()) if partial.exists() else {}
    for name in ("fim", "plain"):
        llm = load(out / name / "model")
        for mode in ("psm", "spm") if name == "fim" else ("psm", "l2r"):
            if f"{name}/{mode}" not in done:
                t = time.time()
                done[f"{name}/{mode}"] = score(llm, cases, mode)
                done[f"{name}/{mode}"]["wall_seconds"] = time.time() - t
                partial.write_text(json.dumps(done))
            print(f"{name} {mode}: {done[f'{name}/{mode}']['exact_match']:.1%}", flush=True)
        for mode in (m for n, m in LOSS_CONDITIONS if n == name):
            if f"{name}/loss/{mode}" not in done:
                t = time.time()
                done[f"{name}/loss/{mode}"] = line_nll(llm, cases, mode)
                done[f"{name}/loss/{mode}"]["wall_seconds"] = time.time() - t
                partial.write_text(json.dumps(done))
        scored = [k for k in done if k.startswith(name + "/") and k.count("/") == 1]
        r = {k.split("/")[1]: done[k] for k in scored}
        r["val_loss"] = val_loss(out / name)
        results["models"][name] = r
    loss = {f"{n}/{m}": done[f"{n}/loss/{m}"] for n, m in LOSS_CONDITIONS}
    # how often plain text puts the line in the same tokens as the infilling layout does (where
    # it does not, only bits per character compares the two)
    same = sum(line_tokens(tok, c, "l2r")[1] == line_tokens(tok, c, "psm")[1] for c in cases)
    results["line_loss"] = {
        "target": "the masked line's tokens (not its <EOT> or newline), teacher-forced",
        "l2r_same_tokens_as_infilling": same,
        "conditions": {k: summarize_loss(v) for k, v in loss.items()},
        # the suffix's worth: the FIM model with it against each model without it
        "differences": {
            f"{a} - {b}": paired_difference(loss[a], loss[b])
            for a in ("fim/psm", "fim/spm")
            for b in ("fim/l2r", "plain/l2r")
        },
    }
    results["eval_wall_seconds"] = time.time() - t0 - prepared - seconds
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


MODEL = {"fim": "FIM", "plain": "no FIM"}
PROMPT = {"psm": "PSM", "spm": "SPM", "l2r": "left to right from the prefix"}


def table(results: dict) -> str:
    """The results as markdown tables."""
    out = ["| model | prompt | exact match | file compiles |", "|---|---|---|---|"]
    for name, r in results["models"].items():
        for m in ("psm", "spm", "l2r"):
            if m in r:
                em, ok = r[m]["exact_match"], r[m]["compiles"]
                out.append(f"| {MODEL[name]} | {PROMPT[m]} | {em:.1%} | {ok:.1%} |")
    ll = results["line_loss"]
    out += [
        "",
        f"Loss of the true line ({results['lines']} lines; left to right, plain text gives the "
        f"line the infilling layout's tokens on {ll['l2r_same_tokens_as_infilling']}):",
        "",
        "| model | prompt | tokens | nats/token | bits/char | first token, nats "
        "| later tokens, nats/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in ll["conditions"].items():
        name, m = key.split("/")
        out.append(
            f"| {MODEL[name]} | {PROMPT[m]} | {r['tokens']} | {r['nats_per_token']:.3f} "
            f"| {r['bits_per_char']:.3f} | {r['first_token_nats']:.3f} "
            f"| {r['rest_nats_per_token']:.3f} |"
        )
    out += [
        "",
        "| difference, bits/char | value | 95% interval (paired bootstrap) | lines lower |",
        "|---|---|---|---|",
    ]
    for key, d in ll["differences"].items():
        a, b = (f"{MODEL[k.split('/')[0]]} {PROMPT[k.split('/')[1]]}" for k in key.split(" - "))
        lo, hi = d["ci95"]
        out.append(
            f"| {a} - {b} | {d['bits_per_char']:+.3f} | [{lo:+.3f}, {hi:+.3f}] "
            f"| {d['lines_lower']:.1%} |"
        )
    fim, plain = (results["models"][k]["val_loss"] for k in ("fim", "plain"))
    out.append(
        f"\nleft-to-right validation loss: fim {fim:.4f}, plain {plain:.4f} "
        f"({(fim - plain) / plain:+.1%})"
    )
    return "\n".join(out)


if __name__ == "__main__":
    main()
