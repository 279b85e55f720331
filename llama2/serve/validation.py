"""Every request field checked before a request reaches the engine: pure functions of the JSON
body that return what the field means or raise APIError (400, naming the field)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from ..generation import SamplingParams
from .errors import APIError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # top log-probabilities per token, as OpenAI allows

# The request fields each path knows (OpenAI's documented ones that this server implements or
# checks, plus `model`); any other field is refused, so that a misspelt or unsupported option
# is not silently ignored. The openai client sends only the fields its caller gives.
_SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream"}
_SAMPLING_FIELDS |= {"stream_options", "stop", "seed", "user"}
_SAMPLING_FIELDS |= {"presence_penalty", "frequency_penalty", "logit_bias"}
_SAMPLING_FIELDS |= {"response_format", "grammar"}  # structured output (see `structure`)
_UNSUPPORTED_CHAT = ("tools", "functions", "tool_choice", "function_call")
KNOWN_FIELDS = {
    "/v1/chat/completions": _SAMPLING_FIELDS
    | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", *_UNSUPPORTED_CHAT},
    "/v1/completions": _SAMPLING_FIELDS | {"prompt", "suffix", "echo", "logprobs", "best_of"},
    "/tokenize": {"model", "prompt", "text", "add_special_tokens"},
    "/detokenize": {"model", "tokens"},
}

# The keys OpenAI's chat API takes on a message of each role we serve (its request schema).
# `name` is checked and not used (Llama 2's chat format has no speakers' names); an assistant
# message's `refusal` likewise; its tool, audio and annotations fields are refused unless
# empty, as the request's `tools` are (the openai client's model_dump() of an answer carries
# them as null, and an answer handed back must pass).
_UNSUPPORTED_MESSAGE = ("tool_calls", "function_call", "audio", "annotations")
MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "refusal", *_UNSUPPORTED_MESSAGE},
}

_TYPE_NAMES = {float: "a number", int: "an integer", bool: "a boolean", str: "a string"}


def field(
    body: dict,
    name: str,
    kind: type,
    default: object,
    check: Callable[[object], bool] | None = None,
    what: str = "",
):
    """body[name] checked: of type `kind` (an int passes as a float; a bool is no number), and
    `check` holds (else 400: "'name' `what`"); null or absent gives `default`."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise APIError(400, f"'{name}' must be {_TYPE_NAMES.get(kind, kind.__name__)}", name)
    if kind is float and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' {what}", name)
    return value


def parse_body(raw: bytes, path: str, model_name: str) -> dict:
    """The request's JSON object, its fields known to the path and its model (if named) ours."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
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
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist", "model", "model_not_found")
    return body


def unsupported(body: dict) -> None:
    """Fields of OpenAI's API this server does not implement: 400 unless left at no effect."""
    for name in ("presence_penalty", "frequency_penalty"):
        if field(body, name, float, 0.0, lambda v: -2 <= v <= 2, "must be in [-2, 2]"):
            raise APIError(400, f"'{name}' is not supported (only 0)", name)
    if field(body, "logit_bias", dict, None):
        raise APIError(400, "'logit_bias' is not supported", "logit_bias")
    if field(body, "best_of", int, 1, lambda v: v >= 1, "must be >= 1") != 1:
        raise APIError(400, "'best_of' is not supported (only 1)", "best_of")
    for name in _UNSUPPORTED_CHAT:
        if body.get(name) is not None:
            raise APIError(400, f"'{name}' is not supported", name)
    field(body, "user", str, None)


def _sampling(body: dict, max_default: int, logprobs: int | None, echo: bool) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list)
        or not 1 <= len(stop) <= 16
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(400, "'stop' must be a string or a list of 1-16 non-empty strings", "stop")
    positive = (lambda v: v >= 1, "must be >= 1")
    # (with echo, 0 asks for the prompt alone: to score it)
    at_least = (lambda v: v >= 0, "must be >= 0") if echo else positive
    max_tokens = field(body, "max_tokens", int, None, *at_least)
    if max_tokens is None:  # (the newer name, in chat)
        max_tokens = field(body, "max_completion_tokens", int, max_default, *positive)
    lo, hi = SEED_RANGE
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=field(
            body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"
        ),
        top_p=field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        seed=field(body, "seed", int, None, lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]"),
        stop=tuple(stop or ()),
        logprobs=logprobs,
        echo=echo,
        **structure(body),
    )


# the keys of each response_format type, and of its json_schema (OpenAI's request schema)
FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def _keys(value: dict, known: set[str], where: str) -> None:
    for name in value:
        if name not in known:
            msg = f"unrecognized field of '{where}': '{name}' (it takes {', '.join(sorted(known))})"
            raise APIError(400, msg, where, "unknown_field")


