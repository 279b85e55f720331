"""Structured output (JSON Schema, JSON object, GBNF grammar) through the official openai client
against a server on a random micro model with Llama 2's 32,000-token vocabulary, and through
the library. A random model writes valid JSON only because of the mask: every answer here is
parsed and validated against its schema."""

import copy
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from test_serve import KEY, _start

from llama2 import Llama, Tokenizer, Transformer, get_preset
from llama2.generation import generate
from llama2.sampling import SamplingParams
from llama2.structured import compile_grammar, token_bytes

# bounded schemas (strings, arrays and integers of bounded size): a random model's answers end
# within max_tokens, as the mask leaves it no other way
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 5},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "gift"],
            },
        },
        "status": {"enum": ["open", "paid", "shipped"]},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["items", "status", "note"],
}
LABELS = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4}
SCHEMAS = {"person": PERSON, "order": ORDER, "labels": LABELS}


def _llm(tokenizer: Tokenizer, closing_bias: float = 0.0) -> Llama:
    """A random micro model (seed 0) over Llama 2's vocabulary. `closing_bias` is added to the
    logits of the tokens made of '"', '}' and ']' only: for unbounded JSON (json_object), a
    random model that tends to close what it opens, so that its answers end in max_tokens."""
    torch.manual_seed(0)
    cfg = get_preset("micro", vocab_size=tokenizer.vocab_size, max_seq_len=1024)
    model = Transformer(cfg).eval()
    if closing_bias:
        closers = [i for i, b in enumerate(token_bytes(tokenizer)) if b and set(b) <= set(b'"}]')]
        bias = torch.zeros(cfg.vocab_size)
        bias[closers] = closing_bias
        model.output.register_forward_hook(lambda _, args, out: out + bias)
    return Llama(model, tokenizer, cfg)


def _server(llm: Llama, **options):
    from llama2.serve.api import create_app

    app = create_app(llm, "micro", api_key=KEY, max_batch=4, max_queue=32, **options)
    srv, thread, base = _start(app)
    return srv, thread, base, app


@pytest.fixture(scope="module")
def served(llama2_tokenizer):
    srv, thread, base, app = _server(_llm(llama2_tokenizer))
    yield base, app
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def served_closing(llama2_tokenizer):
    srv, thread, base, app = _server(_llm(llama2_tokenizer, closing_bias=6.0))
    yield base, app
    srv.should_exit = True
    thread.join(timeout=10)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_token_bytes_are_the_decoded_text(llama2_tokenizer):
    """The vocabulary given to xgrammar: each id's bytes, joined, are the decoded text (spaces
    from '▁', byte-fallback pieces as their bytes, control pieces empty)."""
    tok, table = llama2_tokenizer, token_bytes(llama2_tokenizer)
    text = 'Un {"clé": [1, 2.5e-3]}\n\t🦙 ﷺ "end"'
    ids = tok.encode(text, bos=True, eos=True)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # (byte fallback is used)
    assert b"".join(table[i] for i in ids) == tok.decode(ids, continuation=True).encode()
    assert table[tok.bos_id] == table[tok.eos_id] == b""


def test_bounded_strings_hold_no_raw_control_characters(llama2_tokenizer):
    """JSON forbids raw control characters in strings; a length bound keeps its count."""
    import xgrammar

    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}}
    params = SamplingParams(json_schema=schema | {"required": ["a"]})
    for text, ok in [('{"a": "x\ty"}', False), ('{"a": "x\x12"}', False), ('{"a": "abc"}', True),
                     ('{"a": "abcd"}', False), ('{"a": "été"}', True)]:  # fmt: skip
        matcher = xgrammar.GrammarMatcher(compile_grammar(llama2_tokenizer, params))
        assert matcher.accept_string(text) == ok, text


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_answers_validate_through_the_openai_client(served, name):
    """Chat and text completions, whole and streamed, two choices each: every answer parses
    and validates against its schema, and ends with 'stop' (at the grammar's end)."""
    c, schema = _client(served[0]), SCHEMAS[name]
    fmt = _format(name, schema)
    msgs = [{"role": "user", "content": f"Give me a {name} as JSON."}]
    kw = dict(model="micro", max_tokens=600, temperature=1.0, seed=3, n=2)
    chat = c.chat.completions.create(messages=msgs, response_format=fmt, **kw)
    text = c.completions.create(prompt=f"A {name}:", extra_body={"response_format": fmt}, **kw)
    answers = [(ch.message.content, ch.finish_reason) for ch in chat.choices]
    answers += [(ch.text, ch.finish_reason) for ch in text.choices]
    stream = c.chat.completions.create(messages=msgs, response_format=fmt, stream=True, **kw)
    pieces = ["", ""]
    for chunk in stream:
        for ch in chunk.choices:
            pieces[ch.index] += ch.delta.content or ""
    assert pieces == [a for a, _ in answers[:2]]  # streamed == whole (same seed)
    for answer, finish in answers:
        assert finish == "stop", answer
        jsonschema.validate(json.loads(answer), schema)
    assert len({a for a, _ in answers}) > 1  # (the choices differ: a random model, sampled)


