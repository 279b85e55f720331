"""Batch-1 decode and 512-token prefill speed: ours vs transformers vs llama.cpp, same weights.

    python benchmarks/generate.py [--presets tiny-15m tiny-110m] [--threads 2]

Random weights (the same ones for every engine: ours are written as an HF directory for
transformers and exported to GGUF for llama.cpp, then quantized with llama.cpp's own
quantizer). Every engine is timed the same way, best of --repeats:
  prefill tok/s = 512 / time(prompt of 512 tokens -> first new token)
  decode tok/s  = 127 / (time(128 new tokens) - time(1 new token)), greedy, EOS ignored
The engines of one format class (ours eager and compiled, transformers, llama.cpp) take turns,
one round of the three timings each, --repeats rounds: a machine whose speed drifts over
minutes (a shared VM's by 10-30%) then drifts under all of them alike, and a ratio compares
runs made within a minute of each other.
tiny-15m's context is raised to 1024 so that 512 + 128 tokens fit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import gc
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch
from machine import bandwidth_gbs, describe

from llama2 import Tokenizer, Transformer, get_preset, save_gguf, save_hf
from llama2.generation import SamplingParams, generate
from llama2.quantize import replace_linears

FIXTURE_VOCAB = Path(__file__).parent.parent / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf"
PROMPT_LEN, NEW = 512, 128


def seconds(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timings(run, rounds: int = 1) -> list[tuple[float, float, float]]:
    """run(prompt_len, new_tokens) generates; returns, for each round, the seconds of a 512-token
    prefill, of one new token and of NEW new tokens (after a warm-up)."""
    run(8, 2)
    return [
        (
            seconds(lambda: run(PROMPT_LEN, 1)),
            seconds(lambda: run(8, 1)),
            seconds(lambda: run(8, NEW)),
        )
        for _ in range(rounds)
    ]


def rates(times: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from the best of each timing."""
    prefill, first, full = (min(t[i] for t in times) for i in range(3))
    return PROMPT_LEN / prefill, (NEW - 1) / (full - first)


def in_turns(runs: dict, repeats: int) -> dict:
    """{name: run, or a callable giving one round's timings (a child process)} -> {name:
    (prefill, decode) tok/s}, timed in turns: each round times every engine once."""
    times: dict = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            if getattr(run, "child", False):
                t = run() if r == 0 or times[name] else None  # (None: llama.cpp crashed)
            else:
                t = timings(run)
            times[name] += t or []
        print(f"  round {r + 1}/{repeats} done", flush=True)
    return {name: rates(t) for name, t in times.items() if t}


def ours(model: Transformer, tok: Tokenizer, prompt: list[int], compile: bool = False):
    def run(n: int, new: int) -> None:
        params = SamplingParams(max_new_tokens=new, temperature=0)
        out = generate(model, tok, [prompt[:n]], params, compile=compile)
        assert len(out[0].token_ids) == new

    return run


def transformers_run(path: Path, dtype: torch.dtype, prompt: list[int]):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def run(n: int, new: int) -> None:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt[:n]]),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == n + new

    return run


