"""Long-context evaluation (Code Llama, section 2.4 and its figures on extrapolation): the
loss at each token position of long held-out text, and synthetic key retrieval, a line
"# the secret key is NNNN" hidden at a depth of long code and asked for at the end, by
context length and depth.

A model is evaluated past its training length as it is (RoPE extrapolates, or fails to):
its context is widened for the forward only. Attention runs through PyTorch's SDPA without
an explicit mask, whose CPU and CUDA kernels (flash / memory-efficient) never hold the
T x T matrix, so a 4x-longer context costs memory in proportion to its length.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..device import peak_memory_mb, reset_peak_memory
from ..io import atomic_file, write_atomic
from ..model import Transformer
from ..tokenizer import Tokenizer

KEY_LINE = "# the secret key is {key}\n"
QUESTION = "\n# the secret key is"


def widened(model: Transformer, length: int) -> None:
    """Let `model` run sequences of `length` tokens (its RoPE base and weights unchanged)."""
    if model.config.max_seq_len < length:
        model.config = dataclasses.replace(model.config, max_seq_len=length)


def text_stream(tokenizer: Tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """Documents as training packs them: BOS ids EOS, one after the other."""
    ids = [t for d in documents for t in tokenizer.encode(d, bos=True, eos=True)]
    return torch.tensor(ids)


@torch.no_grad()
def loss_by_position(model: Transformer, stream: torch.Tensor, length: int, rows: int) -> dict:
    """Mean next-token loss at each position 0 .. length-1 over up to `rows` non-overlapping
    windows of the stream, each its own forward pass, with the peak memory of one."""
    widened(model, length)
    n = min(rows, (len(stream) - 1) // length)
    if n < 1:
        raise ValueError(f"the evaluation text holds fewer than {length + 1} tokens")
    total = torch.zeros(length, dtype=torch.float64)
    peak = 0.0
    for i in range(n):
        window = stream[i * length : (i + 1) * length + 1]
        reset_peak_memory()
        logits = model(window[None, :-1])
        total += F.cross_entropy(logits[0], window[1:], reduction="none").double()
        peak = max(peak, peak_memory_mb())
    return {"loss": (total / n).tolist(), "rows": n, "peak_memory_mb": peak}


def binned(values: Sequence[float], width: int) -> list[float]:
    chunks = [values[i : i + width] for i in range(0, len(values), width)]
    return [sum(c) / len(c) for c in chunks]


def retrieval_example(
    tokenizer: Tokenizer, lines: Sequence[str], length: int, depth: float, rng: random.Random
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): about `length` tokens of code (consecutive lines from a random
    start) with the key line at `depth` (0: first, 1: last), then the question. Greedy
    decoding answers right exactly when each answer token is the arg max after the ones
    before it."""
    key = f"{rng.randrange(10_000):04d}"
    start = rng.randrange(len(lines))
    question = tokenizer.encode(QUESTION, dummy_prefix=False)
    key_ids = tokenizer.encode(KEY_LINE.format(key=key), dummy_prefix=False)
    budget = length - 1 - len(question) - len(key_ids) - 4  # (4: the answer)
    filler: list[list[int]] = []
    have = 0
    while have < budget:
        filler.append(
            tokenizer.encode(lines[(start + len(filler)) % len(lines)], dummy_prefix=False)
        )
        have += len(filler[-1])
    excess = have - budget  # cut from the front: a window into the code, from mid-line
    while excess:
        cut = min(excess, len(filler[0]))
        filler[0], excess = filler[0][cut:], excess - cut
        if not filler[0]:
            filler.pop(0)
    at = round(depth * len(filler))
    body = [t for ids in [*filler[:at], key_ids, *filler[at:]] for t in ids]
    whole = tokenizer.encode(QUESTION + " " + key, dummy_prefix=False)
    if whole[: len(question)] != question:
        raise ValueError("the question's tokens run into the answer's")
    return [tokenizer.bos_id, *body, *question], whole[len(question) :]


