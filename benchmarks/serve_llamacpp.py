"""One stream through `llama2 serve` against llama.cpp's server, same weights, same format class.

    python benchmarks/serve_llamacpp.py [--preset tiny-110m] [--threads 2] [--max-tokens 128]
                                        [--rounds 3] [--formats fp32 int8]

A random-weight model of the preset (seed 0, the real Llama 2 vocabulary, as benchmarks/serve.py
builds it) is saved once as an HF directory (fp32, and int8 as `llama2 quantize --mode int8`
writes it) and as GGUF (f32 and q8_0, as `llama2 convert --to gguf --gguf-type` writes them).
Each is served in a process of its own, all at once (one at a time starting: ours compiles its
decode step at start-up, `choose_decode`, and is timed only once it answers):
  ours:  `llama2 serve DIR` with its defaults (compile chosen at start-up, 8 slots), and
         OMP_NUM_THREADS=--threads;
  peer:  llama-cpp-python's OpenAI-compatible server, `python -m llama_cpp.server --model X.gguf
         --n_threads T --n_threads_batch T` (pip install 'llama-cpp-python[server]').
One client (the official openai package) sends the same text completion to each in turn,
streaming, greedy (temperature 0), max_tokens --max-tokens; --rounds rounds, the servers
taking turns within each (a shared machine's drift falls on all alike), best of the rounds.
A whole (unstreamed) request to each first checks that every server generates exactly
max_tokens tokens (usage.completion_tokens: a random model's greedy path does not reach EOS;
if one did, the run says so and stops) for the same prompt tokens.
  TTFT         = time from sending the request to its first streamed piece
  decode tok/s = (max_tokens - 1) / (time of the last piece - time of the first)
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from machine import describe
from serve import VOCAB

from llama2 import Tokenizer, Transformer, get_preset, save_gguf, save_hf
from llama2.quantize import quantization_config, replace_linears

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
PEER = {"fp32": "f32", "int8": "q8_0"}  # our format -> llama.cpp's of its class


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_models(preset: str, formats: list[str], out: Path) -> dict[str, Path]:
    """{format: path}: ours (HF directories) and llama.cpp's (GGUF files), the same weights."""
    tok = Tokenizer.from_file(VOCAB)
    cfg = get_preset(preset, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    paths = {}
    for fmt in formats:
        paths[fmt] = out / fmt
        if fmt == "fp32":
            save_hf(paths[fmt], cfg, model.state_dict(), tok)
        else:
            quantized = replace_linears(copy.deepcopy(model), fmt)
            quant = quantization_config(fmt, 32)
            save_hf(paths[fmt], cfg, quantized.state_dict(), tok, quantization=quant)
        gguf = PEER[fmt]
        paths[gguf] = save_gguf(out / f"{gguf}.gguf", cfg, model.state_dict(), tok, gguf)
    return paths


def start(name: str, command: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    """The server's process, once it answers GET /v1/models (its stderr to `log`)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).raise_for_status()
            break
        except httpx.HTTPError:
            if proc.poll() is not None:
                tail = log.read_text()[-2000:]
                raise SystemExit(
                    f"{name} exited ({proc.returncode}) before serving:\n{tail}"
                ) from None
            time.sleep(0.5)
    print(f"  {name}: serving after {time.perf_counter() - t0:.0f} s", flush=True)
    return proc


def ask(client, name: str, max_tokens: int) -> tuple[float, float]:
    """One streamed greedy completion: (TTFT seconds, decode tok/s)."""
    t0 = time.perf_counter()
    stamps = []
    stream = client.completions.create(
        model=name, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return stamps[0] - t0, (max_tokens - 1) / (stamps[-1] - stamps[0])


def check(client, name: str, max_tokens: int) -> tuple[int, str]:
    """A whole greedy answer: (prompt tokens, text); fails unless it has max_tokens tokens."""
    r = client.completions.create(model=name, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
    if r.usage.completion_tokens != max_tokens:
        raise SystemExit(
            f"{name} generated {r.usage.completion_tokens} tokens, not {max_tokens} "
            f"({r.choices[0].finish_reason}): the counts must match to compare"
        )
    return r.usage.prompt_tokens, r.choices[0].text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-110m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--formats", nargs="+", default=["fp32", "int8"], choices=list(PEER))
    args = p.parse_args()
    from openai import OpenAI

    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"llama.cpp's server: pip install 'llama-cpp-python[server]' ({e})"
        ) from None
    print(describe(args.threads), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="llama2-serve-llamacpp-"))
    paths = save_models(args.preset, args.formats, tmp)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    servers, procs = {}, []  # (engine, format) -> (client, model name)
    try:
        for fmt in args.formats:
            for engine, f in (("llama2 serve", fmt), ("llama.cpp", PEER[fmt])):
                port = free_port()
                if engine == "llama2 serve":
                    command = [sys.executable, "-m", "llama2.cli", "serve", str(paths[f])]
                    command += ["--port", str(port), "--name", args.preset, "--no-web"]
                else:
                    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(paths[f])]
                    command += ["--port", str(port), "--n_ctx", "1024", "--model_alias"]
                    command += [args.preset, "--n_threads", str(args.threads)]
                    command += ["--n_threads_batch", str(args.threads)]
                log = tmp / f"{f}.log"
                procs.append(start(f"{engine} {f}", command, env, port, log))
                if engine == "llama2 serve":  # its start-up's choice: compiled or eager
                    said = [x for x in log.read_text().splitlines() if "using" in x]
                    print(f"    {said[-1] if said else '(no compile line)'}", flush=True)
                url = f"http://127.0.0.1:{port}/v1"
                client = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
                servers[engine, f] = client
        texts = {}
        for (engine, f), client in servers.items():
            prompt_tokens, texts[engine, f] = check(client, args.preset, args.max_tokens)
            ask(client, args.preset, args.max_tokens)  # (warm: the compiled step's first run)
            print(f"  {engine} {f}: {prompt_tokens} prompt tokens, {args.max_tokens} generated")
        times: dict = {key: [] for key in servers}
        for r in range(args.rounds):
            for key, client in servers.items():
                times[key].append(ask(client, args.preset, args.max_tokens))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    print(
        f"\n{args.preset}, {args.threads} threads, one stream, {args.max_tokens} tokens a "
        f"request, greedy, best of {args.rounds} rounds"
    )
    best = {k: (min(t for t, _ in v), max(d for _, d in v)) for k, v in times.items()}
    for (engine, f), (ttft, tps) in best.items():
        runs = ", ".join(f"{d:.1f}" for _, d in times[engine, f])
        print(
            f"{engine:13s} {f:5s} decode {tps:7.1f} tok/s  TTFT {ttft * 1e3:6.1f} ms  (runs {runs})"
        )
    for fmt in args.formats:
        ours, peer = best["llama2 serve", fmt], best["llama.cpp", PEER[fmt]]
        a, b = texts["llama2 serve", fmt], texts["llama.cpp", PEER[fmt]]
        print(
            f"ours {fmt} / llama.cpp {PEER[fmt]}: decode {ours[1] / peer[1]:.2f}x, TTFT "
            f"{ours[0] / peer[0]:.2f}x their time (greedy texts: the first "
            f"{len(os.path.commonprefix([a, b]))} of {len(a)} characters agree)"
        )
    subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
