"""Serving throughput on loopback: aggregate generated tokens/s for 1, 4, 8 and 16 concurrent
streaming clients (the official openai client), with p50/p99 time to first token.

    python benchmarks/serve.py [--preset tiny-110m] [--max-tokens 64] [--requests 2]

A random-weight model of the preset (the real Llama 2 vocabulary) is served by our server on
127.0.0.1 with --max-batch 16; each client sends `--requests` chat requests one after the
other, EOS ignored (a stop-free, fixed-length answer), so every level generates the same
number of tokens per client. Bounded: the run ends by itself.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from llama2 import Llama, Tokenizer, Transformer, get_preset

VOCAB = Path(__file__).parent.parent / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-110m")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import uvicorn
    from openai import OpenAI

    from llama2.serve.api import create_app

    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    llm = Llama(Transformer(cfg).eval(), Tokenizer.from_file(VOCAB), cfg)
    llm.tokenizer.eos_id = -1  # never stop early: fixed-length answers
    app = create_app(llm, args.preset, max_batch=16, max_queue=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)

    def one_client(i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(args.requests):
            t0 = time.perf_counter()
            first, n = None, 0
            messages = [{"role": "user", "content": f"Tell me a story {i}.{j}"}]
            stream = client.chat.completions.create(
                model=args.preset,
                messages=messages,
                max_tokens=args.max_tokens,
                temperature=0.8,
                seed=i * 100 + j,
                stream=True,
                stream_options={"include_usage": True},
            )
            for ch in stream:
                if ch.choices and ch.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t0
                if ch.usage:
                    n = ch.usage.completion_tokens
            out.append((first if first is not None else float("nan"), n))
        return out

    one_client(0)  # warm-up
    rows = []
    for clients in (1, 4, 8, 16):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
        dt = time.perf_counter() - t0
        tokens = sum(n for _, n in results)
        ttft = sorted(t for t, _ in results)
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        rows.append((clients, tokens / dt, statistics.median(ttft), p99))
        print(
            f"{clients:3d} clients: {tokens / dt:8.1f} tokens/s  TTFT p50 {rows[-1][2]:.3f}s "
            f"p99 {p99:.3f}s",
            flush=True,
        )
    server.should_exit = True
    base = rows[0][1]
    print(
        f"\n{args.preset}, {args.threads} threads, {args.max_tokens} tokens x {args.requests} "
        f"requests per client"
    )
    for clients, tps, p50, p99 in rows:
        print(
            f"{clients:3d} clients  {tps:8.1f} tok/s  {tps / base:5.2f}x one client   "
            f"TTFT p50 {p50 * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms"
        )


if __name__ == "__main__":
    main()
