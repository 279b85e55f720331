"""POST /v1/chat/completions and /v1/completions: a request checked, one engine request per
choice submitted, and the answer sent whole or streamed as server-sent events (ending with
`data: [DONE]`, or with an `error` event when the request fails midway). A client that hangs up
frees its slots at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..formats import DialogError, encode_chat, encode_infill, infill_ids
from ..generation import Completion, SamplingParams
from ..llm import Llama
from .engine import Engine, QueueFull, Unavailable
from .engine import Request as EngineRequest
from .errors import APIError, error_response
from .responses import CHAT, TEXT, Reply, Shape, error_event
from .validation import (
    chat_logprobs,
    choices_params,
    field,
    messages,
    parse_body,
    prompt_text,
    stream_flags,
    top_logprobs,
    unsupported,
)

TEXT_MAX_TOKENS = 16  # OpenAI's default for a text completion; chat's is the context


@dataclass(frozen=True)
class Served:
    """What the routes serve: the model under its name, its engine, and the request limits."""

    llm: Llama
    name: str
    engine: Engine
    request_timeout: float | None  # seconds; past it a request is ended (504)
    max_n: int  # choices per request: never more than the queue can hold
    created: int  # when the model was loaded (Unix time, for /v1/models)


async def read_body(request: Request, path: str) -> dict:
    """The request's checked JSON body (see validation.parse_body)."""
    return parse_body(await request.body(), path, request.app.state.served.name)


async def chat_completions(request: Request) -> Response:
    body = await read_body(request, "/v1/chat/completions")
    served: Served = request.app.state.served
    tok = served.llm.tokenizer
    unsupported(body)
    dialog = messages(body)
    try:
        ids = encode_chat(tok, dialog)
    except DialogError as e:
        raise APIError(400, str(e), "messages") from None
    logprobs = chat_logprobs(body)
    params = choices_params(body, served.llm.config.max_seq_len, logprobs, served.max_n)
    return await respond(request, CHAT, body, ids, params, (tok.eos_id,))


async def completions(request: Request) -> Response:
    body = await read_body(request, "/v1/completions")
    served: Served = request.app.state.served
    tok = served.llm.tokenizer
    unsupported(body)
    prompt = prompt_text(body, "prompt")
    logprobs = top_logprobs(body, "logprobs", None)
    echo = prompt if field(body, "echo", bool, False) else ""
    suffix = field(body, "suffix", str, None)
    stop_ids: tuple[int, ...] = (tok.eos_id,)
    if suffix is not None:
        try:
            ids = encode_infill(tok, prompt, suffix)
            stop_ids += (infill_ids(tok)["eot"],)
        except ValueError as e:
            raise APIError(400, str(e), "suffix") from None
    else:
        ids = tok.encode(prompt, bos=True)
    params = choices_params(body, TEXT_MAX_TOKENS, logprobs, served.max_n)
    return await respond(request, TEXT, body, ids, params, stop_ids, echo)


async def respond(
    request: Request,
    shape: Shape,
    body: dict,
    prompt: list[int],
    params: list[SamplingParams],
    stop_ids: Sequence[int],
    echo: str = "",
) -> Response:
    """Submit one engine request per choice and answer in the request's way."""
    served: Served = request.app.state.served
    stream, include_usage = stream_flags(body)
    queue, reqs = submit(served, shape, prompt, params, stop_ids, stream)
    tok, n_tokens = served.llm.tokenizer, len(prompt) * len(params)
    reply = Reply(shape, served.name, tok, n_tokens, echo, include_usage)
    if stream:
        return StreamingResponse(events(queue, reqs, reply), media_type="text/event-stream")
    return await whole(request, queue, reqs, reply)


def submit(
    served: Served,
    shape: Shape,
    prompt: list[int],
    params: list[SamplingParams],
    stop_ids: Sequence[int],
    stream: bool,
) -> tuple[asyncio.Queue, list[EngineRequest]]:
    """Submit one engine request per choice, all or none; the queue receives (choice, kind,
    value) from the engine's thread: kind "token" (only when streaming: a whole answer needs
    only its end), "done" or "error"."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reqs = []
    for i, p in enumerate(params):

        def emit(kind: str, value: object, i: int = i) -> None:
            if stream or kind != "token":
                loop.call_soon_threadsafe(queue.put_nowait, (i, kind, value))

        timeout = served.request_timeout
        reqs.append(EngineRequest(prompt, p, stop_ids, emit, shape.continuation, timeout))
    try:
        served.engine.submit(reqs)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}", code="queue_full") from None
    except Unavailable as e:
        raise APIError(503, str(e), code="unavailable") from None
    except ValueError as e:
        raise APIError(400, str(e), shape.prompt_param, "context_length_exceeded") from None
    return queue, reqs


def _cancel(reqs: list[EngineRequest]) -> None:
    """Free the requests' slots now (each is done already, or is to stop)."""
    for r in reqs:
        r.cancelled.set()


async def _client_gone(request: Request) -> None:
    """Returns when the client hangs up (the body is read already: the next message the server
    gets is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def whole(
    request: Request, queue: asyncio.Queue, reqs: list[EngineRequest], reply: Reply
) -> Response:
    """The whole answer once every choice is done; 499 and the slots freed if the client hangs
    up first."""
    done: list[Completion | None] = [None] * len(reqs)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        while any(d is None for d in done):
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return PlainTextResponse("", status_code=499)
            i, kind, value = get.result()
            if kind == "error":
                return error_response(value.status, value.message, code=value.code)
            if kind == "done":
                done[i] = value
    finally:
        gone.cancel()
        _cancel(reqs)
    return JSONResponse(reply.whole(done))


async def events(
    queue: asyncio.Queue, reqs: list[EngineRequest], reply: Reply
) -> AsyncIterator[str]:
    """The answer's server-sent events, piece by piece; the slots are freed when the stream
    ends, whether it finished or the client went away."""
    done: list[Completion | None] = [None] * len(reqs)
    try:
        for i in range(len(reqs)):
            if (opening := reply.opening(i)) is not None:
                yield opening
        while any(d is None for d in done):
            i, kind, value = await queue.get()
            if kind == "error":
                yield error_event(value)
                return
            if kind == "done":
                done[i] = value
                yield reply.closing(i, value)
            else:
                yield reply.piece(i, *value)
        for event in reply.ending(done):
            yield event
    finally:
        _cancel(reqs)
