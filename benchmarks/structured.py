"""Structured output's per-token overhead: tiny-110m (random weights) over Llama 2's
32,000-token vocabulary, decoding JSON under a schema against decoding as many tokens free, side
by side in one run. The floor (issue 30): at most 10% of an unconstrained decode step.

    python benchmarks/structured.py [--docs 4] [--repeats 2] [--compile] [--libraries]

Each doc is a prompt answered under SCHEMA (sampled, seeded: a random model writes valid JSON
because of the mask), then the same prompt decoded free for as many steps (EOS ignored), in
turns, --repeats rounds (best of the rounds kept for each): a shared machine's drift falls on
both alike. Also printed: the constraint's own work per token (mask, apply, advance), timed
inside the run. `--libraries` times, per token, computing the mask and advancing of each
installed candidate (xgrammar, llguidance, outlines-core) on the same schema and vocabulary,
over a walk through random logits: how the library was chosen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import describe

from llama2 import Tokenizer, Transformer, get_preset, structured
from llama2.generation import SamplingParams, generate

VOCAB = Path(__file__).parent.parent / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf"
STRING = {"type": "string", "maxLength": 16}
SCHEMA = {  # nested objects, an enum, arrays, required fields: the mask's usual kinds of work
    "type": "object",
    "required": ["product", "price", "stock", "reviews"],
    "properties": {
        "product": {
            "type": "object",
            "required": ["title", "category"],
            "properties": {"title": STRING, "category": {"enum": ["book", "tool", "toy"]}},
        },
        "price": {"type": "integer", "minimum": 1, "maximum": 9999},
        "stock": {"type": "integer", "minimum": 0, "maximum": 999},
        "reviews": {
            "type": "array",
            "maxItems": 2,
            "items": {"type": "object", "properties": {"by": STRING, "stars": {"enum": [1, 5]}}},
        },
    },
}
PROMPTS = ["A person:", "Record:", "JSON:", "Here is the customer", "{", "Answer"]


def timed_constraint() -> list[float]:
    """Time spent in Constraint.mask and .accept, accumulated (the benchmark's own wrapper)."""
    spent = [0.0]
    for name in ("mask", "accept"):
        inner = getattr(structured.Constraint, name)

        def wrapper(self, *args, inner=inner):
            t = time.perf_counter()
            try:
                return inner(self, *args)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(structured.Constraint, name, wrapper)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--docs", type=int, default=4, help=f"prompts answered (at most {len(PROMPTS)})"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="compiled decode steps")
    ap.add_argument("--libraries", action="store_true", help="also time the candidate libraries")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(args.threads), flush=True)
    tok = Tokenizer.from_file(VOCAB)
    if args.libraries:
        compare_libraries(tok)
    torch.manual_seed(0)
    cfg = get_preset("tiny-110m", vocab_size=tok.vocab_size)
    model = Transformer(cfg).eval()
    print(f"tiny-110m (random), {tok.vocab_size} tokens, compile={args.compile}", flush=True)
    prompts = [tok.encode(p, bos=True) for p in PROMPTS[: args.docs]]
    spent = timed_constraint()

    def constrained(i: int):
        p = SamplingParams(max_new_tokens=512, temperature=1.0, seed=i, json_schema=SCHEMA)
        return generate(model, tok, [prompts[i]], p, (tok.eos_id,), compile=args.compile)[0]

    def free(i: int, steps: int):  # as many draws and forwards as the constrained doc
        p = SamplingParams(max_new_tokens=steps, temperature=1.0, seed=i)
        return generate(model, tok, [prompts[i]], p, (), compile=args.compile)[0]

    docs = [constrained(i) for i in range(len(prompts))]  # (and warm-up)
    for d in docs:
        json.loads(d.text)
        assert d.finish_reason == "stop", d.text
    steps = [len(d.token_ids) + 1 for d in docs]  # (+ the EOS drawn)
    for i in range(len(prompts)):
        free(i, steps[i])
    # per doc, free and constrained in turns (drift falls on both alike), best of the rounds
    best = {name: [float("inf")] * len(prompts) for name in ("free", "constrained")}
    work = [float("inf")] * len(prompts)
    for r in range(args.repeats):
        for i in range(len(prompts)):
            for name in best:
                spent[0] = 0.0
                t = time.perf_counter()
                constrained(i) if name == "constrained" else free(i, steps[i])
                best[name][i] = min(best[name][i], time.perf_counter() - t)
                if name == "constrained":
                    work[i] = min(work[i], spent[0])
        print(f"  round {r + 1}/{args.repeats} done", flush=True)
    best = {name: sum(times) for name, times in best.items()}
    work = sum(work)
    n = sum(steps)
    per = {k: v / n * 1e3 for k, v in best.items()}
    print(f"\n{len(prompts)} docs, {n} tokens (best of {args.repeats})")
    print(f"free decode step        {per['free']:8.2f} ms/token")
    print(f"constrained decode step {per['constrained']:8.2f} ms/token")
    print(f"ratio constrained/free  {per['constrained'] / per['free']:8.3f}")
    print(
        f"constraint work         {work / n * 1e6:8.1f} us/token "
        f"({work / n * 1e3 / per['free']:.1%} of a free step; floor 10%)"
    )


