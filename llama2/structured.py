"""Structured output: the sampled text follows a JSON Schema, is a JSON object, or follows a
GBNF grammar, enforced while sampling with xgrammar (an optional dependency: the `structured`
extra).

The tokenizer's vocabulary becomes xgrammar's tokenizer info once per tokenizer (each id's
bytes as they appear in text); a schema or grammar is compiled once (xgrammar caches what it
compiled) into a grammar that a `Constraint`, one per row, follows: before each draw the logits
of the tokens the grammar does not allow next are set to -inf, and the drawn token advances
it. EOS is allowed only where the grammar may end, and it ends the row. A row that reaches its
token budget first ends with finish reason "length" and text that is a prefix of a valid
answer.

xgrammar was chosen by measurement (benchmarks/structured.py --libraries): on Llama 2's
32,000-token vocabulary and a nested schema, computing a token's mask and advancing took 5 us
against llguidance's 12 and outlines-core's 24 (whose index also took 3.6 s to build, against
milliseconds), and it reads GBNF, the grammar syntax of llama.cpp's server.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .sampling import SamplingParams

ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object (extra properties allowed)
MAX_WHITESPACE = 20  # whitespace characters between JSON tokens, as llama.cpp's JSON grammar

# piece types of a SentencePiece model: 2 unknown, 3 control, 4 user-defined, 6 byte
_BYTE, _TEXTLESS = 6, (2, 3, 4)
_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ImportError(
            "structured output (json_schema, json_object, grammar) needs the xgrammar "
            "package: pip install 'llama2[structured]'"
        ) from None
    return xgrammar


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each id's bytes as they appear in decoded text: '▁' is a space, <0xNN> the byte NN.
    Control, unknown and user-defined pieces (BOS, EOS, Code Llama's infilling pieces) are
    empty: never allowed inside an answer (EOS is allowed where the grammar ends)."""
    out = []
    for piece, _, kind in tokenizer.pieces():
        if kind == _BYTE:
            out.append(bytes([int(piece[3:5], 16)]))
        elif kind in _TEXTLESS:
            out.append(b"")
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def compiler(tokenizer: Tokenizer):
    """The tokenizer's xgrammar GrammarCompiler (made once per tokenizer; it caches the
    grammars it compiles)."""
    xgr = _xgrammar()
    with _LOCK:
        if tokenizer not in _COMPILERS:
            info = xgr.TokenizerInfo(
                token_bytes(tokenizer),
                xgr.VocabType.RAW,
                vocab_size=tokenizer.vocab_size,
                stop_token_ids=[tokenizer.eos_id],
            )
            _COMPILERS[tokenizer] = xgr.GrammarCompiler(info)
        return _COMPILERS[tokenizer]


def wanted(params: SamplingParams) -> bool:
    """Whether the params ask for structured output."""
    return params.json_schema is not None or params.json_object or params.grammar is not None


_DATA_KEYS = {"enum", "const", "default", "examples"}  # values, not schemas


def bounded_strings(schema: object) -> object:
    """The schema with each length-bounded string (minLength/maxLength, no pattern or format)
    written as a pattern of as many characters. xgrammar lets a length-bounded string hold raw
    control characters, which JSON forbids (its issue #800), and its pattern strings do not;
    either way such a string holds no escapes, so this forbids nothing it could write."""
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else bounded_strings(v) for k, v in schema.items()}
    if (
        out.get("type") == "string"
        and ("minLength" in out or "maxLength" in out)
        and not {"pattern", "format"} & out.keys()
    ):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^.{{{low},{high}}}$"
    return out


def schema_text(schema: Mapping | str) -> str:
    """A JSON Schema given as a mapping or as JSON text, as JSON text (see bounded_strings)."""
    try:
        schema = json.loads(schema) if isinstance(schema, str) else schema
    except json.JSONDecodeError as e:
        raise ValueError(f"json_schema is not valid JSON: {e}") from None
    return json.dumps(bounded_strings(schema))


def _reason(e: Exception) -> str:
    """xgrammar's message without its log prefix ('[time] /path/file.cc:123: ')."""
    text = str(e).strip()
    return re.sub(r"^(\[[\d:]+\] )?\S+\.(cc|h):\d+: ", "", text).splitlines()[0]


def compile_grammar(tokenizer: Tokenizer, params: SamplingParams):
    """The params' schema or grammar compiled for the tokenizer (ValueError naming the field
    and why when it cannot be)."""
    xgr = compiler(tokenizer)
    try:
        if params.grammar is not None:
            return xgr.compile_grammar(params.grammar)
        # strict: the properties a schema does not list are not generated (unless its
        # additionalProperties says otherwise), so an answer ends where the schema does
        strict = not params.json_object
        text = ANY_OBJECT if params.json_object else schema_text(params.json_schema)
        return xgr.compile_json_schema(
            text, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE, strict_mode=strict
        )
    except RuntimeError as e:
        name = "grammar" if params.grammar is not None else "json_schema"
        raise ValueError(f"{name} cannot be compiled: {_reason(e)}") from None


class Constraint:
    """One row's structured output: `mask` the logits [V] before a draw, `accept` the drawn
    token (True once the grammar has ended, at EOS)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        xgr = _xgrammar()
        self.vocab_size = tokenizer.vocab_size
        self.matcher = xgr.GrammarMatcher(compile_grammar(tokenizer, params))
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of the tokens not allowed next to -inf, in place (ids past the
        tokenizer's vocabulary, a padded embedding's, are never allowed)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if logits.shape[-1] > self.vocab_size:
            logits[self.vocab_size :] = float("-inf")
        self._apply(logits[None, : self.vocab_size], self.bitmask.to(logits.device))

    def accept(self, token: int) -> bool:
        """Advance by the drawn token; whether the grammar has ended (the token was EOS)."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} was drawn against the grammar's mask")
        return self.matcher.is_terminated()


def constraint(tokenizer: Tokenizer, params: SamplingParams) -> Constraint | None:
    """A row's Constraint if its params ask for structured output, else None."""
    return Constraint(tokenizer, params) if wanted(params) else None