def test_json_object_mode_and_a_grammar(served_closing):
    c = _client(served_closing[0])
    msgs = [{"role": "user", "content": "JSON, please."}]
    for seed in range(3):
        out = c.chat.completions.create(
            model="micro",
            messages=msgs,
            response_format={"type": "json_object"},
            max_tokens=800,
            temperature=1.0,
            seed=seed,
        )
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    grammar = 'root ::= ("yes" | "no") ", " [0-9] [0-9]? " " ("apples" | "pears")'
    out = c.completions.create(
        model="micro", prompt="Answer:", max_tokens=20, temperature=1.0, seed=1, n=3,
        extra_body={"grammar": grammar},
    )  # fmt: skip
    for ch in out.choices:
        assert ch.finish_reason == "stop"
        assert re.fullmatch(r"(yes|no), \d\d? (apples|pears)", ch.text), ch.text


def test_bad_schemas_and_fields_are_400s_naming_them(served):
    """A schema xgrammar cannot compile is a 400 naming the schema and why; malformed
    response_format and grammar fields are 400s naming the field; none reaches the engine."""
    base, app = served
    c = _client(base)
    before = app.state.engine.stats.requests
    msgs = [{"role": "user", "content": "hi"}]
    bad = _format("bad_person", {"type": "object", "properties": {"age": {"type": "foo"}}})
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="micro", messages=msgs, response_format=bad)
    err = e.value.body
    assert "'bad_person'" in err["message"] and 'Unsupported type "foo"' in err["message"], err
    assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
    cases = [
        ({"grammar": "root ::= item"}, "grammar", "not defined"),
        ({"grammar": ""}, "grammar", "must not be empty"),
        ({"response_format": {"type": "xml"}}, "response_format", "text, json_object"),
        ({"response_format": {"type": "json_object", "schema": {}}}, "response_format", "'schema'"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "must be an object"),
        ({"response_format": _format("p", PERSON) | {"x": 1}}, "response_format", "'x'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
         "response_format.json_schema", "'name'"),
        ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar",
         "not both"),
        ({"response_format": _format("p", PERSON) | {"json_schema": {"name": "p", "strict": 1}}},
         "response_format.json_schema.strict", "must be a boolean"),
    ]  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30, headers=auth) as http:
        for extra, param, words in cases:
            for path, body in (
                ("/v1/completions", {"prompt": "x"}),
                ("/v1/chat/completions", {"messages": msgs}),
            ):
                r = http.post(base + path, json=body | extra)
                assert r.status_code == 400, (extra, r.text)
                err = r.json()["error"]
                assert err["param"] == param and words in err["message"], (extra, err)
    assert app.state.engine.stats.requests == before


def test_max_tokens_before_the_json_closes_is_length_and_a_prefix(served, llama2_tokenizer):
    """An answer cut by max_tokens ends with 'length' (as OpenAI's): its text is a prefix of a
    valid answer, not one."""
    import xgrammar

    c = _client(served[0])
    out = c.completions.create(
        model="micro", prompt="x", max_tokens=6, temperature=1.0, seed=0,
        extra_body={"response_format": _format("person", PERSON)},
    ).choices[0]  # fmt: skip
    assert out.finish_reason == "length"
    matcher = xgrammar.GrammarMatcher(
        compile_grammar(llama2_tokenizer, SamplingParams(json_schema=PERSON))
    )
    assert matcher.accept_string(out.text) and not matcher.is_terminated()
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_constrained_and_free_requests_batched_together(served):
    """Constrained and free requests running in one engine batch: the free answers are what
    they are alone, the constrained ones validate."""
    c = _client(served[0])
    free = dict(model="micro", prompt="Once upon", max_tokens=30, temperature=1.0, seed=5)
    alone = c.completions.create(**free).choices[0].text

    def constrained(seed: int) -> str:
        fmt = {"response_format": _format("person", PERSON)}
        kw = dict(model="micro", prompt="x", max_tokens=600, seed=seed, extra_body=fmt)
        return c.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(constrained, s) for s in range(3)]
        mixed = pool.submit(lambda: c.completions.create(**free).choices[0].text)
        for a in answers:
            jsonschema.validate(json.loads(a.result()), PERSON)
        assert mixed.result() == alone


