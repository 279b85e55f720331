"""Serving on loopback: throughput for 1, 4, 8 and 16 concurrent streaming clients, time to first
token with a shared 400-token system prompt (prefix caching), and TTFT / inter-token latency
with a mix of long and short prompts (batched and chunked prefill); on request a soak (2,000
short requests of every kind, resident memory after the first 100 and at the end).

    python benchmarks/serve.py [--preset tiny-110m] [--max-tokens 64] [--requests 2] [--compile]
                               [--only engine throughput prefix mixed soak] [--soak-requests 2000]
                               [--server-process [--clients-nice N]]

`engine` (first, before the server takes the model) times one stream through the engine itself
(no HTTP) against `llm.generate` for the same prompt and settings, alternating, best of three
each, then 8 streams submitted together against that one stream (the batched decode's scaling
without HTTP or clients); with --compile, eager and compiled both (the compiled decode speed
against eager).

A random-weight model of the preset (the real Llama 2 vocabulary) is served by our server on
127.0.0.1 with --max-batch 16; clients are the official openai package, streaming chat
completions with EOS ignored (stop-free, fixed-length answers), so every level generates the
same number of tokens per client. The clients run in the benchmark's process; the server runs
there too (a thread), or with --server-process in a process of its own, as `llama2 serve` does
in front of clients on other processes or machines: the clients' and the event loop's Python
do not share one GIL with the engine; `--clients-nice N` then lowers the clients'
scheduling priority (nice N, the server's unchanged), the nearest a one-machine benchmark
comes to clients on machines of their own: their CPU time is still spent, on cores the
engine does not need at that moment. Bounded: the run ends by itself. Server options that
the llama2 on the path lacks are left out, so the same script measures another checkout
(`PYTHONPATH=/path/to/other/checkout python benchmarks/serve.py`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import multiprocessing
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import torch

from llama2 import Llama, Tokenizer, Transformer, get_preset
from llama2.generation import CachedModel

VOCAB = Path(__file__).parent.parent / "tests" / "fixtures" / "ggml-vocab-llama-spm.gguf"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def random_model(preset: str) -> Llama:
    """The preset at random weights (seed 0) with the real Llama 2 vocabulary, never stopping
    early: every request generates its max_tokens."""
    tok = Tokenizer.from_file(VOCAB)
    cfg = get_preset(preset, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    llm = Llama(Transformer(cfg).eval(), tok, cfg)
    llm.tokenizer.eos_id = -1
    return llm


def serve_in_child(preset: str, threads: int, options: dict, port: int) -> None:
    """--server-process: the same model and server, in this (spawned) process."""
    import uvicorn

    from llama2.serve.api import create_app

    torch.set_num_threads(threads)
    app = create_app(random_model(preset), preset, **options)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-110m")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="the engine's compiled decode step")
    p.add_argument("--only", nargs="+", default=["engine", "throughput", "prefix", "mixed"])
    p.add_argument("--soak-requests", type=int, default=2000)
    p.add_argument("--server-process", action="store_true", help="the server in its own process")
    p.add_argument(
        "--clients-nice",
        type=int,
        default=0,
        help="with --server-process: the clients' niceness (0-19), the server's left as it is",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import uvicorn
    from openai import OpenAI

    from llama2.serve.api import create_app
    from llama2.serve.engine import Engine

    if args.clients_nice and not args.server_process:
        raise SystemExit("--clients-nice needs --server-process (the clients' own process)")
    if not 0 <= args.clients_nice <= 19:
        raise SystemExit(f"--clients-nice must be in 0..19, not {args.clients_nice}")
    if args.server_process and "soak" in args.only:
        raise SystemExit("the soak reads the engine's state: run it without --server-process")
    llm = random_model(args.preset)
    tok = llm.tokenizer
    # the library alone, for one stream's reference (before the server takes the model's cache)
    llm.compile = args.compile
    ids = tok.encode("Tell me a story 0.0", bos=True)
    for _ in range(2):  # (the first warms up, or compiles)
        t0 = time.perf_counter()
        llm.generate("Tell me a story 0.0", max_new_tokens=args.max_tokens, temperature=0.8, seed=0)
        lib_tps = args.max_tokens / (time.perf_counter() - t0)
    print(f"library llm.generate ({len(ids)}-token prompt): {lib_tps:.1f} tok/s", flush=True)
    if "engine" in args.only:
        model_alone(llm.model, args)
        engine_vs_library(llm, args)
        llm.compile = args.compile
    options = {"max_batch": 16, "max_queue": 64}
    if args.compile:
        options["compile"] = True
    known = inspect.signature(Engine).parameters  # (create_app passes them to the engine)
    if any(k not in known for k in options):
        raise SystemExit(f"this llama2's server lacks {[k for k in options if k not in known]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.server_process:
        del llm  # (its memory: the child builds its own)
        child = multiprocessing.get_context("spawn").Process(
            target=serve_in_child, args=(args.preset, args.threads, options, port), daemon=True
        )
        child.start()
        while True:  # until the child's server answers
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if not child.is_alive():
                    raise SystemExit("the server process died before it served") from None
                time.sleep(0.2)
        os.nice(args.clients_nice)  # (after the spawn: the server keeps its priority)
    else:
        app = create_app(llm, args.preset, **options)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=900)

    def ask(messages, max_tokens: int, seed: int) -> tuple[float, list[float], int]:
        """One streamed request: (TTFT, gaps between pieces, completion tokens)."""
        t0 = time.perf_counter()
        stamps, n = [], 0
        stream = client.chat.completions.create(
            model=args.preset,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.8,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if ch.usage:
                n = ch.usage.completion_tokens
        ttft = stamps[0] - t0 if stamps else float("nan")
        return ttft, [b - a for a, b in pairwise(stamps)], n

    def one_client(i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(args.requests):
            messages = [{"role": "user", "content": f"Tell me a story {i}.{j}"}]
            ttft, _, n = ask(messages, args.max_tokens, i * 100 + j)
            out.append((ttft, n))
        return out

    where = "its own process" if args.server_process else "the clients' process"
    nice = f", clients at nice {args.clients_nice}" if args.clients_nice else ""
    print(f"{args.preset}, {args.threads} threads, compile={args.compile}, server in {where}{nice}")
    one_client(0)  # warm-up (and the compile, with --compile)
    if args.compile:  # the compiled steps of every width the levels use, before any is timed
        for clients in (4, 8, 16):
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one_client, range(clients)))

    if "throughput" in args.only:
        rows = []
        for clients in (1, 4, 8, 16):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
            dt = time.perf_counter() - t0
            tokens = sum(n for _, n in results)
            ttft = [t for t, _ in results]
            rows.append((clients, tokens / dt, statistics.median(ttft), pct(ttft, 0.99)))
            print(f"{clients:3d} clients: {tokens / dt:8.1f} tokens/s", flush=True)
        print(f"\nthroughput: {args.max_tokens} tokens x {args.requests} requests per client")
        for clients, tps, p50, p99 in rows:
            print(
                f"{clients:3d} clients  {tps:8.1f} tok/s  {tps / rows[0][1]:5.2f}x one client   "
                f"TTFT p50 {p50 * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms",
                flush=True,
            )
        print(f"one client: {rows[0][1] / lib_tps:.2f}x the library's {lib_tps:.1f} tok/s")

    if "prefix" in args.only:
        # a system prompt of ~400 tokens, then requests one after another that share it
        words = "You are a careful assistant who answers briefly and cites the rules. "
        system = ""
        while len(tok.encode(system)) < 400:
            system += words
        ttfts = []
        for j in range(5):
            msgs = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question number {j}: what is {j} + {j}?"},
            ]
            ttfts.append(ask(msgs, 4, j)[0])
        prompt_len = len(tok.encode(system))
        later = statistics.median(ttfts[1:])
        print(
            f"\nprefix: {prompt_len}-token shared system prompt, 5 requests one after another: "
            f"TTFT first {ttfts[0] * 1000:.0f} ms, later (median) {later * 1000:.0f} ms, "
            f"{ttfts[0] / later:.1f}x lower",
            flush=True,
        )

    if "mixed" in args.only:
        # 6 clients with short prompts stream while 2 send ~800-token prompts
        long_text = "The quick brown fox jumps over the lazy dog. " * 80

        def mixed_client(i: int) -> tuple[str, list[tuple[float, list[float], int]]]:
            kind = "long" if i % 4 == 3 else "short"
            out = []
            for j in range(args.requests):
                text = (long_text if kind == "long" else "") + f"Tell me a story {i}.{j}"
                out.append(ask([{"role": "user", "content": text}], args.max_tokens, i + j))
            return kind, out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(mixed_client, range(8)))
        dt = time.perf_counter() - t0
        tokens = sum(n for _, rs in results for _, _, n in rs)
        print(f"\nmixed: 6 short-prompt and 2 long-prompt clients, {tokens / dt:.1f} tok/s")
        for kind in ("short", "long"):
            rs = [r for k, rs in results if k == kind for r in rs]
            ttft = [t for t, _, _ in rs]
            itl = [g for _, gaps, _ in rs for g in gaps]
            print(
                f"  {kind:5s} prompts: TTFT p50 {pct(ttft, 0.5) * 1000:6.0f} ms  "
                f"p99 {pct(ttft, 0.99) * 1000:6.0f} ms   ITL p50 {pct(itl, 0.5) * 1000:5.0f} ms  "
                f"p99 {pct(itl, 0.99) * 1000:5.0f} ms",
                flush=True,
            )
    if "soak" in args.only:
        soak(f"http://127.0.0.1:{port}", app.state.engine, args.soak_requests)
    if args.server_process:
        child.terminate()
        child.join()
    else:
        server.should_exit = True


def model_alone(model: Transformer, args, rows: int = 8, prompt: int = 9) -> None:
    """The ceiling of batched decoding on this model and CPU: a decode step's forward for one
    row and for `rows` rows (the positions the engine's streams pass through; no sampling,
    engine or HTTP), alternating, best of five; with --compile, through the compiled step over
    a static cache of `rows` slots too, as the engine runs it. No engine scales past this
    ratio."""
    for compiled in (False, True) if args.compile else (False,):
        cached = CachedModel(copy.deepcopy(model), rows, prompt + args.max_tokens, compiled)
        step = {1: [], rows: []}
        with torch.inference_mode():
            cached.prefill([[0] * prompt] * rows)
            for b in [*step, *step]:  # (the first round compiles or warms up)
                cached.decode([0] * b, [prompt] * b)
            for _ in range(5):
                for b in step:
                    t0 = time.perf_counter()
                    for pos in range(prompt, prompt + args.max_tokens):
                        cached.decode([0] * b, [pos] * b)
                    step[b].append((time.perf_counter() - t0) / args.max_tokens)
        cached.close()
        one, many = min(step[1]), min(step[rows])
        print(
            f"the model alone (decode steps' forwards, {'compiled' if compiled else 'eager'}): "
            f"1 row {one * 1e3:.1f} ms, {rows} rows {many * 1e3:.1f} ms a step: {rows} rows "
            f"give {rows * one / many:.2f}x one, the most batching can give here",
            flush=True,
        )


def engine_vs_library(llm: Llama, args) -> None:
    """One stream: the engine (its own thread, 8 slots as `llama2 serve` has by default) against
    llm.generate, same prompt, max_tokens, temperature and seed; eager, then compiled."""
    from llama2.generation import SamplingParams
    from llama2.serve.engine import Engine, Request

    # the library on a copy of the model: its generate sets up (and drops) the model's own
    # cache, which the engine's thread must keep
    engine_model, llm = llm.model, Llama(copy.deepcopy(llm.model), llm.tokenizer, llm.config)
    tok, prompt = llm.tokenizer, "Tell me a story 0.0"
    ids = tok.encode(prompt, bos=True)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.8, seed=0)
    rates = {}
    for compiled in (False, True) if args.compile else (False,):
        llm.compile = compiled
        llm.generate(prompt, max_new_tokens=args.max_tokens, temperature=0.8, seed=0)  # warm
        options = {"compile": True} if compiled else {}
        engine = Engine(engine_model, tok, max_batch=8, **options)

        def through_engine(engine: Engine = engine, streams: int = 1) -> None:
            """`streams` requests submitted together (seeds 0, 1, ...), until all are done."""
            ends = []

            def emit(kind: str, value, done: threading.Event) -> None:
                if kind != "token":
                    ends.append(kind)
                    done.set()

            events = [threading.Event() for _ in range(streams)]
            engine.submit(
                [
                    Request(
                        ids,
                        dataclasses.replace(params, seed=i),
                        (),
                        lambda k, v, e=e: emit(k, v, e),
                    )
                    for i, e in enumerate(events)
                ]
            )
            assert all(e.wait(timeout=900) for e in events) and set(ends) == {"done"}, ends

        through_engine()  # warm (or compile)
        lib, eng = [], []
        for _ in range(3):  # alternating: the machine's load moves
            t0 = time.perf_counter()
            llm.generate(prompt, max_new_tokens=args.max_tokens, temperature=0.8, seed=0)
            lib.append(args.max_tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            through_engine()
            eng.append(args.max_tokens / (time.perf_counter() - t0))
        # 8 streams together through the engine alone (no HTTP): the batched decode's own
        # scaling, against which the clients' below can be read
        through_engine(streams=8)
        eng8 = []
        for _ in range(2):
            t0 = time.perf_counter()
            through_engine(streams=8)
            eng8.append(8 * args.max_tokens / (time.perf_counter() - t0))
        engine.shutdown()
        rates[compiled] = max(lib), max(eng)
        print(
            f"one stream, {'compiled' if compiled else 'eager'}: llm.generate {max(lib):.1f} "
            f"tok/s, engine {max(eng):.1f} tok/s: {max(eng) / max(lib):.2f}x the library "
            f"(runs: library {', '.join(f'{r:.1f}' for r in lib)}; "
            f"engine {', '.join(f'{r:.1f}' for r in eng)})",
            flush=True,
        )
        print(
            f"engine alone, 8 streams together: {max(eng8):.1f} tok/s, {max(eng8) / max(eng):.2f}x "
            f"one stream (runs {', '.join(f'{r:.1f}' for r in eng8)})",
            flush=True,
        )
    if args.compile:
        print(
            f"compiled vs eager: llm.generate {rates[True][0] / rates[False][0]:.2f}x, "
            f"engine {rates[True][1] / rates[False][1]:.2f}x",
            flush=True,
        )
    engine_model.clear_cache()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def soak(base: str, engine, total: int) -> None:
    """`total` short requests from 8 clients, in turn: whole answers, streams, streams that hang
    up after their first piece, invalid requests (400), completions with n=2 and logprobs.
    Prints resident memory (server and clients: one process) after the first 100 and at the
    end; fails if any request went wrong or anything is left running."""
    clients: dict[int, httpx.Client] = {}
    system = {"role": "system", "content": "Be terse."}

    def one(i: int) -> str:
        http = clients.setdefault(threading.get_ident(), httpx.Client(timeout=120))
        body = {"messages": [system, {"role": "user", "content": f"q{i}"}], "max_tokens": 6}
        body |= {"seed": i, "temperature": 0.9}
        url = base + "/v1/chat/completions"
        kind = i % 5
        if kind == 0:
            r = http.post(url, json=body)
            return "ok" if r.status_code == 200 and r.json()["choices"] else r.text
        if kind in (1, 2):  # streamed; kind 2 hangs up after the first piece
            with http.stream("POST", url, json=body | {"stream": True}) as r:
                for line in r.iter_lines():
                    if kind == 2 and '"content": "' in line and '"role"' not in line:
                        return "gone"
                    if line == "data: [DONE]":
                        return "ok"
            return "no [DONE]"
        if kind == 3:
            r = http.post(url, json=body | {"seed": 2**64, "stream_options": "x"})
            return "ok" if r.status_code == 400 else r.text
        r = http.post(
            base + "/v1/completions",
            json={"prompt": f"def f{i}", "max_tokens": 4, "n": 2, "logprobs": 1, "seed": i},
        )
        return "ok" if r.status_code == 200 and len(r.json()["choices"]) == 2 else r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(100)))
        rss_100 = _rss_mib()
        print(f"\nsoak: RSS after 100 requests {rss_100:.1f} MiB", flush=True)
        for start in range(100, total, 500):
            outcomes += list(pool.map(one, range(start, min(start + 500, total))))
            print(f"  after {len(outcomes)}: {_rss_mib():.1f} MiB", flush=True)
    deadline = time.time() + 30
    while engine.num_running and time.time() < deadline:  # (the last hang-ups)
        time.sleep(0.01)
    rss_end = _rss_mib()
    for http in clients.values():
        http.close()
    bad = [o for o in outcomes if o not in ("ok", "gone")]
    print(
        f"soak: {len(outcomes)} requests in {time.perf_counter() - t0:.0f} s "
        f"({outcomes.count('gone')} hung up, {len(bad)} wrong), RSS after 100 {rss_100:.1f} MiB, "
        f"at the end {rss_end:.1f} MiB ({100 * (rss_end / rss_100 - 1):+.1f}%), left running "
        f"{engine.num_running}, waiting {engine.num_waiting}, engine errors "
        f"{engine.stats.engine_errors}",
        flush=True,
    )
    if bad or engine.num_running or rss_end > 1.05 * rss_100:
        raise SystemExit(f"soak failed: {bad[:3]}")


if __name__ == "__main__":
    main()
