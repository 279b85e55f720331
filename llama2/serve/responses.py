"""OpenAI's response bodies and server-sent-event chunks for chat and text completions.

The two APIs differ only in where a choice's text goes and how its log-probabilities are laid
out; each is a `Shape`, and `Reply` builds either's bodies from one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..generation import Completion, TokenLogprob
from ..tokenizer import Tokenizer
from .engine import Failure
from .errors import error_body


@dataclass(frozen=True)
class Shape:
    """How one of the two APIs lays out an answer, whole and streamed."""

    id_prefix: str
    object: str
    prompt_param: str  # the field blamed for a prompt longer than the context
    continuation: bool  # the answer continues the prompt's text (see engine.Request)
    answer: Callable[[str], dict]  # a whole choice's text
    opening: Callable[[str], dict | None]  # a stream's first piece of a choice, given the echo
    piece: Callable[[str], dict]  # a streamed piece of text
    closing: dict  # the streamed piece that carries the finish reason
    logprobs: Callable[[list[dict]], dict]  # a choice's log-probabilities from their entries
    streams_logprobs: bool  # the stream's pieces carry theirs


def _text_logprobs(entries: list[dict]) -> dict:
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }


CHAT = Shape(
    id_prefix="chatcmpl",
    object="chat.completion",
    prompt_param="messages",
    continuation=False,
    answer=lambda text: {"message": {"role": "assistant", "content": text}},
    opening=lambda _: {"delta": {"role": "assistant", "content": ""}},
    piece=lambda text: {"delta": {"content": text}},
    closing={"delta": {}},
    logprobs=lambda entries: {"content": entries},
    streams_logprobs=True,
)
TEXT = Shape(
    id_prefix="cmpl",
    object="text_completion",
    prompt_param="prompt",
    continuation=True,
    answer=lambda text: {"text": text},
    opening=lambda echo: {"text": echo} if echo else None,
    piece=lambda text: {"text": text},
    closing={"text": ""},
    logprobs=_text_logprobs,
    streams_logprobs=False,
)


def logprob_entry(tok: Tokenizer, info: TokenLogprob) -> dict:
    """A token's log-probability and its top alternatives, as OpenAI's chat lays them out."""

    def item(i: int, lp: float) -> dict:
        piece = tok.id_to_piece(i).replace("\u2581", " ")
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return item(info.token_id, info.logprob) | {"top_logprobs": [item(i, lp) for i, lp in info.top]}


def error_event(f: Failure) -> str:
    """A stream's end when its request failed: OpenAI's error event, and no [DONE]."""
    return f"data: {json.dumps(error_body(f.status, f.message, code=f.code))}\n\n"


def _choice(i: int, content: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": i, **content, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class Reply:
    """The bodies of one request's answer, whole or streamed."""

    shape: Shape
    model: str
    tokenizer: Tokenizer
    prompt_tokens: int  # over all choices
    echo: str = ""  # the prompt, when the request asked for it before the answer
    include_usage: bool = False  # a stream's last chunk counts the tokens
    id: str = field(init=False)

    def __post_init__(self):
        self.id = f"{self.shape.id_prefix}-{uuid.uuid4().hex[:24]}"

    def usage(self, done: list[Completion]) -> dict:
        generated = sum(len(c.token_ids) for c in done)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": self.prompt_tokens + generated,
        }

    def whole(self, done: list[Completion]) -> dict:
        """The answer's body, every choice done."""
        choices = []
        for i, c in enumerate(done):
            lp = None
            if c.logprobs is not None:
                lp = self.shape.logprobs([logprob_entry(self.tokenizer, x) for x in c.logprobs])
            choices.append(_choice(i, self.shape.answer(self.echo + c.text), lp, c.finish_reason))
        return {
            "id": self.id,
            "object": self.shape.object,
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": self.usage(done),
        }

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        data = {
            "id": self.id,
            "object": f"{self.shape.object}.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def opening(self, i: int) -> str | None:
        """Choice i's first chunk, before any token (None where the shape has none)."""
        first = self.shape.opening(self.echo)
        return None if first is None else self.chunk([_choice(i, first, None, None)])

    def piece(self, i: int, text: str, info: TokenLogprob | None) -> str:
        lp = None
        if info is not None and self.shape.streams_logprobs:
            lp = self.shape.logprobs([logprob_entry(self.tokenizer, info)])
        return self.chunk([_choice(i, self.shape.piece(text), lp, None)])

    def closing(self, i: int, c: Completion) -> str:
        return self.chunk([_choice(i, self.shape.closing, None, c.finish_reason)])

    def ending(self, done: list[Completion]) -> list[str]:
        """The stream's last events, every choice done."""
        usage = [self.chunk([], self.usage(done))] if self.include_usage else []
        return usage + ["data: [DONE]\n\n"]
