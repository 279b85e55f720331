"""Data to distil a draft model from its target (sequence-level distillation, as in
DistillSpec, Zhou et al. 2023): the target's greedy continuations of prompts drawn from the
training split of a corpus, written as a corpus of their own for `llama2 pretrain
init_from=DRAFT data=OUT/data`. A draft that has learnt the target's greedy choices agrees
with more of them, which is what greedy speculative decoding accepts.

    python benchmarks/distill_draft.py TARGET CORPUS_DATA OUT [--prompts 800] [--new 96]

The prompts are windows of the corpus's training shards (seeded), never the prompts
`speculative.py` times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from llama2 import load
from llama2.data.prepare import prepare_corpus
from llama2.generation import SamplingParams, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("corpus", help="a prepared corpus directory (its manifest.json)")
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=800)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load(args.target, dtype="float32")
    tok = target.tokenizer
    corpus = Path(args.corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    if manifest["tokenizer_sha256"] != tok.sha256():
        raise SystemExit(f"{corpus}: tokenized with another tokenizer than {args.target}'s")
    shards = [
        np.fromfile(corpus / s["file"], dtype=manifest["dtype"])
        for s in manifest["train"]["shards"]
    ]
    tokens = np.concatenate(shards)
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(tokens) - args.prompt_tokens, args.prompts)
    prompts = [[tok.bos_id, *tokens[s : s + args.prompt_tokens].tolist()] for s in starts]
    params = SamplingParams(max_new_tokens=args.new, temperature=0)
    docs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        batch = prompts[i : i + args.batch]
        outputs = generate(target.model, tok, batch, params, (), compile=True)
        for prompt, done in zip(batch, outputs, strict=True):
            docs.append(tok.decode(prompt[1:] + done.token_ids))
        rate = (i + len(batch)) * args.new / (time.perf_counter() - t0)
        print(f"  {i + len(batch)}/{len(prompts)} continuations ({rate:.0f} tok/s)", flush=True)
    prepare_corpus(docs, tok, Path(args.out) / "data", val_every=20)
    print(f"wrote {len(docs)} documents to {Path(args.out) / 'data'}")


if __name__ == "__main__":
    main()
