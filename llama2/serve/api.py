"""An OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

POST /v1/chat/completions and /v1/completions (completions.py), GET /v1/models, /props (the
context and the sampling defaults, for clients such as the page), /health and /metrics
(status.py), POST /tokenize and /detokenize, and a chat page at / (its files, under web/, at
/web/). Every field is checked (validation.py) before a request reaches the engine. Errors have
OpenAI's shape {"error": {message, type, param, code}}: 401 without the key when one is set
(every path but /health, /metrics and the page's files: the page sends the key its user
types), 400 for a bad field or a too-long prompt, 404 for an unknown model, 500 when the
engine failed on the request, 503 when the queue is full or the server is shutting down, 504
past the request's deadline.
"""

from __future__ import annotations

import contextlib
import hmac
import signal
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..llm import Llama
from . import completions, status
from .completions import Served, read_body
from .engine import Engine
from .errors import APIError, error_response
from .validation import choices_params, field, prompt_text, token_ids

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # (stop the server gracefully)
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key (probes, scrapers)
MAX_CHOICES = 16  # `n` at most (and never more than the queue holds)
WEB_DIR = Path(__file__).parent / "web"  # the chat page: index.html and the files it loads
# The page runs its own code only (model output reaches it as text: see web/markdown.js), is
# framed by no other site, and is revalidated at each load
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class _Auth:
    """Bearer-key check before anything else (a plain ASGI middleware: it leaves the client's
    disconnect visible to the routes)."""

    def __init__(self, app, api_key: str, web: bool):
        self.app, self.expected, self.web = app, f"Bearer {api_key}".encode(), web

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or self.web and (path == "/" or path.startswith("/web/"))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._open(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                msg = "missing or wrong API key (Authorization: Bearer ...)"
                await error_response(401, msg, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _PageFiles(StaticFiles):
    """The page's files, with its headers (so that a browser never runs an older script with a
    newer page)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def _api_error(_: Request, e: APIError):
    return error_response(e.status, e.message, e.param, e.code)


async def _internal_error(_: Request, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}: {e}", code="internal")


async def models(request: Request) -> dict:
    served: Served = request.app.state.served
    model = {"id": served.name, "object": "model", "created": served.created, "owned_by": "llama2"}
    return {"object": "list", "data": [model]}


async def props(request: Request) -> dict:
    """The served model's name and context, and what a chat request gets for each sampling
    field it leaves out (max_tokens: up to the end of the context)."""
    served: Served = request.app.state.served
    context = served.llm.config.max_seq_len
    default = choices_params({}, context, None, 1)[0]
    defaults = {"temperature": default.temperature, "top_p": default.top_p}
    return {
        "model": served.name,
        "max_model_len": context,
        "defaults": defaults | {"max_tokens": default.max_new_tokens},
    }


async def page(_: Request) -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)


async def tokenize(request: Request) -> dict:
    body = await read_body(request, "/tokenize")
    llm: Llama = request.app.state.served.llm
    text = prompt_text(body, "prompt", "text")
    ids = llm.tokenizer.encode(text, bos=field(body, "add_special_tokens", bool, True))
    return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len}


async def detokenize(request: Request) -> dict:
    body = await read_body(request, "/detokenize")
    tok = request.app.state.served.llm.tokenizer
    return {"prompt": tok.decode(token_ids(body, tok.vocab_size))}


def create_app(
    llm: Llama,
    model_name: str,
    api_key: str | None = None,
    request_timeout: float | None = None,
    web: bool = True,
    **engine_options,
) -> FastAPI:
    """The app serving `llm` as `model_name`, on an Engine made with `engine_options`
    (max_batch, max_queue, prefill_chunk, prefix_cache, compile, prefix_pool_blocks, draft,
    draft_tokens, thread).
    `request_timeout`: seconds from submission after which a request is ended (504). `web`:
    answer / with the chat page (else / is 404)."""
    if llm.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer")
    engine = Engine(llm.model, llm.tokenizer, **engine_options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="llama2", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    max_n = min(MAX_CHOICES, engine.max_queue)
    app.state.served = Served(llm, model_name, engine, request_timeout, max_n, int(time.time()))
    if api_key:
        app.add_middleware(_Auth, api_key=api_key, web=web)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _internal_error)
    app.post("/v1/chat/completions")(completions.chat_completions)
    app.post("/v1/completions")(completions.completions)
    app.get("/v1/models")(models)
    app.get("/props")(props)
    app.get("/health")(status.health)
    app.get("/metrics")(status.metrics)
    app.post("/tokenize")(tokenize)
    app.post("/detokenize")(detokenize)
    if web:
        app.get("/", include_in_schema=False)(page)
        app.mount("/web", _PageFiles(directory=WEB_DIR), name="web")
    return app


def serve(
    llm: Llama, host: str, port: int, model_name: str, *, shutdown_timeout: float = 30.0, **options
) -> None:
    """Serve create_app(llm, model_name, **options) until SIGTERM or Ctrl-C: then stop
    accepting connections, let running requests finish for up to `shutdown_timeout` seconds,
    fail what is left, and return (exit 0)."""
    import uvicorn

    app = create_app(llm, model_name, thread=False, **options)
    engine: Engine = app.state.engine
    # every width's compiled graph before the first request, in the thread that steps
    engine.warm_up(lambda line: print(line, file=sys.stderr, flush=True))
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout
    )
    server = uvicorn.Server(config)

    def http() -> None:
        try:
            server.run()
        finally:  # stopped, or never started (the port taken): the engine's loop ends too
            engine.shutdown()

    # The engine's loop runs in the main thread and the HTTP server in another. The OpenMP
    # threads of a compiled step spin between its parallel regions only while the process has
    # no more of them than CPUs; a team in a thread other than the main one adds to the main
    # thread's and, on 2 cores, makes them sleep and wake in every region (~160 context
    # switches a step: 12.4 ms against 9.1 for tiny-110m on an AMD EPYC).
    # uvicorn listens for signals only in the main thread: here, where they stop it gracefully
    # (a second Ctrl-C at once), and the process exits 0.
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in HANDLED_SIGNALS}
    thread = threading.Thread(target=http, name="llama2-http")
    try:
        thread.start()
        engine.run()
    finally:
        server.should_exit = True
        thread.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(1)