def structure(body: dict) -> dict:
    """Structured output: OpenAI's `response_format` ({"type": "text"}, {"type":
    "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict",
    "description"}}) or llama.cpp's `grammar` (GBNF), as SamplingParams' fields. Whether the
    schema or grammar compiles is `check_structure`'s."""
    fmt = field(body, "response_format", dict, None)
    grammar = field(body, "grammar", str, None, lambda v: bool(v.strip()), "must not be empty")
    if fmt is None or fmt.get("type") == "text" and len(fmt) == 1:
        return {} if grammar is None else {"grammar": grammar}
    if grammar is not None:
        raise APIError(400, "give 'response_format' or 'grammar', not both", "grammar")
    kind = fmt.get("type")
    if kind not in FORMAT_KEYS:
        msg = "'response_format.type' must be text, json_object or json_schema"
        raise APIError(400, msg, "response_format")
    _keys(fmt, FORMAT_KEYS[kind], "response_format")
    if kind == "json_object":
        return {"json_object": True}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError(400, "'response_format.json_schema' must be an object", "response_format")
    _keys(spec, JSON_SCHEMA_KEYS, "response_format.json_schema")
    where = "response_format.json_schema"
    try:
        field(spec, "name", str, None, lambda v: 0 < len(v) <= 64, "must be 1-64 characters")
        field(spec, "description", str, None)
        field(spec, "strict", bool, None)  # (answers follow the schema either way)
    except APIError as e:
        raise APIError(400, f"{where}: {e.message}", f"{where}.{e.param}") from None
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
        raise APIError(400, f"'{where}' needs a 'name' and a 'schema' (an object)", where)
    return {"json_schema": spec["schema"]}


def check_structure(body: dict, params: SamplingParams, tokenizer) -> None:
    """400 when the request's schema or grammar cannot be compiled, naming it and why."""
    from ..structured import compile_grammar, wanted

    if not wanted(params):
        return
    where = "grammar" if params.grammar is not None else "response_format"
    try:
        compile_grammar(tokenizer, params)
    except ImportError as e:
        raise APIError(400, f"structured output is not available here: {e}", where) from None
    except ValueError as e:
        what = "the grammar"
        if params.json_schema is not None:
            what = f"the JSON schema '{body['response_format']['json_schema']['name']}'"
        reason = str(e).split(": ", 1)[-1]
        raise APIError(400, f"{what} cannot be used: {reason}", where) from None


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: the request's + i (the library's rows), wrapped into the 64-bit range."""
    if seed is None:
        return None
    seed += i
    return seed - 2**64 if seed > SEED_RANGE[1] else seed


def choices_params(
    body: dict, max_default: int, logprobs: int | None, max_n: int, echo: bool = False
) -> list[SamplingParams]:
    """The sampling parameters of each of the request's `n` choices (at most `max_n`). `echo`:
    the answer begins with the prompt, whose logprobs are asked for too (SamplingParams.echo),
    and max_tokens may be 0 (the prompt alone)."""
    n = field(body, "n", int, 1, lambda v: 1 <= v <= max_n, f"must be between 1 and {max_n}")
    base = _sampling(body, max_default, logprobs, echo)
    return [SamplingParams(**{**vars(base), "seed": choice_seed(base.seed, i)}) for i in range(n)]


def top_logprobs(body: dict, name: str, default: int | None) -> int | None:
    """A count of top log-probabilities, 0..MAX_LOGPROBS."""
    in_range = (lambda v: 0 <= v <= MAX_LOGPROBS, f"must be 0..{MAX_LOGPROBS}")
    return field(body, name, int, default, *in_range)


def chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs: true` with `top_logprobs`: how many top log-probabilities per token,
    or None for none."""
    if field(body, "logprobs", bool, False):
        return top_logprobs(body, "top_logprobs", 0)
    if body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return None


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage), checked."""
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, None)
    for name in options or {}:
        if name != "include_usage":
            msg = f"unrecognized field of 'stream_options': '{name}' (it takes include_usage)"
            raise APIError(400, msg, "stream_options", "unknown_field")
    if options is not None and not stream:
        raise APIError(400, "'stream_options' needs 'stream': true", "stream_options")
    return stream, field(options or {}, "include_usage", bool, False)


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
    for name in _UNSUPPORTED_MESSAGE:
        if m.get(name):  # (null or empty, as clients that echo a message send: no effect)
            raise APIError(400, f"messages[{i}].{name} is not supported", f"messages[{i}].{name}")


def messages(body: dict) -> list[dict]:
    """The chat messages, each {'role', 'content': str}; content given as a list of text parts
    (OpenAI's other form) is joined."""
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise APIError(400, "'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(given):
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


def prompt_text(body: dict, *names: str) -> str:
    """The prompt, a string (under the first of `names` that is set)."""
    text = next((body[n] for n in names if n in body), None)
    if not isinstance(text, str):
        raise APIError(400, "'prompt' must be a string", "prompt")
    return text


def _ids(value: object, vocab_size: int) -> bool:
    """Whether `value` is a list of token ids in the vocabulary."""
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value
    )


def token_ids(body: dict, vocab_size: int) -> list[int]:
    """`tokens`: a list of ids in the vocabulary."""
    ids = body.get("tokens")
    if not _ids(ids, vocab_size):
        raise APIError(400, "'tokens' must be a list of token ids", "tokens")
    return ids


def completion_prompt(body: dict, vocab_size: int, max_prompts: int) -> str | list[list[int]]:
    """A text completion's prompt: a string, or token ids as OpenAI's API takes them (a list
    of ids, or up to `max_prompts` such lists, each answered as if it were alone). A list of
    strings is not taken."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and _ids(prompt, vocab_size):
        prompt = [prompt]
    if not (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and _ids(p, vocab_size) for p in prompt)
    ):
        msg = "'prompt' must be a string, a list of token ids or a list of lists of token ids"
        raise APIError(400, msg, "prompt")
    if len(prompt) > max_prompts:
        raise APIError(
            400, f"'prompt' holds {len(prompt)} prompts; at most {max_prompts}", "prompt"
        )
    return prompt
