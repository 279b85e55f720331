"""The server against the official openai client, live on 127.0.0.1 (started and stopped
here; every request loop is bounded)."""

import copy
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from llama2 import Llama, Transformer, get_preset

KEY = "sk-test"


def _start(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    return srv, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(small_tokenizer):
    from llama2.serve.api import create_app

    torch.manual_seed(0)
    cfg = get_preset("micro")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    llm = Llama(model, small_tokenizer, cfg)
    twin = Llama(copy.deepcopy(model), small_tokenizer, cfg)  # the library's (a cache of its own)
    app = create_app(llm, "micro", api_key=KEY, max_batch=4, max_queue=32)
    srv, thread, base = _start(app)
    yield base, app, twin
    srv.should_exit = True
    thread.join(timeout=10)


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_chat_and_completions_streamed_and_not(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "def main"}]
    kw = dict(model="micro", messages=msgs, max_tokens=12, temperature=0.8, seed=7)
    full = c.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens > 0
    stream = c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    assert "".join(pieces) == text  # streamed == non-streamed, same seed
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens

    comp = c.completions.create(
        model="micro", prompt="import os\n", max_tokens=10, temperature=0, logprobs=2, echo=True
    )
    prompt_ids = server[2].tokenizer.encode("import os\n", bos=True)
    assert comp.choices[0].text.startswith("import os\n")  # the prompt's tokens, then 10
    assert len(comp.choices[0].logprobs.tokens) == len(prompt_ids) + 10
    chunks = c.completions.create(
        model="micro", prompt="import os\n", max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join(ch.choices[0].text for ch in chunks)
    assert "import os\n" + streamed == comp.choices[0].text
    two = c.chat.completions.create(model="micro", messages=msgs, max_tokens=6, n=2, seed=1)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert [m.id for m in c.models.list().data] == ["micro"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_server_output_equals_the_library(server, temperature):
    """The same request and seed give the library's text, tokens, logprobs and finish reason
    (chat and completions, streamed and not), stop strings included."""
    c, llm = client(server), server[2]
    tok = llm.tokenizer

    def piece(i: int) -> str:
        return tok.id_to_piece(i).replace("\u2581", " ")

    def same_logprobs(entries, lib) -> None:
        assert [e.token for e in entries] == [piece(x.token_id) for x in lib.logprobs]
        for e, x in zip(entries, lib.logprobs, strict=True):
            assert abs(e.logprob - x.logprob) < 1e-4
            assert [t.token for t in e.top_logprobs] == [piece(i) for i, _ in x.top]

    msgs = [{"role": "user", "content": "def main"}]
    kw = dict(max_new_tokens=24, temperature=temperature, seed=5)
    free = llm.chat(msgs, **kw)
    assert len(free.text) > 10
    stop = free.text[6:9]
    lib = llm.chat(msgs, **kw, stop=[stop], logprobs=2)
    assert lib.finish_reason == "stop" and lib.text == free.text[: free.text.index(stop)]
    req = dict(model="micro", messages=msgs, max_tokens=24, temperature=temperature, seed=5)
    req |= dict(stop=[stop], logprobs=True, top_logprobs=2)
    full = c.chat.completions.create(**req).choices[0]
    assert full.message.content == lib.text and full.finish_reason == lib.finish_reason
    same_logprobs(full.logprobs.content, lib)
    chunks = [ch.choices[0] for ch in c.chat.completions.create(**req, stream=True) if ch.choices]
    assert "".join(ch.delta.content or "" for ch in chunks) == lib.text
    assert chunks[-1].finish_reason == lib.finish_reason
    same_logprobs([e for ch in chunks if ch.logprobs for e in ch.logprobs.content], lib)

    lib = llm.generate(
        "import os\n", max_new_tokens=12, temperature=temperature, seed=5, logprobs=2
    )
    comp = c.completions.create(
        model="micro",
        prompt="import os\n",
        max_tokens=12,
        temperature=temperature,
        seed=5,
        logprobs=2,
    ).choices[0]
    assert comp.text == lib.text and comp.finish_reason == lib.finish_reason == "length"
    assert comp.logprobs.tokens == [piece(i) for i in lib.token_ids]
    lps = zip(comp.logprobs.token_logprobs, lib.logprobs, strict=True)
    assert max(abs(a - x.logprob) for a, x in lps) < 1e-4


def test_sixteen_concurrent_streams_are_correct(server):
    c = client(server)

    def one(i):
        kw = dict(
            model="micro",
            messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=8,
            temperature=0.9,
            seed=i,
        )
        chunks = c.chat.completions.create(**kw, stream=True)
        pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        return "".join(pieces), kw

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for text, kw in results:  # each equals the same request made alone afterwards
        assert c.chat.completions.create(**kw).choices[0].message.content == text


def _metric(base, name):
    body = httpx.get(base + "/metrics").text
    return float(
        next(line.split()[-1] for line in body.splitlines() if line.startswith(name + " "))
    )


def test_a_disconnecting_client_frees_its_slot(server):
    base = server[0]
    body = {
        "model": "micro",
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 100,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": "' in line:
                break  # read one piece, then hang up
    deadline = time.time() + 10
    while time.time() < deadline and _metric(base, "llama2_running_requests") > 0:
        time.sleep(0.05)
    assert _metric(base, "llama2_running_requests") == 0
    assert _metric(base, "llama2_generation_tokens_total") > 0


def test_errors_have_openai_shape_and_the_server_keeps_serving(server):
    base = server[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({}, {"model": "micro", "messages": msgs}, 401),
        (auth, {"model": "gpt-9", "messages": msgs}, 404),
        (auth, {"model": "micro", "messages": msgs, "temperature": -1}, 400),
        (auth, {"model": "micro", "messages": [{"role": "assistant", "content": "x"}]}, 400),
        (auth, {"model": "micro", "messages": [{"role": "user", "content": "word " * 400}]}, 400),
    ]
    for headers, body, status in cases:
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400
    ok = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "micro", "messages": msgs, "max_tokens": 3},
        headers=auth,
        timeout=30,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    for path in ("/tokenize", "/detokenize"):  # the key guards them too
        assert httpx.post(base + path, json={"prompt": "x", "tokens": [1]}).status_code == 401
    ids = httpx.post(base + "/tokenize", json={"prompt": "def x"}, headers=auth).json()["tokens"]
    back = httpx.post(base + "/detokenize", json={"tokens": ids}, headers=auth).json()
    assert back["prompt"] == "def x"
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert json.loads(json.dumps(httpx.get(base + "/v1/models", headers=auth).json()))["data"]


def test_a_full_queue_answers_503(small_tokenizer):
    """One slot, one queue place: while the engine is held mid-request (deterministically, by a
    hook on its model, not by hoping generation is slow), a second request waits and a third is
    refused with 503."""
    from llama2.serve.api import create_app

    cfg = get_preset("micro")
    llm = Llama(Transformer(cfg).eval(), small_tokenizer, cfg)
    release = threading.Event()

    def hold_decode_steps(module, args):  # prefills pass; decode steps wait for the test
        if args[0].shape[1] == 1:
            assert release.wait(timeout=60), "the test never released the engine"

    hook = llm.model.register_forward_pre_hook(hold_decode_steps)
    srv, thread, base = _start(create_app(llm, "micro", max_batch=1, max_queue=1))
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 8, "stream": True}
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", base + "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()  # (kept: dropping the iterator hangs up)
                next(lines)  # running, in the only slot, and the engine is held
                with http.stream("POST", base + "/v1/chat/completions", json=body) as second:
                    deadline = time.time() + 30
                    while (
                        httpx.get(base + "/health").json()["waiting"] < 1 and time.time() < deadline
                    ):
                        time.sleep(0.02)
                    third = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
                    assert third.status_code == 503
                    assert third.json()["error"]["code"] == "queue_full"
                    assert second.status_code == 200
                    release.set()
                    assert "data: [DONE]" in list(second.iter_lines())  # it ran, in turn
    finally:
        release.set()
        hook.remove()
        srv.should_exit = True
        thread.join(timeout=10)


def _own_server(small_tokenizer, **kw):
    """A server of its own (a fresh micro model) for tests that hook its model."""
    from llama2.serve.api import create_app

    cfg = get_preset("micro")
    torch.manual_seed(0)
    llm = Llama(Transformer(cfg).eval(), small_tokenizer, cfg)
    app = create_app(llm, "micro", **{"max_batch": 4, "max_queue": 8} | kw)
    srv, thread, base = _start(app)
    return llm, app, srv, thread, base


def _stop(srv, thread):
    srv.should_exit = True
    thread.join(timeout=10)


def test_every_field_is_checked_before_the_engine(server):
    """Bad types and ranges (64-bit seeds, stream_options, n, ...) answer 400 in OpenAI's
    shape and never reach the engine; the edges of the ranges are served."""
    base, app = server[0], server[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}]
    chat = {"model": "micro", "messages": msgs, "max_tokens": 2}
    bad_chat = [
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
        {"seed": "7"},
        {"seed": 1.5},
        {"stream_options": "x", "stream": True},
        {"stream_options": {"include_usage": "yes"}, "stream": True},
        {"stream_options": {"include_usage": True}},  # without stream
        {"stream": "yes"},
        {"n": 0},
        {"n": 5000},
        {"n": True},
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"temperature": "hot"},
        {"temperature": 3},
        {"top_p": 0},
        {"stop": 5},
        {"stop": [""]},
        {"logprobs": "yes"},
        {"logprobs": True, "top_logprobs": 30},
        {"top_logprobs": 2},  # without logprobs
        {"presence_penalty": 1.0},
        {"logit_bias": {"5": 10}},
        {"tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "bot", "content": "x"}]},
        {"messages": []},
        {"messages": "hi"},
    ]
    bad_completion = [
        {"prompt": ["a", "b"]},
        {"prompt": [[1, 2], "a"]},
        {"prompt": [600]},  # (outside the vocabulary)
        {"prompt": []},
        {"prompt": [[1, 2]], "suffix": "x"},
        {"prompt": "x", "max_tokens": 0},  # (only with echo)
        {"prompt": "x", "echo": "yes"},
        {"prompt": "x", "suffix": 3},
        {"prompt": "x", "logprobs": 21},
        {"prompt": "x", "best_of": 3},
    ]
    requests_before = app.state.engine.stats.requests
    with httpx.Client(timeout=30, headers=auth) as http:
        for path, cases, good in [
            ("/v1/chat/completions", bad_chat, chat),
            ("/v1/completions", bad_completion, {"model": "micro", "max_tokens": 2}),
        ]:
            for bad in cases:
                r = http.post(base + path, json=good | bad)
                assert r.status_code == 400, (bad, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, bad
                assert err["type"] == "invalid_request_error" and err["message"], bad
        assert app.state.engine.stats.requests == requests_before  # none reached the engine
        # the edges are served: the largest and smallest seeds (choice seeds wrap at 2**64),
        # n up to 16, content as text parts, stream_options with stream
        for ok in [
            {"seed": 2**64 - 1, "n": 2},
            {"seed": -(2**63)},
            {"n": 16, "max_tokens": 1},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            {"stream": True, "stream_options": {"include_usage": True}},
        ]:
            r = http.post(base + "/v1/chat/completions", json=chat | ok)
            assert r.status_code == 200, (ok, r.text)
    assert httpx.get(base + "/health").json()["status"] == "ok"
    # the largest seed is the library's too
    lib = server[2].chat(msgs, max_new_tokens=6, temperature=0.9, seed=2**64 - 1)
    c = client(server)
    got = c.chat.completions.create(
        model="micro", messages=msgs, max_tokens=6, temperature=0.9, seed=2**64 - 1
    )
    assert got.choices[0].message.content == lib.text


def test_unknown_fields_are_refused_naming_them(server):
    """A field a path does not know (a typo, an option of another server) is a 400 naming it,
    not silently ignored; the openai client's own requests (defaults, every documented field
    we take) pass."""
    import openai

    base, app = server[0], server[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}]
    requests_before = app.state.engine.stats.requests
    cases = [
        ("/v1/chat/completions", {"messages": msgs, "max_token": 2}, "max_token"),
        ("/v1/chat/completions", {"messages": msgs, "top_k": 5}, "top_k"),
        ("/v1/chat/completions", {"messages": msgs, "store": True}, "store"),
        ("/v1/completions", {"prompt": "x", "messages": msgs}, "messages"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "temprature": 0}, "temprature"),
        ("/tokenize", {"prompt": "x", "add_bos": True}, "add_bos"),
        ("/detokenize", {"tokens": [1], "skip_special": True}, "skip_special"),
    ]
    with httpx.Client(timeout=30, headers=auth) as http:
        for path, body, field in cases:
            r = http.post(base + path, json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == field and f"'{field}'" in err["message"], err
            assert err["type"] == "invalid_request_error" and err["code"] == "unknown_field"
        r = http.post(
            base + "/v1/chat/completions",
            json={
                "messages": msgs,
                "stream": True,
                "stream_options": {"include_usage": True, "x": 1},
            },
        )
        assert r.status_code == 400 and "'x'" in r.json()["error"]["message"]
    assert app.state.engine.stats.requests == requests_before  # none reached the engine

    c = client(server)
    with pytest.raises(openai.BadRequestError, match="top_k"):
        c.chat.completions.create(model="micro", messages=msgs, extra_body={"top_k": 5})
    # the client with its defaults, and with every field this server takes
    assert c.chat.completions.create(model="micro", messages=msgs).choices[0].finish_reason
    assert c.completions.create(model="micro", prompt="x").choices[0].finish_reason
    every = dict(max_tokens=3, temperature=0.5, top_p=0.9, n=1, stop=["\n\n"], seed=3)
    every |= dict(user="u", presence_penalty=0, frequency_penalty=0, logit_bias={})
    full = c.chat.completions.create(
        model="micro",
        messages=msgs,
        **every,
        logprobs=True,
        top_logprobs=1,
        max_completion_tokens=3,
        response_format=None,
    )
    assert full.choices[0].logprobs.content
    streamed = c.completions.create(
        model="micro",
        prompt="x",
        **every,
        echo=False,
        logprobs=1,
        best_of=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert [ch.usage for ch in streamed if ch.usage]


def test_unknown_message_keys_are_refused_naming_them(server):
    """A key a message's role does not take (OpenAI's schema) is a 400 naming messages[i].key;
    the keys it takes pass, and so does an answer the openai client hands back as a message."""
    base, app = server[0], server[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "hello"}
    requests_before = app.state.engine.stats.requests
    cases = [
        ([user | {"foo": 1}], "messages[0].foo"),
        (
            [{"role": "system", "content": "x", "tool_call_id": "c"}, user],
            "messages[0].tool_call_id",
        ),
        ([user, answer | {"refusal": None, "foo": None}, user], "messages[1].foo"),
        ([user | {"refusal": "no"}], "messages[0].refusal"),  # (an assistant's key only)
    ]
    with httpx.Client(timeout=30, headers=auth) as http:
        for messages, param in cases:
            r = http.post(base + "/v1/chat/completions", json={"messages": messages})
            assert r.status_code == 400, (messages, r.text)
            err = r.json()["error"]
            assert err["param"] == param and f"'{param.split('.')[-1]}'" in err["message"], err
            assert err["type"] == "invalid_request_error" and err["code"] == "unknown_field"
        # known keys with values this server cannot honour: 400 too, named
        for messages, param in [
            ([user | {"name": 5}], "messages[0].name"),
            ([user, answer | {"tool_calls": [{"id": "c"}]}, user], "messages[1].tool_calls"),
            ([user, answer | {"audio": {"id": "a"}}, user], "messages[1].audio"),
        ]:
            r = http.post(base + "/v1/chat/completions", json={"messages": messages})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert app.state.engine.stats.requests == requests_before  # none reached the engine
        empty = {"refusal": None, "tool_calls": [], "function_call": None, "audio": None}
        for ok in [
            [{"role": "system", "content": "x", "name": "s"}, user | {"name": "ann"}],
            [user, answer | {"name": "bot"} | empty, user],
        ]:
            body = {"messages": ok, "max_tokens": 2}
            r = http.post(base + "/v1/chat/completions", json=body)
            assert r.status_code == 200, (ok, r.text)

    c = client(server)
    first = c.chat.completions.create(model="micro", messages=[user], max_tokens=3)
    again = c.chat.completions.create(
        model="micro", messages=[user, first.choices[0].message, user], max_tokens=3
    )
    assert again.choices[0].finish_reason
    dumped = first.choices[0].message.model_dump()  # with its null fields (annotations, audio)
    again = c.chat.completions.create(model="micro", messages=[user, dumped, user], max_tokens=3)
    assert again.choices[0].finish_reason


def test_an_engine_exception_fails_only_the_requests_it_touches(small_tokenizer):
    """A bad sample (NaN logits in one row) fails that request only, with a 500 in OpenAI's
    shape, while the request batched with it finishes; an exception in a batched forward fails
    a stream with an error event; the engine goes on serving and /health counts both."""
    import openai

    llm, app, srv, thread, base = _own_server(small_tokenizer)
    c = OpenAI_client(base)
    engine = app.state.engine
    state = {"hold_prefill": True, "poison": False, "raise": False}
    let_go = threading.Event()

    def pre(_, args):
        if args[0].shape[1] > 1 and state["hold_prefill"]:  # the first prefill waits
            state["hold_prefill"] = False
            assert let_go.wait(timeout=60)
        if args[0].shape[1] == 1 and state["raise"]:
            state["raise"] = False
            raise RuntimeError("injected failure")

    def post(_, args, out):
        if args[0].shape == (2, 1) and state["poison"]:  # first decode step of both
            state["poison"] = False
            out[0] = float("nan")  # the first-running request's row
            return out

    hooks = [llm.model.register_forward_pre_hook(pre), llm.model.register_forward_hook(post)]
    msgs = [{"role": "user", "content": "go"}]
    kw = dict(model="micro", messages=msgs, max_tokens=10, temperature=0.9)
    try:
        state["poison"] = True
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.chat.completions.create, **kw, seed=1)
            deadline = time.time() + 30  # the first is held in its prefill: queue the second
            while engine.num_running < 1 and time.time() < deadline:
                time.sleep(0.01)
            second = pool.submit(c.chat.completions.create, **kw, seed=2)
            while engine.stats.requests < 2 and time.time() < deadline:
                time.sleep(0.01)
            let_go.set()
            with pytest.raises(openai.InternalServerError) as failed:
                first.result(timeout=60)
            ok = second.result(timeout=60)
        err = failed.value.response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "internal"
        assert "probability" in err["message"]  # the sampling's own error, reported
        assert ok.choices[0].message.content == (
            c.chat.completions.create(**kw, seed=2).choices[0].message.content
        )  # its batch-mate's failure changed nothing for it

        state["raise"] = True
        with pytest.raises(openai.APIError, match="injected failure"):
            for _ in c.chat.completions.create(**kw, seed=3, stream=True):
                pass
        health = httpx.get(base + "/health").json()
        assert health["status"] == "ok" and health["engine_errors"] == 2
        assert "injected failure" in health["last_error"]
        assert health["running"] == 0 and len(engine.free) == 4
        assert c.chat.completions.create(**kw, seed=3).choices[0].finish_reason
    finally:
        for h in hooks:
            h.remove()
        let_go.set()
        _stop(srv, thread)


def OpenAI_client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=60)