def llamacpp_run(gguf: Path, threads: int, prompt: list[int]):
    from llama_cpp import Llama as LlamaCpp

    llm = LlamaCpp(
        str(gguf),
        n_ctx=1024,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(n: int, new: int) -> None:
        llm.reset()
        count = 0
        for _ in llm.generate(prompt[:n], temp=0.0, reset=True):
            count += 1
            if count == new:
                break

    return run


def llamacpp_timings(gguf: Path, threads: int, prompt: list[int]):
    """One round of llama.cpp's timings; meant to run in a child process (in_child)."""
    torch.set_num_threads(threads)
    return timings(llamacpp_run(gguf, threads, prompt))


def llamacpp_round(gguf: Path, threads: int, prompt: list[int]):
    """A round of llama.cpp's timings in a fresh child process (see in_child), for in_turns."""

    def run():
        return in_child(llamacpp_timings, gguf, threads, prompt)

    run.child = True
    return run


def in_child(fn, *args):
    """fn(*args) in a fresh process, so that a native crash of llama.cpp (a build whose
    instructions this CPU or VM refuses: SIGILL) loses its rows, not the whole benchmark."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return pool.submit(fn, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            print(
                f"  llama.cpp crashed in {fn.__name__}{args[:1]}: rows left out; reinstall it "
                "with CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --no-cache-dir --force-reinstall "
                "llama-cpp-python",
                flush=True,
            )
            return None


def llamacpp_quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    saved = os.dup(2)  # llama.cpp logs every tensor from C: keep stderr quiet meanwhile
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        os.dup2(saved, 2)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
    return dst


# our format -> the peers' of its class: (transformers' dtype, llama.cpp's format)
PEERS = {
    "fp32": ("fp32", "f32"),
    "fp16": ("fp16", "f16"),
    "bf16": ("bf16", None),
    "int8": (None, "q8_0"),
    "int4": (None, "q4_0"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# bytes per weight of each format (q8_0 and q4_0: 32 weights and an fp16 scale per block;
# ours: int8 with one scale per row, int4 with a scale and a zero per group of 32 or more)
BYTES_PER_WEIGHT = {"fp32": 4, "f32": 4, "bf16": 2, "fp16": 2, "f16": 2}
BYTES_PER_WEIGHT |= {"int8": 1, "q8_0": 34 / 32, "int4": 0.5, "q4_0": 18 / 32}


def streamed_bytes(cfg, fmt: str) -> float:
    """Bytes of weights one decoded token reads: every matrix but the embedding table (one
    row of it)."""
    base = fmt.removesuffix("+compile")
    return (cfg.num_params() - cfg.vocab_size * cfg.dim) * BYTES_PER_WEIGHT[base]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny-15m", "tiny-110m"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], help="engines to skip: transformers llama.cpp")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["fp32", "bf16", "fp16", "int8", "int4"],
        help="our weight formats to run (peers run their matching formats)",
    )
    args = p.parse_args()
    print(describe(args.threads), flush=True)
    bandwidth = bandwidth_gbs(args.threads)
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp  # noqa: F401

        have_cpp = "llama.cpp" not in args.skip
    except ImportError:
        have_cpp = False
    tok = Tokenizer.from_file(FIXTURE_VOCAB)
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, 32000, (PROMPT_LEN - 1,), generator=g).tolist()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="llama2-bench-"))
    for preset in args.presets:
        cfg = get_preset(preset, max_seq_len=max(1024, get_preset(preset).max_seq_len))
        torch.manual_seed(0)
        base = Transformer(cfg).eval()
        print(f"== {preset}: {cfg.num_params() / 1e6:.0f}M parameters", flush=True)

        def record(engine, fmt, measured, preset=preset, cfg=cfg):
            pre, dec = measured
            gbs = dec * streamed_bytes(cfg, fmt) / 1e9
            rows.append((preset, engine, fmt, pre, dec, gbs))
            print(
                f"{preset:10s} {engine:13s} {fmt:12s} prefill {pre:8.0f} tok/s  "
                f"decode {dec:7.1f} tok/s ({gbs:.1f} GB/s of weights)",
                flush=True,
            )

        hf_dir = save_hf(tmp / preset / "hf", cfg, base.state_dict(), tok)
        files = {}
        if have_cpp:
            files["f32"] = save_gguf(tmp / preset / "f32.gguf", cfg, base.state_dict(), tok, "f32")
            files["f16"] = save_gguf(tmp / preset / "f16.gguf", cfg, base.state_dict(), tok, "f16")
            for ours_fmt, q in (("int8", "q8_0"), ("int4", "q4_0")):
                if ours_fmt in args.formats:
                    files[q] = in_child(
                        llamacpp_quantize, files["f32"], tmp / preset / f"{q}.gguf", q
                    )
        for fmt in args.formats:
            model = copy.deepcopy(base)
            if fmt in ("bf16", "fp16"):
                model = model.to(torch.bfloat16 if fmt == "bf16" else torch.float16)
            elif fmt in ("int8", "int4"):
                replace_linears(model, fmt)
            runs = {("llama2", fmt): ours(model, tok, prompt)}
            if not args.no_compile:
                t = time.perf_counter()
                ours(model, tok, prompt, compile=True)(8, 2)
                print(f"  (compiled in {time.perf_counter() - t:.0f}s)", flush=True)
                runs["llama2", fmt + "+compile"] = ours(model, tok, prompt, compile=True)
            hf_fmt, cpp_fmt = PEERS[fmt]
            if hf_fmt and "transformers" not in args.skip:
                runs["transformers", hf_fmt] = transformers_run(hf_dir, DTYPES[hf_fmt], prompt)
            if cpp_fmt and files.get(cpp_fmt):
                runs["llama.cpp", cpp_fmt] = llamacpp_round(files[cpp_fmt], args.threads, prompt)
            print(f"  {fmt}: {', '.join(' '.join(k) for k in runs)} in turns", flush=True)
            for (engine, name), measured in in_turns(runs, args.repeats).items():
                record(engine, name, measured)
            del model, runs
        del base
    print(f"\nthreads {args.threads}; torch {torch.__version__}; best of {args.repeats}")
    print(f"decode streams every weight once a token; measured copy bandwidth {bandwidth:.1f} GB/s")
    print(
        f"{'preset':10s} {'engine':13s} {'format':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s}"
        f" {'weights GB/s':>13s}"
    )
    for r in rows:
        print(
            f"{r[0]:10s} {r[1]:13s} {r[2]:12s} {r[3]:14.0f} {r[4]:13.1f} "
            f"{r[5]:6.1f} ({r[5] / bandwidth:4.0%})"
        )
    print("\nratios (ours / peer):")
    get = {(r[0], r[1], r[2]): r for r in rows}
    classes = [
        ("fp32", "fp32", "f32"),
        ("fp16", "fp16", "f16"),
        ("bf16", "bf16", None),
        ("int8", None, "q8_0"),
        ("int4", None, "q4_0"),
    ]
    classes += [(o + "+compile", h, c) for o, h, c in classes]
    for preset in args.presets:
        for ours_fmt, hf_fmt, cpp_fmt in classes:
            o = get.get((preset, "llama2", ours_fmt))
            for engine, fmt in (("transformers", hf_fmt), ("llama.cpp", cpp_fmt)):
                peer = get.get((preset, engine, fmt))
                if o and peer:
                    print(
                        f"{preset:10s} {ours_fmt:12s} vs {engine} {fmt}: decode "
                        f"{o[4] / peer[4]:.2f}x, prefill {o[3] / peer[3]:.2f}x"
                    )
    os.system(f"rm -rf {tmp}")


if __name__ == "__main__":
    main()
