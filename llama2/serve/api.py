"""An OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

POST /v1/chat/completions and /v1/completions (streamed as server-sent events in OpenAI's
chunk format, ending with `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus),
POST /tokenize and /detokenize. Every field is checked here, before a request reaches the
engine. Errors have OpenAI's shape {"error": {message, type, param, code}}: 401 without the
key when one is set (every path but /health and /metrics), 400 for a bad field or a too-long
prompt, 404 for an unknown model, 500 when the engine failed on the request, 503 when the queue
is full or the server is shutting down, 504 past the request's deadline. A streamed request
that fails midway ends with an `error` event instead of `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import signal
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..formats import DialogError, encode_chat, encode_infill, infill_ids
from ..generation import Completion, SamplingParams, TokenLogprob
from ..llm import Llama
from .engine import Engine, Failure, QueueFull, Unavailable
from .engine import Request as EngineRequest

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key (probes, scrapers)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, code), status_code=status)


def _error_body(status: int, message: str, param=None, code=None) -> dict:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        503: "server_overloaded",
        504: "timeout_error",
    }.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _field(body: dict, name: str, kind, default, check=None, what=""):
    """body[name] checked: of type `kind` (an int passes as a float; a bool is no number), and
    `check` holds; null or absent gives `default`."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = {float: "a number", int: "an integer", bool: "a boolean", str: "a string"}
        raise APIError(400, f"'{name}' must be {names.get(kind, kind.__name__)}", name)
    if kind is float and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' {what}", name)
    return value


# The request fields each path knows (OpenAI's documented ones that this server implements or
# checks, plus `model`); any other field is refused, so that a misspelt or unsupported option
# is not silently ignored. The openai client sends only the fields its caller gives.
_SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream"}
_SAMPLING_FIELDS |= {"stream_options", "stop", "seed", "user"}
_SAMPLING_FIELDS |= {"presence_penalty", "frequency_penalty", "logit_bias"}
KNOWN_FIELDS = {
    "/v1/chat/completions": _SAMPLING_FIELDS
    | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
    | {"tools", "functions", "tool_choice", "function_call", "response_format"},
    "/v1/completions": _SAMPLING_FIELDS | {"prompt", "suffix", "echo", "logprobs", "best_of"},
    "/tokenize": {"model", "prompt", "text", "add_special_tokens"},
    "/detokenize": {"model", "tokens"},
}


def _known_fields(body: dict, path: str) -> None:
    """400 naming the first field the path does not know."""
    known = KNOWN_FIELDS[path]
    for name in body:
        if name not in known:
            raise APIError(
                400,
                f"unrecognized request argument supplied: '{name}' ({path} takes "
                f"{', '.join(sorted(known))})",
                name,
                "unknown_field",
            )


def _unsupported(body: dict) -> None:
    """Fields of OpenAI's API this server does not implement: 400 unless left at no effect."""
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, float, 0.0, lambda v: -2 <= v <= 2, "must be in [-2, 2]"):
            raise APIError(400, f"'{name}' is not supported (only 0)", name)
    if _field(body, "logit_bias", dict, None):
        raise APIError(400, "'logit_bias' is not supported", "logit_bias")
    if _field(body, "best_of", int, 1, lambda v: v >= 1, "must be >= 1") != 1:
        raise APIError(400, "'best_of' is not supported (only 1)", "best_of")
    for name in ("tools", "functions", "tool_choice", "function_call", "response_format"):
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported", name)
    _field(body, "user", str, None)


def _sampling(body: dict, max_default: int, logprobs: int | None) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list)
        or not 1 <= len(stop) <= 16
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(400, "'stop' must be a string or a list of 1-16 non-empty strings", "stop")
    max_tokens = _field(body, "max_tokens", int, None, lambda v: v >= 1, "must be >= 1")
    if max_tokens is None:  # (the newer name, in chat)
        max_tokens = _field(
            body, "max_completion_tokens", int, max_default, lambda v: v >= 1, "must be >= 1"
        )
    lo, hi = SEED_RANGE
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_field(
            body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"
        ),
        top_p=_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        seed=_field(body, "seed", int, None, lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]"),
        stop=tuple(stop or ()),
        logprobs=logprobs,
    )