def compare_libraries(tok: Tokenizer, tokens: int = 3000) -> None:
    """Per token, each installed library's mask computation and advance on SCHEMA (a walk
    through seeded random logits, masked; argmax): the library's share of a step."""
    import numpy as np

    V, table = tok.vocab_size, structured.token_bytes(tok)
    special = [i for i, b in enumerate(table) if not b]
    logits = torch.randn(4096, V, generator=torch.Generator().manual_seed(0)).numpy()
    schema = structured.schema_text(SCHEMA)

    def walk(name: str, new, fill, accept) -> None:
        """fill(m) -> allowed ids bitmask (int32 numpy); accept(m, token) -> ended."""
        spent, count, k = 0.0, 0, 0
        while count < tokens:
            m, ended = new(), False
            while not ended and count < tokens:
                t = time.perf_counter()
                bits = fill(m)
                spent += time.perf_counter() - t
                keep = np.unpackbits(bits.view(np.uint8), bitorder="little")[:V]
                token = int(np.where(keep == 1, logits[k % len(logits)], -np.inf).argmax())
                t = time.perf_counter()
                ended = accept(m, token)
                spent += time.perf_counter() - t
                count, k = count + 1, k + 1
        print(f"  {name:14s} {spent / count * 1e6:6.1f} us/token (mask + advance)", flush=True)

    print(f"candidate libraries, {tokens} tokens each:")
    try:
        import xgrammar as xgr

        compiled = structured.compiler(tok).compile_json_schema(schema, strict_mode=True)
        bm = xgr.allocate_token_bitmask(1, V)

        def xfill(m):
            m.fill_next_token_bitmask(bm)
            return bm.numpy()[0]

        xaccept = lambda m, t: m.accept_token(t) and m.is_terminated()
        walk("xgrammar", lambda: xgr.GrammarMatcher(compiled), xfill, xaccept)
    except ImportError:
        print("  xgrammar: not installed")
    try:
        import llguidance as llg
        import llguidance.torch as llgt

        class Vocab:  # what llguidance's TokenizerWrapper reads
            eos_token_id, bos_token_id, tokens = tok.eos_id, tok.bos_id, table
            special_token_ids = special

            def __call__(self, s):
                text = s.decode(errors="replace") if isinstance(s, bytes) else s
                return tok.encode(text, dummy_prefix=False)

        lltok = llg.LLTokenizer(llg.TokenizerWrapper(Vocab()))
        grammar = llg.LLMatcher.grammar_from_json_schema(schema)
        lbm = llgt.allocate_token_bitmask(1, V)

        def lfill(m):
            llgt.fill_next_token_bitmask(m, lbm)
            return lbm.numpy()[0]

        laccept = lambda m, t: not m.consume_token(t) or m.is_stopped()
        walk("llguidance", lambda: llg.LLMatcher(lltok, grammar), lfill, laccept)
    except ImportError:
        print("  llguidance: not installed")
    try:
        import outlines_core as oc
        from outlines_core.kernels import torch as oct

        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(table):
            if b:
                vocab.setdefault(b, []).append(i)
        t = time.perf_counter()
        regex = oc.json_schema.build_regex_from_schema(schema)
        index = oc.Index(regex, oc.Vocabulary(tok.eos_id, vocab))
        print(f"  (outlines-core's index: {time.perf_counter() - t:.2f} s)")
        obm = oct.allocate_token_bitmask(V)

        def ofill(m):
            oct.fill_next_token_bitmask(m, obm)
            return obm.numpy().reshape(-1)

        def oaccept(m, token):
            if token == tok.eos_id:
                return True
            m.advance(token)
            return m.is_finished()

        walk("outlines-core", lambda: oc.Guide(index), ofill, oaccept)
    except ImportError:
        print("  outlines-core: not installed")


if __name__ == "__main__":
    main()
