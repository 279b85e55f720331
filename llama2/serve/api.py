"""An OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

POST /v1/chat/completions and /v1/completions (streamed as server-sent events in OpenAI's
chunk format, ending with `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus),
POST /tokenize and /detokenize. Errors have OpenAI's shape {"error": {message, type, param,
code}}: 401 without the key when one is set, 400 for a bad field or a too-long prompt, 404
for an unknown model, 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..formats import DialogError, encode_chat, encode_infill, infill_ids
from ..generation import Completion, SamplingParams, TokenLogprob
from ..llm import Llama
from .engine import Engine, QueueFull
from .engine import Request as EngineRequest


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        503: "server_overloaded",
    }.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _field(body: dict, name: str, kind, default, check=None, what=""):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise APIError(400, f"'{name}' must be {kind.__name__}", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' {what}", name)
    return value


def _sampling(body: dict, max_default: int, logprobs: int | None) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(400, "'stop' must be a string or a list of non-empty strings", "stop")
    return SamplingParams(
        max_new_tokens=_field(
            body, "max_tokens", int, max_default, lambda v: v >= 1, "must be >= 1"
        ),
        temperature=_field(
            body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"
        ),
        top_p=_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        seed=_field(body, "seed", int, None),
        stop=tuple(stop or ()),
        logprobs=logprobs,
    )


def create_app(
    llm: Llama, model_name: str, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64
) -> FastAPI:
    if llm.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer")
    tok = llm.tokenizer
    engine = Engine(llm.model, tok, max_batch=max_batch, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="llama2", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.code)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                )
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"the model '{model}' does not exist", "model", "model_not_found")
        return body

    def run(prompts: list[list[int]], params: list[SamplingParams], stop_ids, continuation: bool):
        """Submit one engine request per choice; return an asyncio queue of (index, kind, x)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):

            def emit(kind, value, i=i):
                loop.call_soon_threadsafe(queue.put_nowait, (i, kind, value))

            reqs.append(EngineRequest(ids, p, stop_ids, emit, continuation))
        try:
            for r in reqs:
                engine.submit(r)
        except QueueFull as e:
            for r in reqs:
                r.cancelled.set()
            raise APIError(503, f"the server is busy: {e}", code="queue_full") from None
        except ValueError as e:
            for r in reqs:
                r.cancelled.set()
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        return queue, reqs

    def logprob_entry(info: TokenLogprob) -> dict:
        def item(i: int, lp: float) -> dict:
            piece = tok.id_to_piece(i).replace("\u2581", " ")
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return item(info.token_id, info.logprob) | {
            "top_logprobs": [item(i, lp) for i, lp in info.top]
        }

    def choices_params(body: dict, max_default: int, logprobs: int | None) -> list[SamplingParams]:
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= 16, "must be between 1 and 16")
        base = _sampling(body, max_default, logprobs)
        seeds = [None if base.seed is None else base.seed + i for i in range(n)]
        return [SamplingParams(**{**vars(base), "seed": seed}) for seed in seeds]

    async def respond(body, prompts, params, stop_ids, continuation, kind: str):
        queue, reqs = run(prompts, params, stop_ids, continuation)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        n = len(params)
        prompt_tokens = sum(len(p) for p in prompts)

        def usage(done: list[Completion]) -> dict:
            gen = sum(len(c.token_ids) for c in done)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": gen,
                "total_tokens": prompt_tokens + gen,
            }

        if not body.get("stream"):
            done: list[Completion | None] = [None] * n
            try:
                while any(d is None for d in done):
                    i, what, value = await queue.get()
                    if what == "done":
                        done[i] = value
            except asyncio.CancelledError:
                for r in reqs:
                    r.cancelled.set()
                raise
            choices = []
            for i, c in enumerate(done):
                lp = None
                if c.logprobs is not None:
                    entries = [logprob_entry(x) for x in c.logprobs]
                    lp = (
                        {"content": entries}
                        if kind == "chat"
                        else {
                            "tokens": [e["token"] for e in entries],
                            "token_logprobs": [e["logprob"] for e in entries],
                            "top_logprobs": [
                                {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                for e in entries
                            ],
                        }
                    )
                if kind == "chat":
                    choices.append(
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp,
                            "finish_reason": c.finish_reason,
                        }
                    )
                else:
                    text = (body.get("prompt") if body.get("echo") else "") + c.text
                    choices.append(
                        {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
                    )
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": model_name,
                    "choices": choices,
                    "usage": usage(done),
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list[dict], usage_: dict | None = None) -> str:
            data = {
                "id": rid,
                "object": f"{obj}.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage_
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            done: list[Completion | None] = [None] * n
            try:
                if kind == "chat":
                    for i in range(n):
                        yield chunk(
                            [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                elif body.get("echo"):
                    for i in range(n):
                        yield chunk(
                            [
                                {
                                    "index": i,
                                    "text": body.get("prompt"),
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                while any(d is None for d in done):
                    i, what, value = await queue.get()
                    if what == "done":
                        done[i] = value
                        last = {"index": i, "logprobs": None, "finish_reason": value.finish_reason}
                        last |= {"delta": {}} if kind == "chat" else {"text": ""}
                        yield chunk([last])
                        continue
                    text, info = value
                    lp = None
                    if info is not None:
                        lp = {"content": [logprob_entry(info)]} if kind == "chat" else None
                    piece = {"delta": {"content": text}} if kind == "chat" else {"text": text}
                    yield chunk([{"index": i, **piece, "logprobs": lp, "finish_reason": None}])
                if include_usage:
                    yield chunk([], usage(done))
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): free the slots now
                for r in reqs:
                    r.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise APIError(400, "'messages' must be a list of messages", "messages")
        try:
            ids = encode_chat(tok, messages)
        except DialogError as e:
            raise APIError(400, str(e), "messages") from None
        logprobs = None
        if body.get("logprobs"):
            logprobs = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "must be 0..20")
        params = choices_params(body, llm.config.max_seq_len, logprobs)
        return await respond(body, [ids] * len(params), params, (tok.eos_id,), False, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        logprobs = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "must be 0..20")
        suffix = body.get("suffix")
        stop_ids: tuple[int, ...] = (tok.eos_id,)
        if suffix is not None:
            if not isinstance(suffix, str):
                raise APIError(400, "'suffix' must be a string", "suffix")
            try:
                ids = encode_infill(tok, prompt, suffix)
                stop_ids += (infill_ids(tok)["eot"],)
            except ValueError as e:
                raise APIError(400, str(e), "suffix") from None
        else:
            ids = tok.encode(prompt, bos=True)
        params = choices_params(body, 16, logprobs)
        return await respond(body, [ids] * len(params), params, stop_ids, True, "text")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": created, "owned_by": "llama2"}
            ],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        ids = tok.encode(text, bos=bool(body.get("add_special_tokens", True)))
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids
        ):
            raise APIError(400, "'tokens' must be a list of token ids", "tokens")
        return {"prompt": tok.decode(ids)}

    @app.get("/metrics")
    async def metrics():
        s = engine.stats
        lines = []

        def metric(name: str, kind: str, help_: str, value) -> None:
            lines.extend(
                [
                    f"# HELP llama2_{name} {help_}",
                    f"# TYPE llama2_{name} {kind}",
                    f"llama2_{name} {value}",
                ]
            )

        def summary(name: str, help_: str, values: list[float]) -> None:
            lines.extend([f"# HELP llama2_{name} {help_}", f"# TYPE llama2_{name} summary"])
            ordered = sorted(values)
            for q in (0.5, 0.9, 0.99):
                v = (
                    ordered[min(len(ordered) - 1, int(q * len(ordered)))]
                    if ordered
                    else float("nan")
                )
                lines.append(f'llama2_{name}{{quantile="{q}"}} {v}')
            lines.extend([f"llama2_{name}_sum {sum(values)}", f"llama2_{name}_count {len(values)}"])

        with s.lock:
            metric("requests_total", "counter", "Requests received.", s.requests)
            metric("prompt_tokens_total", "counter", "Prompt tokens.", s.prompt_tokens)
            metric("generation_tokens_total", "counter", "Generated tokens.", s.generated_tokens)
            summary("time_to_first_token_seconds", "Time to the first token.", list(s.ttft))
            summary("inter_token_latency_seconds", "Time between tokens.", list(s.itl))
        metric("running_requests", "gauge", "Requests in the running batch.", engine.num_running)
        metric("waiting_requests", "gauge", "Requests waiting for a slot.", engine.num_waiting)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def serve(
    llm: Llama,
    host: str,
    port: int,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
) -> None:
    import uvicorn

    app = create_app(llm, model_name, api_key, max_batch, max_queue)
    uvicorn.run(app, host=host, port=port, log_level="info")