def _choice_seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: the request's + i (the library's rows), wrapped into the 64-bit range."""
    if seed is None:
        return None
    seed += i
    return seed - 2**64 if seed > SEED_RANGE[1] else seed


# The keys OpenAI's chat API takes on a message of each role we serve (its request schema).
# `name` is checked and not used (Llama 2's chat format has no speakers' names); an assistant
# message's `refusal` likewise; its tool, audio and annotations fields are refused unless
# empty, as the request's `tools` are (the openai client's model_dump() of an answer carries
# them as null, and an answer handed back must pass).
MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {
        *("role", "content", "name", "refusal"),
        *("tool_calls", "function_call", "audio", "annotations"),
    },
}


def _message_keys(m: dict, i: int) -> None:
    """400 naming the first key of messages[i] its role does not take, or an unsupported one
    that is set."""
    known = MESSAGE_KEYS[m["role"]]
    for name in m:
        if name not in known:
            raise APIError(
                400,
                f"unrecognized field of messages[{i}]: '{name}' (a {m['role']} message takes "
                f"{', '.join(sorted(known))})",
                f"messages[{i}].{name}",
                "unknown_field",
            )
    for name in ("name", "refusal"):
        if m.get(name) is not None and not isinstance(m[name], str):
            raise APIError(400, f"messages[{i}].{name} must be a string", f"messages[{i}].{name}")
    for name in ("tool_calls", "function_call", "audio", "annotations"):
        if m.get(name):  # (null or empty, as clients that echo a message send: no effect)
            raise APIError(400, f"messages[{i}].{name} is not supported", f"messages[{i}].{name}")


def _messages(body: dict) -> list[dict]:
    """The chat messages, each {'role', 'content': str}; content given as a list of text parts
    (OpenAI's other form) is joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in MESSAGE_KEYS:
            raise APIError(
                400, f"messages[{i}] must have a role: system, user or assistant", "messages"
            )
        _message_keys(m, i)
        content = m.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


class _Auth:
    """Bearer-key check before anything else (a plain ASGI middleware: it leaves the client's
    disconnect visible to the routes)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                msg = "missing or wrong API key (Authorization: Bearer ...)"
                await _error(401, msg, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _client_gone(request: Request) -> None:
    """Returns when the client hangs up (the body is read already: the next message the server
    gets is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    llm: Llama,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    prefill_chunk: int = 256,
    prefix_cache: bool = True,
    compile: bool = False,
    request_timeout: float | None = None,
    prefix_pool_blocks: int | None = None,
) -> FastAPI:
    if llm.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer")
    tok = llm.tokenizer
    engine = Engine(
        llm.model,
        tok,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        prefix_cache=prefix_cache,
        compile=compile,
        prefix_pool_blocks=prefix_pool_blocks,
    )
    max_n = min(16, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="llama2", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_Auth, api_key=api_key)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", code="internal")

    async def body_of(request: Request, path: str) -> dict:
        """The request's JSON object, its fields known to the path and its model ours."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        _known_fields(body, path)
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"the model '{model}' does not exist", "model", "model_not_found")
        return body

    def run(prompts, params, stop_ids, continuation: bool, stream: bool):
        """Submit one engine request per choice; return an asyncio queue of (index, kind, x)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):

            def emit(kind, value, i=i):
                if stream or kind != "token":  # (a whole answer needs only its end)
                    loop.call_soon_threadsafe(queue.put_nowait, (i, kind, value))

            reqs.append(EngineRequest(ids, p, stop_ids, emit, continuation, request_timeout))
        try:
            engine.submit(reqs)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}", code="queue_full") from None
        except Unavailable as e:
            raise APIError(503, str(e), code="unavailable") from None
        except ValueError as e:
            param = "prompt" if continuation else "messages"
            raise APIError(400, str(e), param, "context_length_exceeded") from None
        return queue, reqs

    def logprob_entry(info: TokenLogprob) -> dict:
        def item(i: int, lp: float) -> dict:
            piece = tok.id_to_piece(i).replace("\u2581", " ")
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return item(info.token_id, info.logprob) | {
            "top_logprobs": [item(i, lp) for i, lp in info.top]
        }

    def choices_params(body: dict, max_default: int, logprobs: int | None) -> list[SamplingParams]:
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= max_n, f"must be between 1 and {max_n}")
        base = _sampling(body, max_default, logprobs)
        return [
            SamplingParams(**{**vars(base), "seed": _choice_seed(base.seed, i)}) for i in range(n)
        ]

    def stream_flags(body: dict) -> tuple[bool, bool]:
        """(stream, include_usage), checked."""
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, None)
        for name in options or {}:
            if name != "include_usage":
                msg = f"unrecognized field of 'stream_options': '{name}' (it takes include_usage)"
                raise APIError(400, msg, "stream_options", "unknown_field")
        if options is not None and not stream:
            raise APIError(400, "'stream_options' needs 'stream': true", "stream_options")
        usage = _field(options or {}, "include_usage", bool, False)
        return stream, usage

    async def respond(request, body, prompts, params, stop_ids, continuation, kind: str):
        stream, include_usage = stream_flags(body)
        queue, reqs = run(prompts, params, stop_ids, continuation, stream)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        n = len(params)
        prompt_tokens = sum(len(p) for p in prompts)
        echo = body.get("prompt") if body.get("echo") else ""

        def usage(done: list[Completion]) -> dict:
            gen = sum(len(c.token_ids) for c in done)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": gen,
                "total_tokens": prompt_tokens + gen,
            }

        if not stream:
            done: list[Completion | None] = [None] * n
            gone = asyncio.ensure_future(_client_gone(request))
            try:
                while any(d is None for d in done):
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():  # the client hung up: free its slots now
                        get.cancel()
                        return PlainTextResponse("", status_code=499)
                    i, what, value = get.result()
                    if what == "error":
                        return _error(value.status, value.message, code=value.code)
                    if what == "done":
                        done[i] = value
            finally:
                gone.cancel()
                for r in reqs:  # (each is done by now, or is to stop)
                    r.cancelled.set()
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
                    choices.append(
                        {
                            "index": i,
                            "text": echo + c.text,
                            "logprobs": lp,
                            "finish_reason": c.finish_reason,
                        }
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
                for i in range(n):
                    if kind == "chat":
                        first = {"delta": {"role": "assistant", "content": ""}}
                    elif echo:
                        first = {"text": echo}
                    else:
                        continue
                    yield chunk([{"index": i, **first, "logprobs": None, "finish_reason": None}])
                while any(d is None for d in done):
                    i, what, value = await queue.get()
                    if what == "error":  # OpenAI's way: an error event, and no [DONE]
                        f: Failure = value
                        error = _error_body(f.status, f.message, None, f.code)
                        yield f"data: {json.dumps(error)}\n\n"
                        return
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
        body = await body_of(request, "/v1/chat/completions")
        _unsupported(body)
        messages = _messages(body)
        try:
            ids = encode_chat(tok, messages)
        except DialogError as e:
            raise APIError(400, str(e), "messages") from None
        logprobs = None
        if _field(body, "logprobs", bool, False):
            logprobs = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "must be 0..20")
        elif body.get("top_logprobs") is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        params = choices_params(body, llm.config.max_seq_len, logprobs)
        ids_n = [ids] * len(params)
        return await respond(request, body, ids_n, params, (tok.eos_id,), False, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, "/v1/completions")
        _unsupported(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        logprobs = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "must be 0..20")
        _field(body, "echo", bool, False)
        suffix = _field(body, "suffix", str, None)
        stop_ids: tuple[int, ...] = (tok.eos_id,)
        if suffix is not None:
            try:
                ids = encode_infill(tok, prompt, suffix)
                stop_ids += (infill_ids(tok)["eot"],)
            except ValueError as e:
                raise APIError(400, str(e), "suffix") from None
        else:
            ids = tok.encode(prompt, bos=True)
        params = choices_params(body, 16, logprobs)
        ids_n = [ids] * len(params)
        return await respond(request, body, ids_n, params, stop_ids, True, "text")

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
        s = engine.stats
        with s.lock:
            errors, last = s.engine_errors, s.last_error
        ok = engine.alive and not engine.stopping
        state = "ok" if ok else ("shutting_down" if engine.stopping else "engine_dead")
        body = {
            "status": state,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "engine_errors": errors,  # exceptions the engine caught and survived
            "last_error": last,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request, "/tokenize")
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        ids = tok.encode(text, bos=_field(body, "add_special_tokens", bool, True))
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request, "/detokenize")
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tok.vocab_size for i in ids
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

        def histogram(name: str, help_: str, h) -> None:
            lines.extend([f"# HELP llama2_{name} {help_}", f"# TYPE llama2_{name} histogram"])
            lines.extend(h.render(f"llama2_{name}"))

        with s.lock:
            metric("requests_total", "counter", "Requests received.", s.requests)
            metric("prompt_tokens_total", "counter", "Prompt tokens.", s.prompt_tokens)
            metric(
                "prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens taken from the prefix cache.",
                s.cached_prompt_tokens,
            )
            if engine.pool is not None:
                metric(
                    "prefix_pool_evictions_total",
                    "counter",
                    "Blocks evicted from the prefix pool.",
                    engine.pool.evictions,
                )
            metric("generation_tokens_total", "counter", "Generated tokens.", s.generated_tokens)
            metric(
                "failed_requests_total", "counter", "Requests ended by an error.", s.failed_requests
            )
            metric(
                "engine_errors_total", "counter", "Exceptions inside the engine.", s.engine_errors
            )
            histogram("time_to_first_token_seconds", "Time to the first token.", s.ttft)
            histogram("inter_token_latency_seconds", "Time between tokens.", s.itl)
            histogram("request_latency_seconds", "Time from submission to the end.", s.e2e)
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
    prefill_chunk: int = 256,
    prefix_cache: bool = True,
    compile: bool = False,
    request_timeout: float | None = None,
    shutdown_timeout: float = 30.0,
    prefix_pool_blocks: int | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C: then stop accepting connections, let running requests
    finish for up to `shutdown_timeout` seconds, fail what is left, and return (exit 0)."""
    import uvicorn

    app = create_app(
        llm,
        model_name,
        api_key,
        max_batch,
        max_queue,
        prefill_chunk,
        prefix_cache,
        compile,
        request_timeout,
        prefix_pool_blocks,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout
    )
    # uvicorn re-raises the signal that stopped it once it has shut down: handled here, so
    # that a graceful stop returns (exit status 0) instead of dying of the signal
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda sig, _: stopped.append(sig))
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
