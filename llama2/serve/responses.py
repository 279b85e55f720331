"""OpenAI's response bodies and server-sent-event chunks for chat and text completions.

The two APIs differ only in where a choice's text goes and how its log-probabilities are laid
out; each is a `Shape`, and `Reply` builds either's bodies from one. A text completion's
log-probabilities are OpenAI's legacy layout (tokens, token_logprobs, top_logprobs,
text_offset); with echo, the prompt's tokens come first (the first one's logprob and top
logprobs null), as vLLM lays them out.
"""

from __future__ import annotations

import json
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..generation import Completion, TokenLogprob
from ..tokenizer import Tokenizer
from .echo import EchoCompletion
from .errors import error_body
from .failures import Failure


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
    text_offsets: bool  # a choice's log-probabilities say where each token's text begins


def _text_logprobs(entries: list[dict]) -> dict:
    def top(e: dict) -> dict | None:
        return (
            None
            if e["top_logprobs"] is None
            else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
        )

    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [top(e) for e in entries],
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
    text_offsets=False,
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
    text_offsets=True,
)


def logprob_entry(tok: Tokenizer, info: TokenLogprob) -> dict:
    """A token's log-probability and its top alternatives, as OpenAI's chat lays them out."""

    def item(i: int, lp: float | None) -> dict:
        piece = tok.id_to_piece(i).replace("\u2581", " ")
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return item(info.token_id, info.logprob) | {"top_logprobs": [item(i, lp) for i, lp in info.top]}


def first_entry(tok: Tokenizer, token: int) -> dict:
    """The prompt's first token, which nothing predicts: no log-probabilities."""
    return logprob_entry(tok, TokenLogprob(token, None)) | {"top_logprobs": None}


def text_offsets(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
    """Where each token's text begins in the text of `ids` (in characters; one decode)."""
    decoded = tok.sp.decode_ids_as_proto([int(i) for i in ids])
    ends, n = [], 0  # the byte offset at which each character ends
    for ch in decoded.text:
        n += len(ch.encode())
        ends.append(n)
    return [bisect_right(ends, piece.begin) for piece in decoded.pieces]


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
    echo: str | Sequence[str] = ""  # the prompt (each choice's), to put before the answer
    include_usage: bool = False  # a stream's last chunk counts the tokens
    prompts: Sequence[Sequence[int]] = ()  # each choice's prompt ids (for text offsets)
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

    def _echo(self, i: int) -> str:
        return self.echo if isinstance(self.echo, str) else self.echo[i]

    def _logprobs(self, i: int, c: Completion) -> dict:
        """Choice i's log-probabilities: its prompt's (when asked for), then its tokens'."""
        tok, prompt = self.tokenizer, list(self.prompts[i]) if self.prompts else []
        entries = [logprob_entry(tok, x) for x in c.logprobs]
        ids = [x.token_id for x in c.logprobs]
        scored = isinstance(c, EchoCompletion) and c.prompt_entries
        if scored:
            first, *rest = c.prompt_entries
            entries = (
                [first_entry(tok, prompt[0])] + [logprob_entry(tok, x) for x in rest] + entries
            )
        lp = self.shape.logprobs(entries)
        if self.shape.text_offsets:
            # offsets in the text of the prompt's ids and these, which the answer's text is
            # (the echo, or the continuation of a text of the prompt's length)
            offsets = text_offsets(tok, prompt + ids)
            start = 0 if scored else len(tok.decode(prompt)) - len(self._echo(i))
            end = len(self._echo(i) + c.text)
            offsets = offsets[len(offsets) - len(entries) :]
            lp["text_offset"] = [min(max(o - start, 0), end) for o in offsets]
        return lp

    def whole(self, done: list[Completion]) -> dict:
        """The answer's body, every choice done."""
        choices = []
        for i, c in enumerate(done):
            lp = None if c.logprobs is None else self._logprobs(i, c)
            text = self._echo(i) + c.text
            choices.append(_choice(i, self.shape.answer(text), lp, c.finish_reason))
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
        first = self.shape.opening(self._echo(i))
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
