"""`llama2 demo`: a tiny Llama 2 built from nothing on this machine (a tokenizer trained on
the standard library, random weights), written in all three checkpoint layouts, checked to
agree, and generated from. The training recipe itself is `llama2 pretrain`, `sft`, ..."""

from __future__ import annotations

import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import read_checkpoint, save_gguf, save_hf, save_meta
from .config import get_preset
from .llm import load
from .model import Transformer
from .tokenizer import train_tokenizer


def stdlib_text(max_bytes: int = 4_000_000) -> str:
    """The running interpreter's standard library sources: a corpus every machine has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(parts)


def _step(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out: Path, vocab_size: int = 2048, seed: int = 0) -> None:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _step("training a tokenizer on the Python standard library (Llama 2 settings) ...")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stdlib.txt"
        corpus.write_text(stdlib_text())
        tokenizer = train_tokenizer([corpus], vocab_size, out / "tokenizer.model")
    _step(f"  {tokenizer.vocab_size} pieces; 'def main():' -> {tokenizer.encode('def main():')}")

    config = get_preset("tiny-15m", vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    n = sum(p.numel() for p in model.parameters())
    _step(f"built tiny-15m shapes with random weights: {n / 1e6:.1f}M parameters")

    sd = model.state_dict()
    paths = {
        "hf": save_hf(out / "hf", config, sd, tokenizer, overwrite=True),
        "meta": save_meta(out / "meta", config, sd, tokenizer, shards=2, overwrite=True),
        "gguf": save_gguf(out / "model.f32.gguf", config, sd, tokenizer, "f32", overwrite=True),
    }
    for layout, path in paths.items():
        _step(f"wrote {layout:4s} checkpoint: {path}")

    prompt = tokenizer.encode("def fibonacci(n):", bos=True)
    reference = model(torch.tensor([prompt]))
    for layout, path in paths.items():
        llm = load(path)
        err = (llm.model(torch.tensor([prompt])) - reference).abs().max().item()
        _step(f"reloaded {layout:4s} as {read_checkpoint(path).layout}: max |logit diff| {err:.2e}")
        if err > 1e-4:
            raise RuntimeError(f"{layout} checkpoint does not reproduce the model (error {err})")

    llm = load(paths["hf"])
    _step("generating 48 tokens (random weights: expect gibberish in the stdlib's vocabulary):")
    t1 = time.perf_counter()
    done = llm.generate("def fibonacci(n):", max_new_tokens=48, temperature=0.8, seed=seed)
    dt = time.perf_counter() - t1
    ids = done.token_ids
    print("def fibonacci(n):" + done.text, flush=True)
    _step(
        f"{len(ids)} tokens in {dt:.2f}s ({len(ids) / dt:.0f} tokens/s); "
        f"total {time.perf_counter() - t0:.1f}s"
    )