def test_library_generate_stream_and_a_mixed_batch(llama2_tokenizer):
    llm = _llm(llama2_tokenizer)
    tok = llm.tokenizer
    outs = llm.generate(["A person:", "Someone"], json_schema=PERSON, max_new_tokens=600, seed=2)
    for o in outs:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), PERSON)
    streamed = "".join(llm.stream("A person:", json_schema=PERSON, max_new_tokens=600, seed=2))
    assert streamed == outs[0].text
    assert json.loads(llm.generate("[", json_schema=json.dumps(LABELS), seed=1).text)

    # one batch, a constrained row beside a free one: the free row is what it is alone
    prompts = [tok.encode("Once upon", bos=True), tok.encode("x", bos=True)]
    free = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    rows = [free, SamplingParams(max_new_tokens=600, seed=8, json_schema=ORDER)]
    both = generate(llm.model, tok, prompts, rows, (tok.eos_id,))
    alone = generate(llm.model, tok, prompts[:1], free, (tok.eos_id,))[0]
    assert both[0].token_ids == alone.token_ids
    jsonschema.validate(json.loads(both[1].text), ORDER)


def test_library_errors_name_the_field(llama2_tokenizer):
    llm = _llm(llama2_tokenizer)
    with pytest.raises(ValueError, match='json_schema cannot be compiled: Unsupported type "foo"'):
        llm.generate("x", json_schema={"type": "foo"})
    with pytest.raises(ValueError, match="grammar cannot be compiled"):
        llm.generate("x", grammar="root ::= (")
    with pytest.raises(ValueError, match="at most one of json_schema, json_object and grammar"):
        SamplingParams(json_object=True, grammar='root ::= "a"')
    with pytest.raises(ValueError, match="without structured output"):
        llm.generate("x", draft=llm, json_object=True)
    with pytest.raises(ValueError, match="2 sampling parameters for 1 prompts"):
        generate(llm.model, llm.tokenizer, [[1, 2]], [SamplingParams()] * 2)


def test_without_xgrammar_the_error_says_how_to_install_it(llama2_tokenizer, monkeypatch):
    from llama2.serve.errors import APIError
    from llama2.serve.validation import check_structure

    monkeypatch.setitem(__import__("sys").modules, "xgrammar", None)  # (import fails)
    llm = _llm(llama2_tokenizer)
    with pytest.raises(ImportError, match=r"needs the xgrammar package: pip install 'llama2\["):
        llm.generate("x", json_object=True)
    assert llm.generate("x", max_new_tokens=2).token_ids  # free generation needs no xgrammar
    body = {"response_format": {"type": "json_object"}}
    with pytest.raises(APIError, match="structured output is not available here") as e:
        check_structure(body, SamplingParams(json_object=True), llama2_tokenizer)
    assert e.value.status == 400 and e.value.param == "response_format"


def test_a_server_with_a_draft_keeps_the_schema(served, llama2_tokenizer):
    """Under `serve --draft`, a constrained request takes no proposals (they would skip the
    mask): its greedy answer validates and equals the server's without a draft, while free
    requests beside it are drafted."""
    llm = _llm(llama2_tokenizer)
    srv, thread, base, _ = _server(llm, draft=copy.deepcopy(llm.model), draft_tokens=3)
    try:
        fmt = _format("person", PERSON)
        msgs = [{"role": "user", "content": "Give me a person as JSON."}]
        kw = dict(model="micro", max_tokens=600, temperature=0.0)
        got = [
            _client(b).chat.completions.create(messages=msgs, response_format=fmt, **kw)
            for b in (base, served[0])
        ]
        drafted, alone = (r.choices[0].message.content for r in got)
        jsonschema.validate(json.loads(drafted), PERSON)
        assert drafted == alone
        free = _client(base).completions.create(prompt="A person:", **{**kw, "max_tokens": 8})
        assert free.choices[0].text
        metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "llama2_draft_accepted_tokens_total" in metrics
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