@torch.no_grad()
def key_retrieval(
    model: Transformer,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Accuracy (greedy, the whole key) by length and depth: {str(length): {str(depth): acc}}.
    The same examples for every model evaluated with the same seed."""
    widened(model, max(lengths))
    out: dict[str, dict[str, float]] = {}
    bar = tqdm(
        total=len(lengths) * len(depths) * trials, desc="key retrieval", disable=not progress
    )
    for length in lengths:
        out[str(length)] = {}
        for depth in depths:
            rng = random.Random(f"{seed}/{length}/{depth}")
            right = 0
            for _ in range(trials):
                prompt, answer = retrieval_example(tokenizer, lines, length, depth, rng)
                ids = torch.tensor([prompt + answer[:-1]])
                guess = model(ids)[0, len(prompt) - 1 :].argmax(-1)
                right += guess.tolist() == answer
                bar.update()
            out[str(length)][str(depth)] = right / trials
    bar.close()
    return out


# --- the whole evaluation --------------------------------------------------------------------


@dataclasses.dataclass
class LongContextSettings:
    lengths: Sequence[int] = (256, 512, 1024, 2048, 4096)
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 10  # key-retrieval examples per (length, depth)
    rows: int = 8  # windows of the longest length for the loss by position
    bin_width: int = 64  # positions per point of the loss plot
    seed: int = 0


def evaluate_long_context(
    models: dict[str, tuple[Transformer, Tokenizer]],
    documents: Sequence[str],
    out: str | Path,
    settings: LongContextSettings | None = None,
    progress: bool = True,
) -> dict:
    """Both measurements for each model; writes results.json, loss_by_position.png and
    key_retrieval.png into `out` and returns the results."""
    s = settings or LongContextSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for d in documents for line in d.splitlines(keepends=True) if line.strip()]
    results: dict = {"settings": dataclasses.asdict(s), "models": {}}
    for name, (model, tok) in models.items():
        t0 = time.time()
        model.eval()
        r = {
            "rope_theta": model.config.rope_theta,
            "trained_max_seq_len": model.config.max_seq_len,
        }
        pos = loss_by_position(model, text_stream(tok, documents), max(s.lengths), s.rows)
        r["loss_by_position"] = binned(pos["loss"], s.bin_width)
        r["peak_memory_mb"] = pos["peak_memory_mb"]
        r["loss_up_to"] = {str(n): sum(pos["loss"][:n]) / n for n in s.lengths}
        r["key_retrieval"] = key_retrieval(
            model, tok, lines, s.lengths, s.depths, s.trials, s.seed, progress
        )
        r["key_retrieval_by_length"] = {
            n: sum(by.values()) / len(by) for n, by in r["key_retrieval"].items()
        }
        r["seconds"] = time.time() - t0
        results["models"][name] = r
        if progress:
            acc = ", ".join(f"{n}: {a:.0%}" for n, a in r["key_retrieval_by_length"].items())
            print(f"{name}: key retrieval by length {acc}; {r['seconds']:.0f}s", flush=True)
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    plot_long_context(results, out)
    return results


def plot_long_context(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    models = results["models"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in models.items():
        x = [(i + 0.5) * s["bin_width"] for i in range(len(r["loss_by_position"]))]
        ax.plot(x, r["loss_by_position"], label=f"{name} (theta {r['rope_theta']:g})")
    for r in models.values():  # where each model's training context ends
        ax.axvline(r["trained_max_seq_len"], linestyle=":", color="grey", linewidth=0.8)
    ax.set_xlabel("token position")
    ax.set_ylabel(f"loss (nats/token, mean of {s['bin_width']} positions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out / "loss_by_position.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1, 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], models.items(), strict=True):
        grid = [[r["key_retrieval"][str(n)][str(d)] for n in s["lengths"]] for d in s["depths"]]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(s["lengths"])), [str(n) for n in s["lengths"]], rotation=45)
        ax.set_yticks(range(len(s["depths"])), [f"{d:.0%}" for d in s["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{name} (theta {r['rope_theta']:g})", fontsize=9)
    axes[0][0].set_ylabel("depth of the key")
    fig.subplots_adjust(bottom=0.25, wspace=0.35)
    fig.colorbar(im, ax=axes[0].tolist(), label="retrieval accuracy")
    with atomic_file(out / "key_retrieval.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