def test_a_non_streaming_client_that_hangs_up_frees_its_slot_at_once(small_tokenizer):
    """A whole-answer request whose client closes the connection while its decode steps are
    held: once the server has noticed, the next step frees the slot (not 100 tokens later)."""
    llm, app, srv, thread, base = _own_server(small_tokenizer)
    engine = app.state.engine
    release = threading.Event()
    hook = llm.model.register_forward_pre_hook(
        lambda _, args: None if args[0].shape[1] > 1 else release.wait(timeout=60) and None
    )
    body = json.dumps(
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 100, "temperature": 1}
    ).encode()
    host, port = base.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.time() + 30
            while not engine.running and time.time() < deadline:
                time.sleep(0.01)
            seq = engine.running[0]
        # hung up: the server cancels the request when it sees the disconnect
        while not seq.req.cancelled.is_set() and time.time() < deadline:
            time.sleep(0.01)
        assert seq.req.cancelled.is_set()
        release.set()
        while engine.num_running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0 and len(engine.free) == 4
        assert len(seq.decoder.stream.ids) <= 2
    finally:
        release.set()
        hook.remove()
        _stop(srv, thread)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_soak_mixed_requests_keep_memory_bounded(small_tokenizer):
    """400 short requests from 8 clients on loopback: whole and streamed answers, clients that
    hang up midway, invalid requests, n=2 with logprobs. Every one gets its answer, nothing is
    left running or waiting, and resident memory after the last is within 5% of where it was
    after the first 200 (the warm-up: allocator arenas, connection pools, first-shape
    kernels). (~70 s on a loaded 2-core machine.)"""
    llm, app, srv, thread, base = _own_server(small_tokenizer, max_batch=4, max_queue=64)
    engine = app.state.engine
    system = {"role": "system", "content": "Be terse."}
    clients: dict[int, httpx.Client] = {}  # one per client thread, connections kept alive

    def one(i: int) -> str:
        http = clients.setdefault(threading.get_ident(), httpx.Client(timeout=60))
        body = {"messages": [system, {"role": "user", "content": f"q{i}"}], "max_tokens": 6}
        body |= {"seed": i, "temperature": 0.9}
        url = base + "/v1/chat/completions"
        kind = i % 5
        if kind == 0:
            r = http.post(url, json=body)
            return "ok" if r.status_code == 200 and r.json()["choices"] else r.text
        if kind in (1, 2):  # streamed; kind 2 hangs up after the first piece
            stopped = False  # (an answer whose first token is EOS has no piece to hang up on)
            with http.stream("POST", url, json=body | {"stream": True}) as r:
                for line in r.iter_lines():
                    if kind == 2 and '"content": "' in line and '"role"' not in line:
                        return "gone"
                    stopped |= '"finish_reason": "stop"' in line
                    if line == "data: [DONE]":
                        return "ended at once" if kind == 2 and stopped else "ok"
            return "no [DONE]"
        if kind == 3:
            r = http.post(url, json=body | {"seed": 2**64, "stream_options": "x"})
            return "ok" if r.status_code == 400 else r.text
        r = http.post(
            base + "/v1/completions",
            json={"prompt": f"def f{i}", "max_tokens": 4, "n": 2, "logprobs": 1, "seed": i},
        )
        return "ok" if r.status_code == 200 and len(r.json()["choices"]) == 2 else r.text

    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(200)))
            rss_warm = _rss_kib()
            outcomes += list(pool.map(one, range(200, 400)))
        rss_end = _rss_kib()
        expected = ("ok", "gone", "ended at once")
        assert all(o in expected for o in outcomes), [o for o in outcomes if o != "ok"][:3]
        assert outcomes.count("gone") + outcomes.count("ended at once") == 80
        deadline = time.time() + 30
        while engine.num_running and time.time() < deadline:  # (the last hang-ups)
            time.sleep(0.01)
        assert engine.num_running == engine.num_waiting == 0 and len(engine.free) == 4
        assert engine.stats.engine_errors == 0
        metrics = httpx.get(base + "/metrics").text
        assert 'llama2_time_to_first_token_seconds_bucket{le="+Inf"}' in metrics
        assert rss_end <= 1.05 * rss_warm, (rss_warm, rss_end)
    finally:
        for http in clients.values():
            http.close()
        _stop(srv, thread)


