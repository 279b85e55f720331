"""POST /v1/chat/completions and /v1/completions: a request checked, one engine request per
choice submitted, and the answer sent whole or streamed as server-sent events (ending with
`data: [DONE]`, or with an `error` event when the request fails midway). A client that hangs up
frees its slots at once."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..formats import DialogError, encode_chat, encode_infill, infill_ids
from ..generation import Completion, SamplingParams
from ..llm import Llama
from .engine import Engine, QueueFull, Unavailable
from .engine import Request as EngineRequest
from .errors import APIError, error_response
from .mailbox import Mailbox
from .responses import CHAT, TEXT, Reply, Shape, error_event
from .validation import (
    chat_logprobs,
    check_structure,
    choices_params,
    completion_prompt,
    field,
    messages,
    parse_body,
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
    # the engine thread's events to the event loop
    mailbox: Mailbox = dataclasses.field(default_factory=Mailbox)


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
    await asyncio.to_thread(check_structure, body, params[0], tok)  # (compiling takes a while)
    return await respond(request, CHAT, body, [ids], params, (tok.eos_id,))


async def completions(request: Request) -> Response:
    body = await read_body(request, "/v1/completions")
    served: Served = request.app.state.served
    tok = served.llm.tokenizer
    unsupported(body)
    prompt = completion_prompt(body, tok.vocab_size, served.engine.max_queue)
    logprobs = top_logprobs(body, "logprobs", None)
    echo = field(body, "echo", bool, False)
    suffix = field(body, "suffix", str, None)
    stop_ids: tuple[int, ...] = (tok.eos_id,)
    if not isinstance(prompt, str):  # token ids, as they are (no BOS added)
        if suffix is not None:
            raise APIError(400, "'suffix' needs a text prompt", "suffix")
        ids, texts = prompt, [tok.decode(p) for p in prompt]
    elif suffix is not None:
        try:
            ids, texts = [encode_infill(tok, prompt, suffix)], [prompt]
            stop_ids += (infill_ids(tok)["eot"],)
        except ValueError as e:
            raise APIError(400, str(e), "suffix") from None
    else:
        ids, texts = [tok.encode(prompt, bos=True)], [prompt]
    params = choices_params(body, TEXT_MAX_TOKENS, logprobs, served.max_n, echo)
    await asyncio.to_thread(check_structure, body, params[0], tok)
    if len(ids) * len(params) > served.engine.max_queue:
        msg = f"{len(ids)} prompts of {len(params)} choices: at most {served.engine.max_queue}"
        raise APIError(400, msg, "prompt")
    # the prompt's logprobs with echo and logprobs, in a whole answer (streamed text answers
    # carry no logprobs: see responses.TEXT)
    scored = echo and logprobs is not None and not stream_flags(body)[0]
    params = [replace(p, echo=scored) for p in params]
    return await respond(request, TEXT, body, ids, params, stop_ids, texts if echo else None)


async def respond(
    request: Request,
    shape: Shape,
    body: dict,
    prompts: list[list[int]],
    params: list[SamplingParams],
    stop_ids: Sequence[int],
    echo: list[str] | None = None,
) -> Response:
    """Submit one engine request per choice (each prompt's `params`, in turn) and answer in the
    request's way; `echo`: each prompt's text, to put before its answers."""
    served: Served = request.app.state.served
    stream, include_usage = stream_flags(body)
    choices = [(p, q) for p in prompts for q in params]
    queue, reqs = submit(served, shape, choices, stop_ids, stream)
    tok, n_tokens = served.llm.tokenizer, sum(map(len, prompts)) * len(params)
    texts = "" if echo is None else [e for e in echo for _ in params]
    reply = Reply(shape, served.name, tok, n_tokens, texts, include_usage, [p for p, _ in choices])
    if stream:
        return StreamingResponse(events(queue, reqs, reply), media_type="text/event-stream")
    return await whole(request, queue, reqs, reply)


def submit(
    served: Served,
    shape: Shape,
    choices: list[tuple[list[int], SamplingParams]],
    stop_ids: Sequence[int],
    stream: bool,
) -> tuple[asyncio.Queue, list[EngineRequest]]:
    """Submit one engine request per choice (its prompt and parameters), all or none; the
    queue receives (choice, kind, value) from the engine's thread: kind "token" (only when
    streaming: a whole answer needs only its end), "done" or "error"."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reqs = []
    for i, (prompt, p) in enumerate(choices):

        def emit(kind: str, value: object, i: int = i) -> None:
            if stream or kind != "token":
                served.mailbox.put(loop, queue, (i, kind, value))

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