SERVER_SCRIPT = """
import sys, torch
from llama2 import Llama, Tokenizer, Transformer, get_preset
from llama2.serve.api import serve
cfg = get_preset("micro")
torch.manual_seed(0)
llm = Llama(Transformer(cfg).eval(), Tokenizer.from_file(sys.argv[1]), cfg)
serve(llm, "127.0.0.1", int(sys.argv[2]), "micro", shutdown_timeout=120)
"""


@pytest.mark.slow
def test_sigterm_finishes_running_requests_and_exits_0(small_tokenizer, tmp_path):
    """`serve` in a process of its own: SIGTERM while a stream runs lets it finish ([DONE]),
    refuses new connections, and the process exits with status 0. (Slow: a process of its own
    imports torch and FastAPI; 10-40 s on a loaded 2-core machine.)"""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small_tokenizer.save(tmp_path / "tokenizer.model")
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(tmp_path / "tokenizer.model"), str(port)],
        env=env,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 20}
        body |= {"stream": True, "temperature": 1.0}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "' in "".join(rest)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
        with pytest.raises(httpx.TransportError):  # gone
            httpx.get(base + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_server_that_cannot_listen_exits_1_instead_of_hanging(small_tokenizer, tmp_path):
    """The engine's loop runs in the main thread and HTTP in another: when the port is taken,
    uvicorn gives up in its thread, the loop ends with it and the process exits 1."""
    import os
    import subprocess
    import sys

    small_tokenizer.save(tmp_path / "tokenizer.model")
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", SERVER_SCRIPT, str(tmp_path / "tokenizer.model"), str(port)],
            env=env,
            capture_output=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert "address already in use" in proc.stderr.decode().lower()


def test_n_beyond_the_queue_is_400_and_a_stopped_engine_is_503(small_tokenizer):
    """n larger than the queue can ever hold is the request's fault (400, not "busy"); n that
    fits is served on an idle server; once the engine has stopped, /health and requests say
    so with 503 instead of hanging."""
    llm, app, srv, thread, base = _own_server(small_tokenizer, max_batch=2, max_queue=4)
    msgs = [{"role": "user", "content": "hi"}]
    url = base + "/v1/chat/completions"
    try:
        r = httpx.post(url, json={"messages": msgs, "n": 5, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = httpx.post(url, json={"messages": msgs, "n": 4, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
        app.state.engine.shutdown()
        health = httpx.get(base + "/health", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        r = httpx.post(url, json={"messages": msgs, "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    finally:
        _stop(srv, thread)


def test_checks_and_answer_shapes_are_plain_functions(small_tokenizer):
    """Without a server: a body's unknown field is a 400 naming it, choice seeds wrap at 2**64,
    and a chat and a text answer carry the same completion in their own layouts."""
    from llama2.generation import Completion, TokenLogprob
    from llama2.serve.errors import APIError
    from llama2.serve.responses import CHAT, TEXT, Reply
    from llama2.serve.validation import choices_params, parse_body

    with pytest.raises(APIError) as e:
        parse_body(b'{"model": "micro", "temprature": 1}', "/v1/chat/completions", "micro")
    assert (e.value.status, e.value.param, e.value.code) == (400, "temprature", "unknown_field")
    params = choices_params({"n": 2, "seed": 2**64 - 1}, 16, None, max_n=4)
    assert [p.seed for p in params] == [2**64 - 1, 0] and params[0].max_new_tokens == 16
    lp = [TokenLogprob(5, -0.5, [(5, -0.5), (6, -1.5)])]
    done = [Completion("abc", [5], "length", 3, logprobs=lp)]
    chat = Reply(CHAT, "micro", small_tokenizer, 3).whole(done)
    text = Reply(TEXT, "micro", small_tokenizer, 3, echo="x").whole(done)
    assert chat["id"].startswith("chatcmpl-") and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert text["choices"][0]["text"] == "xabc" and text["object"] == "text_completion"
    entry = chat["choices"][0]["logprobs"]["content"][0]
    assert text["choices"][0]["logprobs"]["tokens"] == [entry["token"]]
    assert text["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]
    assert len(text["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    assert (
        chat["usage"]
        == text["usage"]
        == {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
        }
    )
